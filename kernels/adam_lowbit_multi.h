// Internal: the per-lane pieces of the multi-tensor low-bit AdamW kernel (kernels/adam_lowbit.h, "multi-tensor
// step"), written once as host/device functions so that the CUDA kernel (adam_lowbit_cuda.cu) and its CPU
// emulation (adam_lowbit_multi_step_emulated in adam_lowbit_ref.cpp, run by the CPU tests) execute the same
// indexing, packing and arithmetic. Included by those two files only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/adam_lowbit.h"
#include "kernels/quant.h"

#if defined(__CUDACC__)
#define ABLATE_ALB_UNROLL _Pragma("unroll")
#else
#define ABLATE_ALB_UNROLL
#endif

#if defined(__CUDA_ARCH__)
#define ABLATE_ALB_DEV 1
#else
#define ABLATE_ALB_DEV 0
#endif

namespace ablate::kernels::adam_lowbit_multi {

constexpr int kWarps = 8;   // warps per thread block
constexpr int kRounds = 8;  // quantization blocks per warp: a thread block covers kWarps * kRounds of them
constexpr int kLanes = 32;
constexpr int kLutMantissaBits = 7;  // bucket columns of the 8-bit re-quantization table
constexpr int kLutMaxRows = 32;      // exponent rows it may have (shared memory: 2 * 32 * 128 bytes a map)

// IEEE round-to-nearest fp32 operations, never contracted into FMAs (the CPU reference is compiled for
// baseline x86-64, which has no FMA, so plain operators there are these).
ABLATE_HOST_DEVICE inline float f_add(float a, float b) {
#if ABLATE_ALB_DEV
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ABLATE_HOST_DEVICE inline float f_sub(float a, float b) {
#if ABLATE_ALB_DEV
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ABLATE_HOST_DEVICE inline float f_mul(float a, float b) {
#if ABLATE_ALB_DEV
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ABLATE_HOST_DEVICE inline float f_div(float a, float b) {
#if ABLATE_ALB_DEV
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
ABLATE_HOST_DEVICE inline float f_sqrt(float a) {
#if ABLATE_ALB_DEV
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
ABLATE_HOST_DEVICE inline float f_max(float a, float b) {
#if ABLATE_ALB_DEV
  return fmaxf(a, b);
#else
  return a < b ? b : a;  // std::max(a, b), as adam_lowbit_step_ref
#endif
}

ABLATE_HOST_DEVICE inline float f_abs(float a) {
#if ABLATE_ALB_DEV
  return fabsf(a);
#else
  return std::fabs(a);
#endif
}

// Entry k (1 <= k < 2^bits) of the Eytzinger (breadth-first) layout of a sorted map: the node at depth
// d = floor(log2 k) with path bits k - 2^d, i.e. the entry quant_nearest_code compares at that point.
ABLATE_HOST_DEVICE inline int eytzinger_source(int k, int bits) {
  int d = 0;
  while ((k >> (d + 1)) != 0) ++d;
  return ((k - (1 << d)) << (bits - d)) + (1 << (bits - 1 - d));
}

// quant_nearest_code(xn, qmap, BITS) as a pure search: the number of decision thresholds U_1..U_top (see
// adam_lowbit_code_thresholds) that xn reaches, found by a branchless descent of their Eytzinger copy `eyt`
// (entry 0 unused). Each level reads one of consecutive entries 2^d .. 2^(d+1)-1.
template <int BITS>
ABLATE_HOST_DEVICE inline uint32_t code_by_thresholds(float xn, const float* eyt) {
  // Node k kept as its byte offset 4k: one shift-add per level and the load address is base + offset.
  const char* base = reinterpret_cast<const char*>(eyt);
  uint32_t off = 4;
  ABLATE_ALB_UNROLL
  for (int level = 0; level < BITS; ++level)
    off = 2u * off + (xn >= *reinterpret_cast<const float*>(base + off) ? 4u : 0u);
  return (off >> 2) - (1u << BITS);
}

ABLATE_HOST_DEVICE inline uint32_t float_bits(float x) {
#if ABLATE_ALB_DEV
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

// quant_nearest_code(xn, qmap, 8) by the bucket table of adam_lowbit_code_lut (lut: its bytes, sorted: its
// sorted thresholds with the NaN sentinel): the count of thresholds at the bucket's lower end plus one compare.
ABLATE_HOST_DEVICE inline uint32_t code_by_lut(float xn, const uint8_t* lut, const float* sorted, int elo, int rows) {
  const uint32_t u = float_bits(xn);
  const int e = static_cast<int>((u >> 23) & 0xFFu);
  int r = e - elo + 1;
  r = r < 0 ? 0 : (r > rows - 1 ? rows - 1 : r);
  const uint32_t col = (r > 0 && r < rows - 1) ? ((u >> (23 - kLutMantissaBits)) & ((1u << kLutMantissaBits) - 1u)) : 0u;
  const uint32_t base = lut[(((u >> 31) * static_cast<uint32_t>(rows) + static_cast<uint32_t>(r)) << kLutMantissaBits) + col];
  const uint32_t c = base + (xn >= sorted[base] ? 1u : 0u);
  return xn != xn ? 0u : c;  // NaN: code 0, as quant_nearest_code
}

struct alignas(16) F4 {
  float v[4];
};

// Index of the tensor holding global quantization block qb: the largest t with tensors[t].block_start <= qb.
ABLATE_HOST_DEVICE inline int64_t find_tensor(const AdamLowbitTensorDesc* tensors, int64_t num_tensors, int64_t qb) {
  int64_t lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (tensors[mid].block_start <= qb)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Step constants hoisted out of the element loop (the same fp32 values the per-element code computes).
struct Consts {
  float lr, lr_wd, one_m_b1, one_m_b2, sqrt_bc2, bc1, eps;
};
ABLATE_HOST_DEVICE inline Consts make_consts(const AdamLowbitMultiArgs& a) {
  return {a.lr, f_mul(a.lr, a.weight_decay), f_sub(1.f, a.beta1), f_sub(1.f, a.beta2), f_sqrt(a.bias_correction2),
          a.bias_correction1, a.eps};
}

// Code k (0..3) of the group of 4 consecutive elements held in `word` (8-bit: 4 bytes; 4-bit: 2 bytes, element
// 2i in the high nibble of byte i, 2i+1 in the low one), little-endian as loaded.
template <int BITS>
ABLATE_HOST_DEVICE inline uint32_t group_code(uint32_t word, int k) {
  if (BITS == 8) return (word >> (8 * k)) & 0xFFu;
  const uint32_t byte = (word >> (8 * (k >> 1))) & 0xFFu;
  return (k & 1) ? (byte & 0x0Fu) : (byte >> 4);
}
template <int BITS>
ABLATE_HOST_DEVICE inline uint32_t group_word(const uint32_t (&c)[4]) {
  if (BITS == 8) return c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
  return ((c[0] << 4) | c[1]) | (((c[2] << 4) | c[3]) << 8);
}
template <int BITS>
ABLATE_HOST_DEVICE inline uint32_t load_group_codes(const uint8_t* codes, int64_t e) {
  if (BITS == 8) return *reinterpret_cast<const uint32_t*>(codes + e);
  return *reinterpret_cast<const uint16_t*>(codes + (e >> 1));
}
template <int BITS>
ABLATE_HOST_DEVICE inline void store_group_codes(uint8_t* codes, int64_t e, uint32_t w) {
  if (BITS == 8)
    *reinterpret_cast<uint32_t*>(codes + e) = w;
  else
    *reinterpret_cast<uint16_t*>(codes + (e >> 1)) = static_cast<uint16_t>(w);
}

// First element of group j of `lane` in local quantization block lb (block = 128 * G elements).
template <int G>
ABLATE_HOST_DEVICE inline int64_t group_start(int64_t lb, int j, int lane) {
  return lb * (128 * G) + 4 * (kLanes * j + lane);
}

// Phase 1 of one lane on local block lb of tensor d: dequantize, update p (stored), the new moments in mn/vn
// and the lane's absmax of each. qm, qv: the sorted maps.
template <int BITS, int G>
ABLATE_HOST_DEVICE inline void lane_update(const AdamLowbitTensorDesc& d, int64_t lb, int lane, const Consts& c,
                                           const float* qm, const float* qv, float (&mn)[G][4], float (&vn)[G][4],
                                           float& amax_m, float& amax_v) {
  const float sm_old = d.m_scale[lb], sv_old = d.v_scale[lb];
  amax_m = 0.f;
  amax_v = 0.f;
ABLATE_ALB_UNROLL
  for (int j = 0; j < G; ++j) {
    const int64_t e = group_start<G>(lb, j, lane);
    F4 p = *reinterpret_cast<const F4*>(d.p + e);
    const F4 g = *reinterpret_cast<const F4*>(d.g + e);
    const uint32_t wm = load_group_codes<BITS>(d.m_codes, e), wv = load_group_codes<BITS>(d.v_codes, e);
ABLATE_ALB_UNROLL
    for (int k = 0; k < 4; ++k) {
      const float mo = f_mul(qm[group_code<BITS>(wm, k)], sm_old);
      const float vo = f_mul(qv[group_code<BITS>(wv, k)], sv_old);
      const float gk = g.v[k];
      float pk = p.v[k];
      pk = f_sub(pk, f_mul(c.lr_wd, pk));
      const float m = f_add(mo, f_mul(c.one_m_b1, f_sub(gk, mo)));
      const float v = f_add(vo, f_mul(c.one_m_b2, f_sub(f_mul(gk, gk), vo)));
      const float denom = f_add(f_div(f_sqrt(v), c.sqrt_bc2), c.eps);
      pk = f_sub(pk, f_div(f_mul(c.lr, f_div(m, c.bc1)), denom));
      p.v[k] = pk;
      mn[j][k] = m;
      vn[j][k] = v;
      amax_m = f_max(amax_m, f_abs(m));
      amax_v = f_max(amax_v, f_abs(v));
    }
    *reinterpret_cast<F4*>(d.p + e) = p;
  }
}

// Where re-quantization looks codes up: the Eytzinger thresholds (LUT false) or the 8-bit bucket tables.
struct RequantTables {
  const float* em;  // Eytzinger thresholds, or sorted thresholds with LUT
  const float* ev;
  const uint8_t* lm = nullptr;
  const uint8_t* lv = nullptr;
  int m_elo = 0, m_rows = 0, v_elo = 0, v_rows = 0;
};

// Phase 2: re-quantize the lane's moments with the block scales sm, sv (absmax over the warp, floored at
// 1e-12) and store the codes.
template <int BITS, int G, bool LUT>
ABLATE_HOST_DEVICE inline void lane_requantize(const AdamLowbitTensorDesc& d, int64_t lb, int lane,
                                               const float (&mn)[G][4], const float (&vn)[G][4], float sm, float sv,
                                               const RequantTables& t) {
  ABLATE_ALB_UNROLL
  for (int j = 0; j < G; ++j) {
    const int64_t e = group_start<G>(lb, j, lane);
    uint32_t cm[4], cv[4];
    ABLATE_ALB_UNROLL
    for (int k = 0; k < 4; ++k) {
      const float xm = f_div(mn[j][k], sm), xv = f_div(vn[j][k], sv);
      if (LUT) {
        cm[k] = code_by_lut(xm, t.lm, t.em, t.m_elo, t.m_rows);
        cv[k] = code_by_lut(xv, t.lv, t.ev, t.v_elo, t.v_rows);
      } else {
        cm[k] = code_by_thresholds<BITS>(xm, t.em);
        cv[k] = code_by_thresholds<BITS>(xv, t.ev);
      }
    }
    store_group_codes<BITS>(d.m_codes, e, group_word<BITS>(cm));
    store_group_codes<BITS>(d.v_codes, e, group_word<BITS>(cv));
  }
}

}  // namespace ablate::kernels::adam_lowbit_multi
