// CUDA fused AdamW step with block-wise 8-bit or 4-bit moments (equations in kernels/adam_lowbit.h).
// One thread block per quantization block (256 for 8-bit, 128 for 4-bit by default), one element per
// thread: dequantize m, v -> fp32 AdamW update of p -> two block absmax reductions -> re-quantize with the
// shared-memory qmaps -> write codes (4-bit: neighbour nibbles joined by one shuffle) and scales.
// Bytes per element per step: p 4+4, g 4, m and v codes 2x(1 or 0.5) read and written, scales negligible:
// about 16 B (8-bit) or 14 B (4-bit); the step is HBM-bound. Explicit __f*_rn intrinsics keep the
// arithmetic free of FMA contraction, so results match adam_lowbit_step_ref up to sqrt/div rounding
// (both use IEEE-rounded sqrt and division here).
#include "kernels/adam_lowbit.h"
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

}  // namespace

cudaError_t adam_lowbit_step_cuda(const AdamLowbitArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  if (a.block <= 0 || a.block > 1024 || a.block % 32 != 0 || a.n % a.block != 0) return cudaErrorInvalidValue;
  adam_lowbit_step_kernel<<<static_cast<unsigned>(a.n / a.block), static_cast<unsigned>(a.block), 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace ablate::kernels
