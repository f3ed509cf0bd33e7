#include "kernels/swiglu.h"

#include <cmath>

namespace ablate::kernels {

void swiglu_forward_ref(const SwiGLUFwdArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* g = static_cast<const float*>(a.gate) + r * a.gate_stride;
    const float* u = static_cast<const float*>(a.up) + r * a.up_stride;
    float* o = static_cast<float*>(a.out) + r * a.out_stride;
    for (int64_t c = 0; c < a.cols; ++c) {
      const double s = 1.0 / (1.0 + std::exp(-double(g[c])));
      o[c] = float(double(g[c]) * s * double(u[c]));
    }
  }
}

void swiglu_backward_ref(const SwiGLUBwdArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* dy = static_cast<const float*>(a.dout) + r * a.dout_stride;
    const float* g = static_cast<const float*>(a.gate) + r * a.gate_stride;
    const float* u = static_cast<const float*>(a.up) + r * a.up_stride;
    float* dg = static_cast<float*>(a.dgate) + r * a.dgate_stride;
    float* du = static_cast<float*>(a.dup) + r * a.dup_stride;
    for (int64_t c = 0; c < a.cols; ++c) {
      const double gd = g[c], s = 1.0 / (1.0 + std::exp(-gd));
      dg[c] = float(double(dy[c]) * double(u[c]) * s * (1.0 + gd * (1.0 - s)));
      du[c] = float(double(dy[c]) * gd * s);
    }
  }
}

}  // namespace ablate::kernels
