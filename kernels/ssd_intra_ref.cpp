// Plain C++ oracle of the SSD intra-chunk kernels (contract in kernels/ssd_intra.h): fp32 data, loops in the order
// the formulas are written.
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <vector>

#include "kernels/ssd_intra.h"

namespace ablate::kernels {
namespace {

void check_f32(const SsdIntraShape& s) {
  if (s.dtype != NsaDtype::kF32) throw std::invalid_argument("ssd_intra reference: fp32 data only");
  if (s.B <= 0 || s.nc <= 0 || s.L <= 0 || s.H <= 0 || s.G <= 0 || s.P <= 0 || s.H % s.G != 0) {
    throw std::invalid_argument("ssd_intra reference: bad shape");
  }
}

// Index helpers for one (b, c): cb row l of group g, xd/dy row l of head h, cs of head h.
struct Idx {
  const SsdIntraShape& s;
  size_t cb(int64_t b, int64_t g, int64_t c, int64_t l, int64_t m) const {
    return static_cast<size_t>((((b * s.G + g) * s.nc + c) * s.L + l) * s.L + m);
  }
  size_t x(int64_t b, int64_t c, int64_t l, int64_t h) const {
    return static_cast<size_t>(((b * s.nc * s.L + c * s.L + l) * s.H + h) * s.P);
  }
  size_t cs(int64_t b, int64_t h, int64_t c, int64_t l) const {
    return static_cast<size_t>(((b * s.H + h) * s.nc + c) * s.L + l);
  }
};

// Lmat[l][m] for one (b, h, c), the diagonal exactly 1.
float decay(const float* cs, const Idx& ix, int64_t b, int64_t h, int64_t c, int64_t l, int64_t m) {
  if (m > l) return 0.f;
  if (m == l) return 1.f;
  return std::exp(cs[ix.cs(b, h, c, l)] - cs[ix.cs(b, h, c, m)]);
}

}  // namespace

void ssd_intra_forward_ref(const SsdIntraFwdArgs& a) {
  const auto& s = a.s;
  check_f32(s);
  const Idx ix{s};
  const auto* cb = static_cast<const float*>(a.cb);
  const auto* xd = static_cast<const float*>(a.xd);
  const int64_t R = s.H / s.G;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < s.nc; ++c)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t l = 0; l < s.L; ++l) {
          float* y = a.y + ix.x(b, c, l, h);
          for (int64_t p = 0; p < s.P; ++p) y[p] = 0.f;
          for (int64_t m = 0; m <= l; ++m) {
            const float w = cb[ix.cb(b, h / R, c, l, m)] * decay(a.cs, ix, b, h, c, l, m);
            const float* x = xd + ix.x(b, c, m, h);
            for (int64_t p = 0; p < s.P; ++p) y[p] += w * x[p];
          }
        }
}

void ssd_intra_backward_ref(const SsdIntraBwdArgs& a) {
  const auto& s = a.s;
  check_f32(s);
  const Idx ix{s};
  const auto* cb = static_cast<const float*>(a.cb);
  const auto* xd = static_cast<const float*>(a.xd);
  const auto* dy = static_cast<const float*>(a.dy);
  const int64_t R = s.H / s.G;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t c = 0; c < s.nc; ++c)
      for (int64_t h = 0; h < s.H; ++h) {
        const int64_t g = h / R;
        for (int64_t m = 0; m < s.L; ++m) {
          float* dx = a.dxd + ix.x(b, c, m, h);
          for (int64_t p = 0; p < s.P; ++p) dx[p] = 0.f;
        }
        for (int64_t l = 0; l < s.L; ++l) {
          const float* dyl = dy + ix.x(b, c, l, h);
          for (int64_t m = 0; m <= l; ++m) {
            const float lm = decay(a.cs, ix, b, h, c, l, m);
            const float cbv = cb[ix.cb(b, g, c, l, m)];
            const float* xm = xd + ix.x(b, c, m, h);
            float* dxm = a.dxd + ix.x(b, c, m, h);
            float dot = 0.f;
            for (int64_t p = 0; p < s.P; ++p) {
              dxm[p] += cbv * lm * dyl[p];
              dot += dyl[p] * xm[p];
            }
            const float gh = dot * lm;
            a.dcb[ix.cb(b, g, c, l, m)] += gh;
            if (m < l) {
              a.dcs[ix.cs(b, h, c, l)] += gh * cbv;
              a.dcs[ix.cs(b, h, c, m)] -= gh * cbv;
            }
          }
        }
      }
}

}  // namespace ablate::kernels
