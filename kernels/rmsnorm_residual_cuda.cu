// CUDA fused residual add + RMSNorm (HF-Llama order), forward and backward, fp32/bf16 activations and weights.
// Forward: one block per row. Pass 1 reads x and residual (16-byte vectors), writes h rounded to the activation
// dtype, keeps the rounded h in shared memory as fp32 and sums its squares; a block reduction gives rstd; pass 2
// writes y = w * cast(h * rstd) from shared memory. DRAM traffic is the minimum: x, residual in; h, y out.
// Shared memory is laid out "slot-major" (slot k*V+i of thread t at (k*V+i)*blockDim + t) so every access is
// conflict-free and each thread only reads back what it wrote (no barrier needed between the passes).
// Backward: a persistent grid of at most kMaxBlocks blocks walks the rows; each thread owns fixed columns, so its
// dw partial sums stay in its own shared-memory slots across rows. Per row, pass 1 reads dy, h, w for
// dot = sum(dy * w * n); pass 2 re-reads them (L1/L2-resident, the row is a few KB) plus dh and writes dx. Each
// block then writes its dw partials to the workspace and a second kernel sums the [blocks, cols] partials.
#include "kernels/rmsnorm_residual.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace ablate::kernels {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxBlocks = kRMSNormResidualBwdMaxBlocks;  // ~8 resident blocks per SM on 132 SMs

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
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f(from_f<T>(v));
}

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

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = lane < nwarps ? red[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // red is reused by the next call
  return v;
}

template <typename T, typename TW, int V>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(RMSNormResidualFwdArgs a) {
  using TY = std::conditional_t<std::is_same_v<T, __nv_bfloat16> && std::is_same_v<TW, __nv_bfloat16>,
                                __nv_bfloat16, float>;
  extern __shared__ float hs[];  // slot-major cache of the rounded h row
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + r * a.cols;
  const T* res = static_cast<const T*>(a.residual) + r * a.cols;
  T* h = static_cast<T*>(a.h) + r * a.cols;
  TY* y = static_cast<TY*>(a.y) + r * a.cols;
  const int nt = blockDim.x;
  float ss = 0.f;
  int k = 0;
  for (int64_t c = int64_t(threadIdx.x) * V; c < a.cols; c += int64_t(nt) * V, ++k) {
    float xv[V], rv[V], hv[V];
    load<T, V>(x + c, xv);
    load<T, V>(res + c, rv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      hv[i] = round_to<T>(xv[i] + rv[i]);
      ss += hv[i] * hv[i];
      hs[(k * V + i) * nt + threadIdx.x] = hv[i];
    }
    store<T, V>(h + c, hv);
  }
  const float rstd = rsqrtf(block_sum(ss, red) / float(a.cols) + a.eps);
  if (threadIdx.x == 0 && a.rstd) a.rstd[r] = rstd;
  k = 0;
  for (int64_t c = int64_t(threadIdx.x) * V; c < a.cols; c += int64_t(nt) * V, ++k) {
    float wv[V], yv[V];
    load<TW, V>(static_cast<const TW*>(a.w) + c, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) yv[i] = wv[i] * round_to<T>(hs[(k * V + i) * nt + threadIdx.x] * rstd);
    store<TY, V>(y + c, yv);
  }
}

template <typename T, typename TW, int V>
__global__ void __launch_bounds__(kMaxThreads) bwd_kernel(RMSNormResidualBwdArgs a) {
  using TY = std::conditional_t<std::is_same_v<T, __nv_bfloat16> && std::is_same_v<TW, __nv_bfloat16>,
                                __nv_bfloat16, float>;
  extern __shared__ float dws[];  // slot-major dw partial sums of this block
  __shared__ float red[32];
  const int nt = blockDim.x;
  const int slots = static_cast<int>((a.cols + int64_t(nt) * V - 1) / (int64_t(nt) * V)) * V;
  for (int s = 0; s < slots; ++s) dws[s * nt + threadIdx.x] = 0.f;
  const TW* w = static_cast<const TW*>(a.w);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const TY* dy = static_cast<const TY*>(a.dy) + r * a.cols;
    const T* h = static_cast<const T*>(a.h) + r * a.cols;
    const float rstd = a.rstd[r];
    float dot = 0.f;
    int k = 0;
    for (int64_t c = int64_t(threadIdx.x) * V; c < a.cols; c += int64_t(nt) * V, ++k) {
      float dyv[V], hv[V], wv[V];
      load<TY, V>(dy + c, dyv);
      load<T, V>(h + c, hv);
      load<TW, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float n = hv[i] * rstd;
        dot += dyv[i] * wv[i] * n;
        dws[(k * V + i) * nt + threadIdx.x] += dyv[i] * round_to<T>(n);
      }
    }
    const float m = block_sum(dot, red) / float(a.cols);
    const T* dh = a.dh ? static_cast<const T*>(a.dh) + r * a.cols : nullptr;
    T* dx = static_cast<T*>(a.dx) + r * a.cols;
    for (int64_t c = int64_t(threadIdx.x) * V; c < a.cols; c += int64_t(nt) * V) {
      float dyv[V], hv[V], wv[V], dhv[V], dxv[V];
      load<TY, V>(dy + c, dyv);
      load<T, V>(h + c, hv);
      load<TW, V>(w + c, wv);
      if (dh) {
        load<T, V>(dh + c, dhv);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) dhv[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) dxv[i] = rstd * (dyv[i] * wv[i] - hv[i] * rstd * m) + dhv[i];
      store<T, V>(dx + c, dxv);
    }
  }
  // This block's partials -> workspace row blockIdx.x (columns past cols are never written).
  float* ws = a.workspace + int64_t(blockIdx.x) * a.cols;
  int k = 0;
  for (int64_t c = int64_t(threadIdx.x) * V; c < a.cols; c += int64_t(nt) * V, ++k) {
#pragma unroll
    for (int i = 0; i < V; ++i) ws[c + i] = dws[(k * V + i) * nt + threadIdx.x];
  }
}

