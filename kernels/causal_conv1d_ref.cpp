// C++ reference of the causal depthwise conv1d (see causal_conv1d.h): the contract as written, fp32.
#include "kernels/causal_conv1d.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace ablate::kernels {
namespace {

bool shape_ok(const CausalConv1dShape& s) {
  return s.dtype == NsaDtype::kF32 && s.W >= 1 && s.B >= 0 && s.T >= 0 && s.C >= 0;
}

float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

// z[b,t,c] before the activation, summed over j in increasing order.
float conv_at(const float* x, const float* w, const float* bias, int64_t T, int64_t C, int64_t W, int64_t b, int64_t t,
              int64_t c) {
  float z = bias != nullptr ? bias[c] : 0.f;
  for (int64_t j = 0; j < W; ++j) {
    const int64_t ti = t - W + 1 + j;
    if (ti >= 0) z += w[c * W + j] * x[(b * T + ti) * C + c];
  }
  return z;
}

}  // namespace

bool causal_conv1d_fwd_ref(const CausalConv1dFwdArgs& a) {
  const auto& s = a.s;
  if (!shape_ok(s) || a.x == nullptr || a.w == nullptr || a.y == nullptr) return false;
  const auto* x = static_cast<const float*>(a.x);
  auto* y = static_cast<float*>(a.y);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t c = 0; c < s.C; ++c) {
        const float z = conv_at(x, a.w, a.bias, s.T, s.C, s.W, b, t, c);
        y[(b * s.T + t) * s.C + c] = s.silu ? z * sigmoid(z) : z;
      }
  return true;
}

bool causal_conv1d_bwd_ref(const CausalConv1dBwdArgs& a) {
  const auto& s = a.s;
  if (!shape_ok(s) || a.x == nullptr || a.w == nullptr || a.dy == nullptr || a.dx == nullptr || a.dwb == nullptr)
    return false;
  const auto* x = static_cast<const float*>(a.x);
  const auto* dy = static_cast<const float*>(a.dy);
  auto* dx = static_cast<float*>(a.dx);
  const int64_t B = s.B, T = s.T, C = s.C, W = s.W;
  // dz over the whole input first (z recomputed as in the forward).
  std::vector<float> dz(static_cast<size_t>(B * T * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = (b * T + t) * C + c;
        float g = dy[i];
        if (s.silu) {
          const float z = conv_at(x, a.w, a.bias, T, C, W, b, t, c);
          // silu'(z) = sig(z) (1 + z (1 - sig(z))), with 1 - sig(z) taken as sig(-z) (no cancellation).
          g *= sigmoid(z) * (1.f + z * sigmoid(-z));
        }
        dz[static_cast<size_t>(i)] = g;
      }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        float acc = 0.f;
        for (int64_t j = 0; j < W; ++j) {
          const int64_t tz = t + W - 1 - j;
          if (tz < T) acc += a.w[c * W + j] * dz[static_cast<size_t>((b * T + tz) * C + c)];
        }
        dx[(b * T + t) * C + c] = acc;
      }
  // Weight and bias partial sums per time range (causal_conv1d.h): row r of dwb is (C, W + 1).
  const int64_t per_row = causal_conv1d_num_ranges(1, T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < per_row; ++k) {
      const int64_t t0 = k * kCausalConv1dTimeRange, t1 = std::min(T, t0 + kCausalConv1dTimeRange);
      float* out = a.dwb + (b * per_row + k) * C * (W + 1);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j <= W; ++j) {
          float acc = 0.f;
          for (int64_t t = t0; t < t1; ++t) {
            const float g = dz[static_cast<size_t>((b * T + t) * C + c)];
            if (j == W) {
              acc += g;
            } else {
              const int64_t ti = t - W + 1 + j;
              if (ti >= 0) acc += g * x[(b * T + ti) * C + c];
            }
          }
          out[c * (W + 1) + j] = acc;
        }
    }
  return true;
}

}  // namespace ablate::kernels
