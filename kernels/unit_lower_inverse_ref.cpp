// C++ reference of the unit lower-triangular inverse (see unit_lower_inverse.h).
#include "kernels/unit_lower_inverse.h"

namespace ablate::kernels {

void unit_lower_inverse_ref(const UnitLowerInverseArgs& args) {
  const int64_t n = args.n;
  for (int64_t b = 0; b < args.batch; ++b) {
    const float* a = args.a + b * n * n;
    float* t = args.t + b * n * n;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        if (j > i) {
          t[i * n + j] = 0.f;
          continue;
        }
        float acc = i == j ? 1.f : 0.f;
        for (int64_t k = j; k < i; ++k) acc -= a[i * n + k] * t[k * n + j];
        t[i * n + j] = acc;
      }
  }
}

}  // namespace ablate::kernels
