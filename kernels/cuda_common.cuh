// Device helpers shared by the kernels: vectorized (up to 16-byte) loads and stores that convert to and from
// fp32, the accumulation type of every kernel here, warp- and block-wide reductions, and a 16-byte row copy into
// shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ablate::kernels::cuda_common {

// V elements of T moved as one aligned access (16 bytes when V·sizeof(T) allows).
template <typename T, int V>
struct alignas(sizeof(T) * V >= 16 ? 16 : sizeof(T) * V) Vec {
  T v[V];
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

// p must be aligned to sizeof(Vec<T, V>).
template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Vec<T, V> r = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_f(r.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Vec<T, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec<T, V>*>(p) = r;
}

// Maximum / sum of v over the warp, returned to every lane (all 32 lanes must call it).
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Copies ROWS rows of D elements of T (row r from src(r), zeros where src(r) is null) into dst[r * LD], as raw
// 16-byte vectors, all loads of a thread issued before its stores. NT threads call it; src rows and dst rows must be
// 16-byte aligned. The caller synchronizes before reading dst.
template <typename T, int D, int LD, int ROWS, int NT, typename Src>
__device__ __forceinline__ void copy_rows(T* dst, Src src) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  static_assert(D % V == 0 && LD % V == 0, "rows must be whole 16-byte vectors");
  constexpr int PER_ROW = D / V;
  constexpr int TOTAL = ROWS * PER_ROW;
  constexpr int ITER = (TOTAL + NT - 1) / NT;
  uint4 x[ITER];
#pragma unroll
  for (int i = 0; i < ITER; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * NT;
    x[i] = make_uint4(0u, 0u, 0u, 0u);
    if (TOTAL % NT == 0 || idx < TOTAL) {
      const T* s = src(idx / PER_ROW);
      if (s != nullptr) x[i] = *reinterpret_cast<const uint4*>(s + (idx % PER_ROW) * V);
    }
  }
#pragma unroll
  for (int i = 0; i < ITER; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * NT;
    if (TOTAL % NT == 0 || idx < TOTAL) {
      *reinterpret_cast<uint4*>(dst + (idx / PER_ROW) * LD + (idx % PER_ROW) * V) = x[i];
    }
  }
}

// Maximum of v over the thread block, returned to every thread. shm: at least 32 floats of shared memory;
// every thread of the block must call it (it synchronizes).
__device__ inline float block_max(float v, float* shm) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < nwarps) ? shm[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x == 0) shm[0] = v;
  __syncthreads();
  const float r = shm[0];
  __syncthreads();
  return r;
}

}  // namespace ablate::kernels::cuda_common
