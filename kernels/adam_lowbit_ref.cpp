// CPU reference for the fused low-bit AdamW step (see kernels/adam_lowbit.h for the equations).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/adam_lowbit.h"
#include "kernels/adam_lowbit_multi.h"

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

namespace {

template <int BITS, int G, bool LUT>
void multi_emulated(const AdamLowbitMultiArgs& a) {
  namespace multi = adam_lowbit_multi;
  constexpr int NQ = 1 << BITS;
  float qm[NQ], qv[NQ], em[NQ], ev[NQ];
  for (int k = 0; k < NQ; ++k) {
    qm[k] = a.m_qmap[k];
    qv[k] = a.v_qmap[k];
    em[k] = a.m_thresh[k];
    ev[k] = a.v_thresh[k];
  }
  const multi::Consts c = multi::make_consts(a);
  multi::RequantTables tables{em, ev};
  if (LUT) {
    tables.lm = a.m_lut;
    tables.lv = a.v_lut;
    tables.m_elo = a.m_lut_elo;
    tables.m_rows = a.m_lut_rows;
    tables.v_elo = a.v_lut_elo;
    tables.v_rows = a.v_lut_rows;
  }
  constexpr int64_t per_cta = multi::kWarps * multi::kRounds;
  const int64_t grid = (a.total_blocks + per_cta - 1) / per_cta;
  std::vector<float> mn(multi::kLanes * G * 4), vn(multi::kLanes * G * 4);
  for (int64_t cta = 0; cta < grid; ++cta) {
    for (int warp = 0; warp < multi::kWarps; ++warp) {
      int64_t qb = cta * per_cta + warp;
      if (qb >= a.total_blocks) continue;
      int64_t t = multi::find_tensor(a.tensors, a.num_tensors, qb);
      for (int r = 0; r < multi::kRounds && qb < a.total_blocks; ++r, qb += multi::kWarps) {
        while (t + 1 < a.num_tensors && a.tensors[t + 1].block_start <= qb) ++t;
        const AdamLowbitTensorDesc d = a.tensors[t];
        const int64_t lb = qb - d.block_start;
        float am = 0.f, av = 0.f;
        for (int lane = 0; lane < multi::kLanes; ++lane) {
          auto& m = *reinterpret_cast<float(*)[G][4]>(&mn[lane * G * 4]);
          auto& v = *reinterpret_cast<float(*)[G][4]>(&vn[lane * G * 4]);
          float lm, lv;
          multi::lane_update<BITS, G>(d, lb, lane, c, qm, qv, m, v, lm, lv);
          am = multi::f_max(am, lm);
          av = multi::f_max(av, lv);
        }
        const float sm = multi::f_max(am, 1e-12f), sv = multi::f_max(av, 1e-12f);
        d.m_scale[lb] = sm;
        d.v_scale[lb] = sv;
        for (int lane = 0; lane < multi::kLanes; ++lane) {
          const auto& m = *reinterpret_cast<const float(*)[G][4]>(&mn[lane * G * 4]);
          const auto& v = *reinterpret_cast<const float(*)[G][4]>(&vn[lane * G * 4]);
          multi::lane_requantize<BITS, G, LUT>(d, lb, lane, m, v, sm, sv, tables);
        }
      }
    }
  }
}

}  // namespace

namespace {
// Order-preserving map of fp32 values (not NaN) to uint32 and back: -0 and +0 are adjacent.
uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

namespace {
// U_1..U_top in u[1..top] (u[0] = 0, unused): U_j = the smallest fp32 x with quant_nearest_code(x) >= j.
std::vector<float> sorted_thresholds(const float* qmap, int bits) {
  const int nq = 1 << bits;
  // x in [q[j-1], q[j]) has c = j-1 and code j exactly when x - q[j-1] >= (q[j] - q[j-1]) * 0.5f (fp32, as
  // quant_nearest_code); that test is monotone in x and holds at x = q[j], and x >= q[j] has code >= j.
  std::vector<float> u(static_cast<size_t>(nq), 0.f);
  for (int j = 1; j < nq; ++j) {
    const float down = qmap[j - 1], up = qmap[j];
    const float half = (up - down) * 0.5f;
    uint32_t lo = float_key(down), hi = float_key(up);
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (key_float(mid) - down >= half)
        hi = mid;
      else
        lo = mid + 1;
    }
    u[static_cast<size_t>(j)] = key_float(lo);
  }
  return u;
}

float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
}  // namespace

