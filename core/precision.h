// Dynamic loss scaling for fp16 training (the policy of torch.amp.GradScaler). No LibTorch here.
//
// The loss is multiplied by scale() before backward and the gradients by 1/scale() after it. A step whose
// gradients hold an inf/nan is skipped (no optimizer update), the scale is halved and the skip is counted;
// after growth_interval clean steps in a row the scale doubles. The whole state is three numbers, saved in
// every checkpoint so that a resumed fp16 run scales exactly as an uninterrupted one.
#pragma once
#include <cstdint>

namespace ablate {

class LossScaler {
 public:
  static constexpr double kInitScale = 65536.0;  // 2^16
  static constexpr double kGrowth = 2.0, kBackoff = 0.5;
  static constexpr int64_t kGrowthInterval = 2000;

  explicit LossScaler(bool enabled = false) : enabled_(enabled), scale_(enabled ? kInitScale : 1.0) {}

  bool enabled() const { return enabled_; }
  double scale() const { return scale_; }
  int64_t growth_tracker() const { return growth_tracker_; }  // clean steps since the last change
  int64_t skipped_steps() const { return skipped_; }

  // Called once per optimizer step with whether the unscaled gradients overflowed. Returns true when the
  // optimizer may step. Without scaling (fp32/bf16) it only reports !found_inf and changes nothing.
  bool update(bool found_inf) {
    if (!enabled_) return !found_inf;
    if (found_inf) {
      scale_ *= kBackoff;
      growth_tracker_ = 0;
      ++skipped_;
      return false;
    }
    if (++growth_tracker_ == kGrowthInterval) {
      scale_ *= kGrowth;
      growth_tracker_ = 0;
    }
    return true;
  }

  void restore(double scale, int64_t growth_tracker, int64_t skipped) {
    scale_ = enabled_ ? scale : 1.0;
    growth_tracker_ = enabled_ ? growth_tracker : 0;
    skipped_ = skipped;
  }

 private:
  bool enabled_;
  double scale_;
  int64_t growth_tracker_ = 0;
  int64_t skipped_ = 0;
};

}  // namespace ablate
