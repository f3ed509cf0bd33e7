// CUDA RoPE, forward and backward, fp32 and bf16 (math in fp32, one rounding on the store).
// Work item = (tensor, row, j): V consecutive pairs (x[jV..jV+V), x[half+jV..half+jV+V)) of one row, V = 16 bytes
// of the element type when every pointer and stride allows it (else V = 1). Items are numbered with j fastest,
// then n[2], n[1], n[0], so a warp touches consecutive 16-byte pieces of consecutive rows: for [B, T, H, hd]
// memory (the model's q/k, seen through either view) that is a contiguous stream. The cos/sin tables are tiny
// next to q/k ([T, hd] fp32, reused by every head and batch), so they come from L2. Both tensors (q and k) go
// in one launch: items [0, work0) are t[0]'s, the rest t[1]'s. Row decomposition uses 32-bit division when the
// item count allows (the common case), 64-bit otherwise.
#include "kernels/rope.h"
#include "kernels/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ablate::kernels {
namespace {

constexpr int kThreads = 256;

using namespace cuda_common;  // Vec, to_f, from_f, load, store

template <typename T, int V, typename I>
__device__ __forceinline__ void rope_item(const RopeTensor& t, I item, I nv, int64_t half, int64_t hd,
                                          const float* __restrict__ cos, const float* __restrict__ sin,
                                          bool backward) {
  const I j = item % nv;
  I r = item / nv;
  const I n2 = static_cast<I>(t.n[2]), n1 = static_cast<I>(t.n[1]);
  const I i2 = r % n2;
  r /= n2;
  const I i1 = r % n1;
  const I i0 = r / n1;
  const int64_t p = t.pos_dim == 0 ? int64_t(i0) : (t.pos_dim == 1 ? int64_t(i1) : int64_t(i2));
  const int64_t d = int64_t(j) * V;
  const T* x = static_cast<const T*>(t.x) + int64_t(i0) * t.xs[0] + int64_t(i1) * t.xs[1] + int64_t(i2) * t.xs[2] + d;
  T* y = static_cast<T*>(t.y) + int64_t(i0) * t.ys[0] + int64_t(i1) * t.ys[1] + int64_t(i2) * t.ys[2] + d;
  const float* c = cos + p * hd + d;
  const float* s = sin + p * hd + d;
  float x1[V], x2[V], c1[V], c2[V], s1[V], s2[V], y1[V], y2[V];
  load<T, V>(x, x1);
  load<T, V>(x + half, x2);
  load<float, V>(c, c1);
  load<float, V>(c + half, c2);
  load<float, V>(s, s1);
  load<float, V>(s + half, s2);
  if (!backward) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      y1[i] = x1[i] * c1[i] - x2[i] * s1[i];
      y2[i] = x2[i] * c2[i] + x1[i] * s2[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      y1[i] = x1[i] * c1[i] + x2[i] * s2[i];
      y2[i] = x2[i] * c2[i] - x1[i] * s1[i];
    }
  }
  store<T, V>(y, y1);
  store<T, V>(y + half, y2);
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads) rope_kernel(RopeArgs a, I work0, I total, bool backward) {
  const int64_t half = a.head_dim / 2;
  const I nv = static_cast<I>(half / V);
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I w = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; w < total; w += stride) {
    if (w < work0)
      rope_item<T, V, I>(a.t[0], w, nv, half, a.head_dim, a.cos, a.sin, backward);
    else
      rope_item<T, V, I>(a.t[1], w - work0, nv, half, a.head_dim, a.cos, a.sin, backward);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t rows_of(const RopeTensor& t) { return t.n[0] * t.n[1] * t.n[2]; }

template <typename T, int V, typename I>
cudaError_t launch_typed(const RopeArgs& a, int64_t work0, int64_t total, bool backward, cudaStream_t stream) {
  // Enough blocks for one item per thread, capped; the grid-stride loop covers the rest.
  const int64_t blocks64 = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < (int64_t(1) << 20) ? blocks64 : (int64_t(1) << 20));
  rope_kernel<T, V, I><<<blocks, kThreads, 0, stream>>>(a, static_cast<I>(work0), static_cast<I>(total), backward);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const RopeArgs& a, bool backward, cudaStream_t stream) {
  if (a.head_dim <= 0 || a.head_dim % 2 != 0) return cudaErrorInvalidValue;
  const int64_t half = a.head_dim / 2;
  constexpr int kV = 16 / sizeof(T);
  bool vec = half % kV == 0 && aligned16(a.cos) && aligned16(a.sin);
  for (const RopeTensor& t : a.t) {
    if (rows_of(t) == 0) continue;
    vec = vec && aligned16(t.x) && aligned16(t.y);
    for (int d = 0; d < 3; ++d) vec = vec && t.xs[d] % kV == 0 && t.ys[d] % kV == 0;
  }
  const int64_t nv = vec ? half / kV : half;
  const int64_t work0 = rows_of(a.t[0]) * nv;
  const int64_t total = work0 + rows_of(a.t[1]) * nv;
  if (total == 0) return cudaSuccess;
  // total + gridDim * kThreads must not overflow I in the grid-stride loop.
  const bool small = total < (int64_t(1) << 30);
  if (vec) {
    return small ? launch_typed<T, kV, uint32_t>(a, work0, total, backward, stream)
                 : launch_typed<T, kV, int64_t>(a, work0, total, backward, stream);
  }
  return small ? launch_typed<T, 1, uint32_t>(a, work0, total, backward, stream)
               : launch_typed<T, 1, int64_t>(a, work0, total, backward, stream);
}

}  // namespace

cudaError_t rope_forward_cuda(const RopeArgs& a, cudaStream_t stream) {
  return a.bf16 ? launch<__nv_bfloat16>(a, false, stream) : launch<float>(a, false, stream);
}

cudaError_t rope_backward_cuda(const RopeArgs& a, cudaStream_t stream) {
  return a.bf16 ? launch<__nv_bfloat16>(a, true, stream) : launch<float>(a, true, stream);
}

}  // namespace ablate::kernels