void adam_lowbit_code_thresholds(const float* qmap, int bits, float* out) {
  const int nq = 1 << bits;
  const std::vector<float> u = sorted_thresholds(qmap, bits);
  out[0] = 0.f;
  for (int k = 1; k < nq; ++k) out[k] = u[static_cast<size_t>(adam_lowbit_multi::eytzinger_source(k, bits))];
}

bool adam_lowbit_code_lut(const float* qmap, int bits, uint8_t* lut, float* sorted, int* elo, int* rows) {
  namespace multi = adam_lowbit_multi;
  if (bits != 8) return false;
  const int nq = 1 << bits;
  const std::vector<float> u = sorted_thresholds(qmap, bits);
  for (int k = 0; k + 1 < nq; ++k) sorted[k] = u[static_cast<size_t>(k + 1)];
  sorted[nq - 1] = std::numeric_limits<float>::quiet_NaN();  // never reached: x >= NaN is false
  int lo_e = 255, hi_e = -1;
  for (int j = 1; j < nq; ++j) {
    uint32_t b;
    std::memcpy(&b, &u[static_cast<size_t>(j)], 4);
    const int e = static_cast<int>((b >> 23) & 0xFFu);
    if (e == 255) return false;
    if (e >= 1) {  // zero and subnormal thresholds fall in the "tiny" row
      lo_e = std::min(lo_e, e);
      hi_e = std::max(hi_e, e);
    }
  }
  if (hi_e < 0) return false;
  const int r_count = hi_e - lo_e + 3;
  if (r_count > multi::kLutMaxRows) return false;
  *elo = lo_e;
  *rows = r_count;
  const uint32_t cols = 1u << multi::kLutMantissaBits, col_shift = 23 - multi::kLutMantissaBits;
  std::memset(lut, 0, static_cast<size_t>(2 * multi::kLutMaxRows) * cols);
  for (uint32_t sgn = 0; sgn < 2; ++sgn) {
    for (int r = 0; r < r_count; ++r) {
      for (uint32_t col = 0; col < cols; ++col) {
        // The bucket's magnitudes (fp32 bit patterns without the sign), as code_by_lut assigns them.
        uint32_t mag_lo, mag_hi;
        if (r == 0) {
          mag_lo = 0;
          mag_hi = (static_cast<uint32_t>(lo_e) << 23) - 1;
        } else if (r == r_count - 1) {
          mag_lo = static_cast<uint32_t>(hi_e + 1) << 23;
          mag_hi = 0x7F800000u;  // +inf
        } else {
          mag_lo = (static_cast<uint32_t>(lo_e + r - 1) << 23) | (col << col_shift);
          mag_hi = mag_lo | ((1u << col_shift) - 1);
        }
        if ((r == 0 || r == r_count - 1) && col != 0) {
          // Unused (code_by_lut reads column 0 of these rows); copy column 0 anyway.
          lut[(sgn * r_count + r) * cols + col] = lut[(sgn * r_count + r) * cols];
          continue;
        }
        const float a = bits_float(mag_lo | (sgn << 31)), b = bits_float(mag_hi | (sgn << 31));
        const float v_min = sgn ? b : a, v_max = sgn ? a : b;
        const uint32_t c_lo = quant_nearest_code(v_min, qmap, bits), c_hi = quant_nearest_code(v_max, qmap, bits);
        if (c_hi < c_lo || c_hi - c_lo > 1) return false;  // two thresholds in one bucket
        lut[(sgn * r_count + r) * cols + col] = static_cast<uint8_t>(c_lo);
      }
    }
  }
  return true;
}

void adam_lowbit_multi_step_emulated(const AdamLowbitMultiArgs& a) {
  if (a.num_tensors == 0 || a.total_blocks == 0) return;
  if (!adam_lowbit_multi_supported(a.block, a.bits) || !a.m_thresh || !a.v_thresh) return;
  const int G = static_cast<int>(a.block / 128);
  const bool lut = a.bits == 8 && a.m_lut && a.v_lut;
  if (lut) {
    if (G == 1) return multi_emulated<8, 1, true>(a);
    if (G == 2) return multi_emulated<8, 2, true>(a);
    return multi_emulated<8, 4, true>(a);
  }
  if (a.bits == 8) {
    if (G == 1) return multi_emulated<8, 1, false>(a);
    if (G == 2) return multi_emulated<8, 2, false>(a);
    return multi_emulated<8, 4, false>(a);
  }
  if (G == 1) return multi_emulated<4, 1, false>(a);
  if (G == 2) return multi_emulated<4, 2, false>(a);
  return multi_emulated<4, 4, false>(a);
}

}  // namespace ablate::kernels
