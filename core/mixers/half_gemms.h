// Tensor-core GEMMs for half-precision inputs of the chunked scans (ssd_chunked, gated_delta_rule_chunked).
//
// Under autocast (training) the scans' einsums/matmuls already run in the autocast dtype while their decays and
// elementwise products stay fp32. Called directly with bf16/fp16 inputs and autocast off (benchmarks, tests), they
// used to run every GEMM in fp32 — on CUDA without tensor cores — so a K3/K4 benchmark timed a configuration that
// training never runs, against references (mamba_ssm, fla) that take bf16 operands with fp32 accumulation.
// HalfInputGemms makes the direct call behave like the autocast one: for bf16/fp16 inputs with autocast off on their
// device it turns autocast on in that dtype for its lifetime, with the cast cache off (nothing here may outlive the
// call: a cached cast of a parameter would go stale after the optimizer step), and restores the previous state.
#pragma once
#include <ATen/autocast_mode.h>
#include <torch/torch.h>

namespace ablate::core {

class HalfInputGemms {
 public:
  explicit HalfInputGemms(const torch::Tensor& input) : device_(input.device().type()) {
    const auto dt = input.scalar_type();
    if ((dt != torch::kBFloat16 && dt != torch::kHalf) || at::autocast::is_autocast_enabled(device_)) return;
    active_ = true;
    old_dtype_ = at::autocast::get_autocast_dtype(device_);
    old_cache_ = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    at::autocast::set_autocast_dtype(device_, dt);
    at::autocast::set_autocast_enabled(device_, true);
  }
  ~HalfInputGemms() {
    if (!active_) return;
    at::autocast::set_autocast_enabled(device_, false);
    at::autocast::set_autocast_dtype(device_, old_dtype_);
    at::autocast::set_autocast_cache_enabled(old_cache_);
  }
  HalfInputGemms(const HalfInputGemms&) = delete;
  HalfInputGemms& operator=(const HalfInputGemms&) = delete;

 private:
  c10::DeviceType device_;
  bool active_ = false;
  at::ScalarType old_dtype_ = at::kBFloat16;
  bool old_cache_ = true;
};

}  // namespace ablate::core
