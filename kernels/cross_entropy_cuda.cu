// CUDA cross-entropy over a chunk of logits with the gradient written in place (Liger's fused linear-CE step).
// One block per row. Pass 1 streams the row once (16-byte vectors; a scalar tail when vocab is not a multiple of
// the vector width) keeping a per-thread online (max, sum of exp) pair, combined across the block; thread 0 reads
// the target logit before any thread can overwrite it (pass 2 starts after the block reduction's barriers).
// Pass 2 streams the row again and overwrites it with (softmax - onehot) * grad_scale. Exponentials are exp2f on
// pre-scaled arguments; all statistics are fp32. grad_scale lives in device memory so the host never syncs.
#include "kernels/cross_entropy.h"
#include "kernels/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ablate::kernels {
namespace {

constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using namespace cuda_common;  // Vec, to_f, from_f, load, store

// (m, s) pairs in the log2 domain: the represented sum is s * 2^m.
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == -INFINITY) return;  // both empty
  s = s * exp2f(m - M) + s2 * exp2f(m2 - M);
  m = M;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) ce_kernel(CrossEntropyArgs a) {
  __shared__ float red_m[kThreads / 32], red_s[kThreads / 32];
  __shared__ float target_logit;
  const int64_t r = blockIdx.x;
  T* x = static_cast<T*>(a.logits) + r * a.ld;
  const int64_t t = a.targets[r];
  const bool ignored = t == a.ignore_index;
  const bool valid = !ignored && t >= 0 && t < a.vocab;
  const int64_t vocab_vec = (a.vocab / V) * V;

  // Pass 1: online max / sum of 2^(x * log2e).
  float m = -INFINITY, s = 0.f;
  for (int64_t c = int64_t(threadIdx.x) * V; c < vocab_vec; c += int64_t(kThreads) * V) {
    const Vec<T, V> p = *reinterpret_cast<const Vec<T, V>*>(x + c);
    float v[V];
    float lm = -INFINITY;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      v[i] = to_f(p.v[i]) * kLog2e;
      lm = fmaxf(lm, v[i]);
    }
    if (lm > m) {
      s *= exp2f(m - lm);
      m = lm;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) s += exp2f(v[i] - m);
  }
  for (int64_t c = vocab_vec + threadIdx.x; c < a.vocab; c += kThreads) {
    const float v = to_f(x[c]) * kLog2e;
    if (v > m) {
      s *= exp2f(m - v);
      m = v;
    }
    s += exp2f(v - m);
  }
  if (threadIdx.x == 0) target_logit = valid ? to_f(x[t]) : 0.f;
  for (int o = 16; o > 0; o >>= 1) combine(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / 32 ? red_m[lane] : -INFINITY;
    s = lane < kThreads / 32 ? red_s[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1)
      combine(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) {
      red_m[0] = m;
      red_s[0] = s;
    }
  }
  __syncthreads();
  const float lse2 = red_m[0] + log2f(red_s[0]);  // log2 of the sum of exp
  const float lse = lse2 * kLn2;
  if (threadIdx.x == 0) {
    if (a.lse) a.lse[r] = lse;
    a.loss[r] = ignored ? 0.f : valid ? lse - target_logit : __int_as_float(0x7fc00000);
  }
  if (!a.write_grad) return;

  // Pass 2: overwrite the row with (softmax - onehot) * scale (zero for ignored / invalid rows).
  const float scale = valid ? *a.grad_scale : 0.f;
  for (int64_t c = int64_t(threadIdx.x) * V; c < vocab_vec; c += int64_t(kThreads) * V) {
    const Vec<T, V> p = *reinterpret_cast<const Vec<T, V>*>(x + c);
    Vec<T, V> q;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float g = exp2f(to_f(p.v[i]) * kLog2e - lse2) * scale;
      if (c + i == t) g -= scale;
      q.v[i] = from_f<T>(g);
    }
    *reinterpret_cast<Vec<T, V>*>(x + c) = q;
  }
  for (int64_t c = vocab_vec + threadIdx.x; c < a.vocab; c += kThreads) {
    float g = exp2f(to_f(x[c]) * kLog2e - lse2) * scale;
    if (c == t) g -= scale;
    x[c] = from_f<T>(g);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
cudaError_t launch(const CrossEntropyArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const bool vec = a.ld % kV == 0 && aligned16(a.logits);
  if (vec)
    ce_kernel<T, kV><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a);
  else
    ce_kernel<T, 1><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_cuda(const CrossEntropyArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.vocab <= 0 || a.ld < a.vocab || (a.write_grad && a.grad_scale == nullptr))
    return a.rows == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  if (a.rows > 0x7fffffff) return cudaErrorInvalidValue;
  return a.bf16 ? launch<__nv_bfloat16>(a, stream) : launch<float>(a, stream);
}

}  // namespace ablate::kernels
