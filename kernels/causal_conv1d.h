// Causal depthwise conv1d over time on the channels-last (B, T, C) layout, with an optional SiLU: the short
// convolution of Mamba2 and Gated DeltaNet (core/mixers/short_conv.cpp). Plain-pointer interface for the C++
// reference and the CUDA kernels; it replaces transpose + pad + torch::conv1d(groups = C) + transpose + silu.
//
// Contract, W = kernel width:
//   z[b,t,c] = bias[c] + sum_{j<W} w[c,j] * x[b, t-W+1+j, c]      (x = 0 at negative time; bias 0 when null)
//   y        = silu(z) if silu, else z
// Backward, given dy (z is recomputed from x):
//   dz        = dy * silu'(z)   (dy when not silu)
//   dx[b,s,c] = sum_{j<W} w[c,j] * dz[b, s+W-1-j, c]             (dz = 0 at time T and later)
//   dw[c,j]   = sum_{b,t} dz[b,t,c] * x[b, t-W+1+j, c],   dbias[c] = sum_{b,t} dz[b,t,c]
//
// Weight and bias gradients come back as fp32 partial sums, one per time range (deterministic: fixed ranges, no
// atomics). Every batch row's time axis is cut into ranges of kCausalConv1dTimeRange steps (the last one of a row
// shorter); range r = b * ceil(T / TR) + t0 / TR covers t0 <= t < min(t0 + TR, T) of row b, and
//   dwb[r, c, j] = sum_{t in range r} dz[b,t,c] * x[b, t-W+1+j, c]   (j < W)
//   dwb[r, c, W] = sum_{t in range r} dz[b,t,c]                       (the bias slot, written even without a bias)
// dwb is (causal_conv1d_num_ranges(B, T), C, W + 1), contiguous, every entry written; the caller sums over dim 0.
// The reference writes the same partial layout (its own sums over the same ranges).
//
// Layouts: x, y, dy, dx contiguous (B, T, C) in one element type (fp32, bf16 or fp16; fp32 only for the reference);
// w contiguous fp32 (C, W); bias fp32 (C) or null. Every sum and product accumulates in fp32.
//
// core/mixers/short_conv.cpp takes them by default on CUDA (ABLATE_CONV_FUSED=0 or short_conv_set_fused_enabled(false)
// turns them off). On the H200 (tests/mixers/causal_conv1d_gpu_test.cpp, 2026-11-30) at B1 T32K C2048 W4 bf16:
// forward 0.128 ms (2.1 TB/s), forward + backward 0.50 ms, 9.8x / 7.7x faster than the LibTorch composite.
#pragma once
#include <cstdint>

#include "kernels/nsa_select.h"  // NsaDtype: fp32 / bf16 / fp16

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

// Time steps per range of the weight-gradient partial sums (and per CUDA thread).
constexpr int64_t kCausalConv1dTimeRange = 64;
// Kernel widths the CUDA kernels take (one instantiation each); the reference takes any W >= 1.
constexpr int64_t kCausalConv1dMaxWidth = 8;

// Rows of the partial-sum buffer dwb: B * ceil(T / kCausalConv1dTimeRange) (0 when B or T is 0).
inline int64_t causal_conv1d_num_ranges(int64_t B, int64_t T) {
  return B <= 0 || T <= 0 ? 0 : B * ((T + kCausalConv1dTimeRange - 1) / kCausalConv1dTimeRange);
}

struct CausalConv1dShape {
  int64_t B = 0, T = 0, C = 0, W = 0;
  NsaDtype dtype = NsaDtype::kF32;
  bool silu = false;
};

struct CausalConv1dFwdArgs {
  CausalConv1dShape s;
  const void* x = nullptr;      // (B, T, C) dtype
  const float* w = nullptr;     // (C, W)
  const float* bias = nullptr;  // (C) or null
  void* y = nullptr;            // out, (B, T, C) dtype; may not alias x
};

struct CausalConv1dBwdArgs {
  CausalConv1dShape s;
  const void* x = nullptr;      // (B, T, C) dtype, the forward's input
  const float* w = nullptr;     // (C, W)
  const float* bias = nullptr;  // (C) or null
  const void* dy = nullptr;     // (B, T, C) dtype
  void* dx = nullptr;           // out, (B, T, C) dtype; may not alias x or dy
  float* dwb = nullptr;         // out, (causal_conv1d_num_ranges(B, T), C, W + 1): see above
};

// Plain C++ loops over fp32 data, the oracle of the kernels (same fp32 math, possibly another summation order).
// Return false, touching nothing, for a dtype other than fp32, W < 1, negative sizes or a missing pointer.
bool causal_conv1d_fwd_ref(const CausalConv1dFwdArgs& a);
bool causal_conv1d_bwd_ref(const CausalConv1dBwdArgs& a);

#if ABLATE_WITH_CUDA
// One thread per (channel, or channel pair for 16-bit data with an even C; time range) walks its range with the last
// W inputs in registers. cudaErrorInvalidValue for W outside 1..8, negative sizes, a missing pointer or C beyond the
// grid; else the launch status. All work goes to `stream`; nothing is launched when B, T or C is 0.
cudaError_t causal_conv1d_fwd_cuda(const CausalConv1dFwdArgs& a, cudaStream_t stream);
// Writes dx and every entry of dwb (one kernel).
cudaError_t causal_conv1d_bwd_cuda(const CausalConv1dBwdArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
