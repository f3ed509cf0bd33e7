// Device helpers shared by the elementwise/row kernels: vectorized (up to 16-byte) loads and stores that
// convert to and from fp32, the accumulation type of every kernel here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ablate::kernels::cuda_common {

// V elements of T moved as one aligned access (16 bytes when V·sizeof(T) allows).
template <typename T, int V>
struct alignas(sizeof(T) * V >= 16 ? 16 : sizeof(T) * V) Vec {
  T v[V];
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
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

}  // namespace ablate::kernels::cuda_common
