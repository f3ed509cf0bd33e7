#include "kernels/cross_entropy.h"

#include <cmath>
#include <limits>

namespace ablate::kernels {

void cross_entropy_ref(const CrossEntropyArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    float* x = static_cast<float*>(a.logits) + r * a.ld;
    const int64_t t = a.targets[r];
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < a.vocab; ++j) m = std::max(m, double(x[j]));
    double s = 0.0;
    for (int64_t j = 0; j < a.vocab; ++j) s += std::exp(double(x[j]) - m);
    const double lse = m + std::log(s);
    if (a.lse) a.lse[r] = float(lse);
    const bool ignored = t == a.ignore_index;
    const bool valid = !ignored && t >= 0 && t < a.vocab;
    a.loss[r] = ignored ? 0.f : valid ? float(lse - double(x[t])) : std::numeric_limits<float>::quiet_NaN();
    if (!a.write_grad) continue;
    const double scale = valid ? double(*a.grad_scale) : 0.0;
    for (int64_t j = 0; j < a.vocab; ++j) {
      const double p = std::exp(double(x[j]) - lse);
      x[j] = float((p - (j == t ? 1.0 : 0.0)) * scale);
    }
  }
}

}  // namespace ablate::kernels
