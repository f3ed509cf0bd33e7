// CUDA fused AdamW step with block-wise 8-bit or 4-bit moments (equations in kernels/adam_lowbit.h).
// One thread block per quantization block (256 for 8-bit, 128 for 4-bit by default), one element per
// thread: dequantize m, v -> fp32 AdamW update of p -> two block absmax reductions -> re-quantize with the
// shared-memory qmaps -> write codes (4-bit: neighbour nibbles joined by one shuffle) and scales.
// Bytes per element per step: p 4+4, g 4, m and v codes 2x(1 or 0.5) read and written, scales negligible:
// about 16 B (8-bit) or 14 B (4-bit); the step is HBM-bound. Explicit __f*_rn intrinsics keep the
// arithmetic free of FMA contraction, so results match adam_lowbit_step_ref up to sqrt/div rounding
// (both use IEEE-rounded sqrt and division here).
//
// The multi-tensor kernel (adam_lowbit_multi_step_cuda, design in kernels/adam_lowbit.h) follows it: one
// launch for many tensors, one warp per quantization block, float4 accesses, warp-shuffle reductions and
// re-quantization by counting precomputed decision thresholds; its per-lane code is kernels/adam_lowbit_multi.h.
#include "kernels/adam_lowbit.h"
#include "kernels/adam_lowbit_multi.h"
#include "kernels/cuda_common.cuh"

#include <cuda_runtime.h>

namespace ablate::kernels {
namespace {

using cuda_common::block_max;

__global__ void adam_lowbit_step_kernel(AdamLowbitArgs a) {
  __shared__ float qm[256];
  __shared__ float qv[256];
  __shared__ float red[32];
  const int nq = 1 << a.bits;
  for (int k = threadIdx.x; k < nq; k += blockDim.x) {
    qm[k] = a.m_qmap[k];
    qv[k] = a.v_qmap[k];
  }
  const int64_t b = blockIdx.x;
  const int64_t i = b * a.block + threadIdx.x;  // blockDim.x == a.block, n % block == 0
  const float mo = __fmul_rn(a.m_qmap[quant_code_at(a.m_codes, i, a.bits)], a.m_scale[b]);
  const float vo = __fmul_rn(a.v_qmap[quant_code_at(a.v_codes, i, a.bits)], a.v_scale[b]);
  const float g = a.g[i];
  float p = a.p[i];
  p = __fsub_rn(p, __fmul_rn(__fmul_rn(a.lr, a.weight_decay), p));
  const float mn = __fadd_rn(mo, __fmul_rn(__fsub_rn(1.f, a.beta1), __fsub_rn(g, mo)));
  const float vn = __fadd_rn(vo, __fmul_rn(__fsub_rn(1.f, a.beta2), __fsub_rn(__fmul_rn(g, g), vo)));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vn), __fsqrt_rn(a.bias_correction2)), a.eps);
  p = __fsub_rn(p, __fdiv_rn(__fmul_rn(a.lr, __fdiv_rn(mn, a.bias_correction1)), denom));
  a.p[i] = p;
  // The reductions also order the shared qmap loads before their use below.
  const float sm = fmaxf(block_max(fabsf(mn), red), 1e-12f);
  const float sv = fmaxf(block_max(fabsf(vn), red), 1e-12f);
  if (threadIdx.x == 0) {
    a.m_scale[b] = sm;
    a.v_scale[b] = sv;
  }
  const uint32_t cm = quant_nearest_code(__fdiv_rn(mn, sm), qm, a.bits);
  const uint32_t cv = quant_nearest_code(__fdiv_rn(vn, sv), qv, a.bits);
  if (a.bits == 8) {
    a.m_codes[i] = static_cast<uint8_t>(cm);
    a.v_codes[i] = static_cast<uint8_t>(cv);
  } else {
    const uint32_t cm_odd = __shfl_down_sync(0xffffffffu, cm, 1);
    const uint32_t cv_odd = __shfl_down_sync(0xffffffffu, cv, 1);
    if ((threadIdx.x & 1) == 0) {
      a.m_codes[i >> 1] = static_cast<uint8_t>((cm << 4) | cm_odd);
      a.v_codes[i >> 1] = static_cast<uint8_t>((cv << 4) | cv_odd);
    }
  }
}

namespace multi = adam_lowbit_multi;