__global__ void dw_reduce_kernel(const float* __restrict__ ws, float* __restrict__ dw, int64_t blocks, int64_t cols) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) acc += ws[b * cols + c];
  dw[c] = acc;
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Threads per block: enough 32-lane warps to cover one pass of the row in V-wide pieces, at most kMaxThreads.
int threads_for(int64_t cols, int V) {
  const int64_t pieces = (cols + V - 1) / V;
  const int64_t t = ((pieces + 31) / 32) * 32;
  return static_cast<int>(t < kMaxThreads ? (t < 32 ? 32 : t) : kMaxThreads);
}

size_t smem_for(int64_t cols, int threads, int V) {
  const int64_t iters = (cols + int64_t(threads) * V - 1) / (int64_t(threads) * V);
  return static_cast<size_t>(iters * V * threads) * sizeof(float);
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename T, typename TW, int V>
cudaError_t fwd_v(const RMSNormResidualFwdArgs& a, cudaStream_t stream) {
  const int threads = threads_for(a.cols, V);
  const size_t smem = smem_for(a.cols, threads, V);
  if (cudaError_t e = allow_smem(fwd_kernel<T, TW, V>, smem); e != cudaSuccess) return e;
  fwd_kernel<T, TW, V><<<static_cast<unsigned>(a.rows), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename TW>
cudaError_t fwd(const RMSNormResidualFwdArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const bool vec = a.cols % kV == 0 && aligned16(a.x) && aligned16(a.residual) && aligned16(a.w) &&
                   aligned16(a.h) && aligned16(a.y);
  return vec ? fwd_v<T, TW, kV>(a, stream) : fwd_v<T, TW, 1>(a, stream);
}

template <typename T, typename TW, int V>
cudaError_t bwd_v(const RMSNormResidualBwdArgs& a, cudaStream_t stream) {
  const int threads = threads_for(a.cols, V);
  const size_t smem = smem_for(a.cols, threads, V);
  if (cudaError_t e = allow_smem(bwd_kernel<T, TW, V>, smem); e != cudaSuccess) return e;
  const int64_t blocks = a.rows < kMaxBlocks ? a.rows : kMaxBlocks;
  bwd_kernel<T, TW, V><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (!a.dw) return cudaSuccess;
  dw_reduce_kernel<<<static_cast<unsigned>((a.cols + 255) / 256), 256, 0, stream>>>(a.workspace, a.dw, blocks,
                                                                                   a.cols);
  return cudaGetLastError();
}

template <typename T, typename TW>
cudaError_t bwd(const RMSNormResidualBwdArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / sizeof(T);
  const bool vec = a.cols % kV == 0 && aligned16(a.dy) && aligned16(a.dh) && aligned16(a.h) && aligned16(a.w) &&
                   aligned16(a.dx);
  return vec ? bwd_v<T, TW, kV>(a, stream) : bwd_v<T, TW, 1>(a, stream);
}

}  // namespace

cudaError_t rmsnorm_residual_forward_cuda(const RMSNormResidualFwdArgs& a, cudaStream_t stream) {
  if (a.cols > kRMSNormResidualMaxCols || a.cols < 0 || a.rows < 0) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  if (a.bf16) return a.w_bf16 ? fwd<__nv_bfloat16, __nv_bfloat16>(a, stream) : fwd<__nv_bfloat16, float>(a, stream);
  return a.w_bf16 ? fwd<float, __nv_bfloat16>(a, stream) : fwd<float, float>(a, stream);
}

cudaError_t rmsnorm_residual_backward_cuda(const RMSNormResidualBwdArgs& a, cudaStream_t stream) {
  if (a.cols > kRMSNormResidualMaxCols || a.cols < 0 || a.rows < 0) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.cols == 0) {
    if (a.dw && a.cols > 0) return cudaMemsetAsync(a.dw, 0, sizeof(float) * a.cols, stream);
    return cudaSuccess;
  }
  if (a.workspace == nullptr) return cudaErrorInvalidValue;
  if (a.bf16) return a.w_bf16 ? bwd<__nv_bfloat16, __nv_bfloat16>(a, stream) : bwd<__nv_bfloat16, float>(a, stream);
  return a.w_bf16 ? bwd<float, __nv_bfloat16>(a, stream) : bwd<float, float>(a, stream);
}

}  // namespace ablate::kernels
