#include "kernels/rope.h"

namespace ablate::kernels {
namespace {

void rope_ref(const RopeArgs& a, bool backward) {
  const int64_t half = a.head_dim / 2;
  for (const RopeTensor& t : a.t) {
    const float* x = static_cast<const float*>(t.x);
    float* y = static_cast<float*>(t.y);
    for (int64_t i0 = 0; i0 < t.n[0]; ++i0)
      for (int64_t i1 = 0; i1 < t.n[1]; ++i1)
        for (int64_t i2 = 0; i2 < t.n[2]; ++i2) {
          const int64_t idx[3] = {i0, i1, i2};
          const int64_t p = idx[t.pos_dim];
          const float* xr = x + i0 * t.xs[0] + i1 * t.xs[1] + i2 * t.xs[2];
          float* yr = y + i0 * t.ys[0] + i1 * t.ys[1] + i2 * t.ys[2];
          const float* c = a.cos + p * a.head_dim;
          const float* s = a.sin + p * a.head_dim;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = xr[i], x2 = xr[i + half];
            if (!backward) {
              yr[i] = x1 * c[i] - x2 * s[i];
              yr[i + half] = x2 * c[i + half] + x1 * s[i + half];
            } else {
              yr[i] = x1 * c[i] + x2 * s[i + half];
              yr[i + half] = x2 * c[i + half] - x1 * s[i];
            }
          }
        }
  }
}

}  // namespace

void rope_forward_ref(const RopeArgs& a) { rope_ref(a, false); }
void rope_backward_ref(const RopeArgs& a) { rope_ref(a, true); }

}  // namespace ablate::kernels