// BITS: code width; G: groups of 4 elements per lane, block = 128·G; LUT: 8-bit bucket tables for the codes.
template <int BITS, int G, bool LUT>
__global__ void __launch_bounds__(multi::kWarps * 32) adam_lowbit_multi_kernel(const AdamLowbitMultiArgs a) {
  constexpr int NQ = 1 << BITS;
  constexpr int LUT_BYTES = LUT ? 2 * multi::kLutMaxRows * (1 << multi::kLutMantissaBits) : 16;
  __shared__ float qm[NQ], qv[NQ];  // sorted maps (dequantization)
  __shared__ float em[NQ], ev[NQ];  // thresholds: Eytzinger order, or sorted with LUT
  __shared__ __align__(16) uint8_t lm[LUT_BYTES], lv[LUT_BYTES];
  for (int k = threadIdx.x; k < NQ; k += blockDim.x) {
    qm[k] = a.m_qmap[k];
    qv[k] = a.v_qmap[k];
    em[k] = a.m_thresh[k];
    ev[k] = a.v_thresh[k];
  }
  if (LUT) {
    const int nm = a.m_lut_rows * (2 * (1 << multi::kLutMantissaBits) / 16);  // uint4 words
    const int nv = a.v_lut_rows * (2 * (1 << multi::kLutMantissaBits) / 16);
    for (int k = threadIdx.x; k < nm; k += blockDim.x)
      reinterpret_cast<uint4*>(lm)[k] = reinterpret_cast<const uint4*>(a.m_lut)[k];
    for (int k = threadIdx.x; k < nv; k += blockDim.x)
      reinterpret_cast<uint4*>(lv)[k] = reinterpret_cast<const uint4*>(a.v_lut)[k];
  }
  __syncthreads();  // the only barrier: from here on each warp works alone
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int64_t qb = static_cast<int64_t>(blockIdx.x) * (multi::kWarps * multi::kRounds) + warp;
  if (qb >= a.total_blocks) return;
  const multi::Consts c = multi::make_consts(a);
  multi::RequantTables tables{em, ev};
  if (LUT) {
    tables.lm = lm;
    tables.lv = lv;
    tables.m_elo = a.m_lut_elo;
    tables.m_rows = a.m_lut_rows;
    tables.v_elo = a.v_lut_elo;
    tables.v_rows = a.v_lut_rows;
  }
  int64_t t = multi::find_tensor(a.tensors, a.num_tensors, qb);
  for (int r = 0; r < multi::kRounds && qb < a.total_blocks; ++r, qb += multi::kWarps) {
    while (t + 1 < a.num_tensors && a.tensors[t + 1].block_start <= qb) ++t;
    const AdamLowbitTensorDesc d = a.tensors[t];
    const int64_t lb = qb - d.block_start;
    float mn[G][4], vn[G][4];
    float am, av;
    multi::lane_update<BITS, G>(d, lb, lane, c, qm, qv, mn, vn, am, av);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, o));
      av = fmaxf(av, __shfl_xor_sync(0xffffffffu, av, o));
    }
    const float sm = fmaxf(am, 1e-12f), sv = fmaxf(av, 1e-12f);
    // Every lane has read the old scales (they fed am, av through the shuffles) before lane 0 overwrites them.
    if (lane == 0) {
      d.m_scale[lb] = sm;
      d.v_scale[lb] = sv;
    }
    multi::lane_requantize<BITS, G, LUT>(d, lb, lane, mn, vn, sm, sv, tables);
  }
}

template <int BITS, int G, bool LUT>
cudaError_t launch_multi(const AdamLowbitMultiArgs& a, cudaStream_t stream) {
  constexpr int64_t per_cta = multi::kWarps * multi::kRounds;
  const int64_t grid = (a.total_blocks + per_cta - 1) / per_cta;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  adam_lowbit_multi_kernel<BITS, G, LUT><<<static_cast<unsigned>(grid), multi::kWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t adam_lowbit_multi_step_cuda(const AdamLowbitMultiArgs& a, cudaStream_t stream) {
  if (a.num_tensors == 0 || a.total_blocks == 0) return cudaSuccess;
  if (!adam_lowbit_multi_supported(a.block, a.bits) || a.tensors == nullptr || a.m_thresh == nullptr ||
      a.v_thresh == nullptr)
    return cudaErrorInvalidValue;
  const bool lut = a.m_lut != nullptr || a.v_lut != nullptr;
  if (lut && (a.bits != 8 || !a.m_lut || !a.v_lut || a.m_lut_rows < 3 || a.m_lut_rows > multi::kLutMaxRows ||
              a.v_lut_rows < 3 || a.v_lut_rows > multi::kLutMaxRows))
    return cudaErrorInvalidValue;
  const int G = static_cast<int>(a.block / 128);
  if (a.bits == 8 && lut) {
    if (G == 1) return launch_multi<8, 1, true>(a, stream);
    if (G == 2) return launch_multi<8, 2, true>(a, stream);
    return launch_multi<8, 4, true>(a, stream);
  }
  if (a.bits == 8) {
    if (G == 1) return launch_multi<8, 1, false>(a, stream);
    if (G == 2) return launch_multi<8, 2, false>(a, stream);
    return launch_multi<8, 4, false>(a, stream);
  }
  if (G == 1) return launch_multi<4, 1, false>(a, stream);
  if (G == 2) return launch_multi<4, 2, false>(a, stream);
  return launch_multi<4, 4, false>(a, stream);
}

cudaError_t adam_lowbit_step_cuda(const AdamLowbitArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  if (a.block <= 0 || a.block > 1024 || a.block % 32 != 0 || a.n % a.block != 0) return cudaErrorInvalidValue;
  adam_lowbit_step_kernel<<<static_cast<unsigned>(a.n / a.block), static_cast<unsigned>(a.block), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace ablate::kernels
