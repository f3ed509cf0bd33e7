// CPU reference for the fused low-bit AdamW step (see kernels/adam_lowbit.h for the equations).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/adam_lowbit.h"

namespace ablate::kernels {

void adam_lowbit_step_ref(const AdamLowbitArgs& a) {
  const int64_t nblocks = a.n / a.block;
  const float lr_wd = a.lr * a.weight_decay;
  const float sqrt_bc2 = std::sqrt(a.bias_correction2);
  std::vector<float> m(static_cast<size_t>(a.block)), v(static_cast<size_t>(a.block));
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t lo = b * a.block;
    float m_amax = 0.f, v_amax = 0.f;
    for (int64_t j = 0; j < a.block; ++j) {
      const int64_t i = lo + j;
      const float mo = a.m_qmap[quant_code_at(a.m_codes, i, a.bits)] * a.m_scale[b];
      const float vo = a.v_qmap[quant_code_at(a.v_codes, i, a.bits)] * a.v_scale[b];
      const float g = a.g[i];
      float p = a.p[i];
      p = p - lr_wd * p;
      const float mn = mo + (1.f - a.beta1) * (g - mo);
      const float vn = vo + (1.f - a.beta2) * (g * g - vo);
      p = p - a.lr * (mn / a.bias_correction1) / (std::sqrt(vn) / sqrt_bc2 + a.eps);
      a.p[i] = p;
      m[j] = mn;
      v[j] = vn;
      m_amax = std::max(m_amax, std::fabs(mn));
      v_amax = std::max(v_amax, std::fabs(vn));
    }
    const float sm = std::max(m_amax, 1e-12f), sv = std::max(v_amax, 1e-12f);
    a.m_scale[b] = sm;
    a.v_scale[b] = sv;
    for (int64_t j = 0; j < a.block; ++j) {
      const int64_t i = lo + j;
      const uint32_t cm = quant_nearest_code(m[j] / sm, a.m_qmap, a.bits);
      const uint32_t cv = quant_nearest_code(v[j] / sv, a.v_qmap, a.bits);
      if (a.bits == 8) {
        a.m_codes[i] = static_cast<uint8_t>(cm);
        a.v_codes[i] = static_cast<uint8_t>(cv);
      } else if ((i & 1) == 0) {
        a.m_codes[i >> 1] = static_cast<uint8_t>(cm << 4);
        a.v_codes[i >> 1] = static_cast<uint8_t>(cv << 4);
      } else {
        a.m_codes[i >> 1] = static_cast<uint8_t>(a.m_codes[i >> 1] | cm);
        a.v_codes[i >> 1] = static_cast<uint8_t>(a.v_codes[i >> 1] | cv);
      }
    }
  }
}

}  // namespace ablate::kernels
