// CUDA SwiGLU, forward and backward, fp32 and bf16 (fp32 math, one rounding per output).
// Purely elementwise and memory-bound: item = V consecutive columns of one row, V = 16 bytes of the element type
// when every pointer and row stride allows it (else 1), items numbered column-fastest so each warp streams
// contiguous 16-byte pieces. Forward moves 3 x rows x cols elements, backward 5. sigmoid uses expf (not the
// fast __expf) so fp32 results stay within a few ulps of the double-precision reference at large |gate|; the
// backward's 1 - sigmoid(g) is computed as sigmoid(-g) (an extra exp is free in a memory-bound kernel).
#include "kernels/swiglu.h"
#include "kernels/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ablate::kernels {
namespace {

constexpr int kThreads = 256;

using namespace cuda_common;  // Vec, to_f, from_f, load, store

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads) fwd_kernel(SwiGLUFwdArgs a, I nv, I total) {
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I w = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; w < total; w += stride) {
    const int64_t r = int64_t(w / nv), c = int64_t(w % nv) * V;
    float g[V], u[V], o[V];
    load<T, V>(static_cast<const T*>(a.gate) + r * a.gate_stride + c, g);
    load<T, V>(static_cast<const T*>(a.up) + r * a.up_stride + c, u);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = g[i] * sigmoid(g[i]) * u[i];
    store<T, V>(static_cast<T*>(a.out) + r * a.out_stride + c, o);
  }
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads) bwd_kernel(SwiGLUBwdArgs a, I nv, I total) {
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I w = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; w < total; w += stride) {
    const int64_t r = int64_t(w / nv), c = int64_t(w % nv) * V;
    float dy[V], g[V], u[V], dg[V], du[V];
    load<T, V>(static_cast<const T*>(a.dout) + r * a.dout_stride + c, dy);
    load<T, V>(static_cast<const T*>(a.gate) + r * a.gate_stride + c, g);
    load<T, V>(static_cast<const T*>(a.up) + r * a.up_stride + c, u);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      // 1 - s as sigmoid(-g), not by subtraction: no cancellation when s is close to 1.
      const float s = sigmoid(g[i]), sm = sigmoid(-g[i]);
      dg[i] = dy[i] * u[i] * (s * (1.f + g[i] * sm));
      du[i] = dy[i] * (g[i] * s);
    }
    store<T, V>(static_cast<T*>(a.dgate) + r * a.dgate_stride + c, dg);
    store<T, V>(static_cast<T*>(a.dup) + r * a.dup_stride + c, du);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

unsigned grid_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < (int64_t(1) << 20) ? b : (int64_t(1) << 20));
}

template <typename T>
cudaError_t fwd(const SwiGLUFwdArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const bool vec = a.cols % kV == 0 && a.gate_stride % kV == 0 && a.up_stride % kV == 0 && a.out_stride % kV == 0 &&
                   aligned16(a.gate) && aligned16(a.up) && aligned16(a.out);
  const int64_t nv = vec ? a.cols / kV : a.cols, total = a.rows * nv;
  if (total == 0) return cudaSuccess;
  const unsigned grid = grid_for(total);
  const bool small = total < (int64_t(1) << 30);
  if (vec && small) fwd_kernel<T, kV, uint32_t><<<grid, kThreads, 0, stream>>>(a, uint32_t(nv), uint32_t(total));
  else if (vec) fwd_kernel<T, kV, int64_t><<<grid, kThreads, 0, stream>>>(a, nv, total);
  else if (small) fwd_kernel<T, 1, uint32_t><<<grid, kThreads, 0, stream>>>(a, uint32_t(nv), uint32_t(total));
  else fwd_kernel<T, 1, int64_t><<<grid, kThreads, 0, stream>>>(a, nv, total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const SwiGLUBwdArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const bool vec = a.cols % kV == 0 && a.dout_stride % kV == 0 && a.gate_stride % kV == 0 &&
                   a.up_stride % kV == 0 && a.dgate_stride % kV == 0 && a.dup_stride % kV == 0 &&
                   aligned16(a.dout) && aligned16(a.gate) && aligned16(a.up) && aligned16(a.dgate) &&
                   aligned16(a.dup);
  const int64_t nv = vec ? a.cols / kV : a.cols, total = a.rows * nv;
  if (total == 0) return cudaSuccess;
  const unsigned grid = grid_for(total);
  const bool small = total < (int64_t(1) << 30);
  if (vec && small) bwd_kernel<T, kV, uint32_t><<<grid, kThreads, 0, stream>>>(a, uint32_t(nv), uint32_t(total));
  else if (vec) bwd_kernel<T, kV, int64_t><<<grid, kThreads, 0, stream>>>(a, nv, total);
  else if (small) bwd_kernel<T, 1, uint32_t><<<grid, kThreads, 0, stream>>>(a, uint32_t(nv), uint32_t(total));
  else bwd_kernel<T, 1, int64_t><<<grid, kThreads, 0, stream>>>(a, nv, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t swiglu_forward_cuda(const SwiGLUFwdArgs& a, cudaStream_t stream) {
  return a.bf16 ? fwd<__nv_bfloat16>(a, stream) : fwd<float>(a, stream);
}

cudaError_t swiglu_backward_cuda(const SwiGLUBwdArgs& a, cudaStream_t stream) {
  return a.bf16 ? bwd<__nv_bfloat16>(a, stream) : bwd<float>(a, stream);
}

}  // namespace ablate::kernels
