// CUDA fused residual add + RMSNorm (HF-Llama order), forward and backward, fp32/bf16 activations and weights.
// Forward: one block per row. Pass 1 reads x and residual (16-byte vectors), writes h rounded to the activation
// dtype, keeps the rounded h in shared memory as fp32 and sums its squares; a block reduction gives rstd; pass 2
// writes y = w * cast(h * rstd) from shared memory. DRAM traffic is the minimum: x, residual in; h, y out.
// Shared memory is laid out "slot-major" (slot k*V+i of thread t at (k*V+i)*blockDim + t) so every access is
// conflict-free and each thread only reads back what it wrote (no barrier needed between the passes).
// Backward: a persistent grid (as many blocks as fit at once, at most kMaxBlocks) walks the rows; each thread owns
// fixed columns, so w and its dw partial sums stay with it across rows. Per row: read dy, h (and dh, early, so its
// latency overlaps the reduction), dot = sum(dy * w * n), a block reduction, write dx. Up to cols = 1024 V (8192
// bf16 / 4096 fp32: one 16-byte piece per thread, up to 1024 threads) the row slice lives in registers
// (bwd_reg_kernel; variants 2 and 3, 3 also prefetching the next row: measured no faster); wider rows keep dw in
// shared memory and re-read dy/h/w in pass 2 (bwd_kernel, variant 1). Each block writes its dw partials to a
// [blocks, cols] workspace that dw_reduce_kernel sums in a fixed order.
#include "kernels/rmsnorm_residual.h"
#include "kernels/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ablate::kernels {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxBlocks = kRMSNormResidualBwdMaxBlocks;
constexpr int kAutoVariant = 2;  // backward variant for RMSNormResidualBwdArgs::variant == 0 (see the header)

using namespace cuda_common;  // Vec, to_f, from_f, load, store
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_f(from_f<T>(v));
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

// The same backward with the row slice of each thread held in registers (ITERS pieces of V columns, ITERS a
// compile-time constant, so the arrays stay in registers): w and the dw partials live in registers across rows,
// and pass 2 reuses the dy/h values of pass 1 instead of re-reading them. The next row's dy/h (raw, packed) and
// this row's dh are loaded before the block reduction, so their latency overlaps it: a block always has a row
// in flight (PREFETCH; without it, the row is loaded at the top of each iteration). Launched with ITERS = 1 and
// up to 1024 threads, i.e. for cols <= 1024 V.
template <typename T, typename TW, int V, int ITERS, bool PREFETCH>
__global__ void __launch_bounds__(ITERS == 1 ? 1024 : kMaxThreads) bwd_reg_kernel(RMSNormResidualBwdArgs a) {
  using TY = std::conditional_t<std::is_same_v<T, __nv_bfloat16> && std::is_same_v<TW, __nv_bfloat16>,
                                __nv_bfloat16, float>;
  using PY = Vec<TY, V>;
  using PT = Vec<T, V>;
  __shared__ float red[32];
  const int64_t nt = blockDim.x;
  float wv[ITERS][V], dwa[ITERS][V];
  bool act[ITERS];
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int64_t c = (k * nt + threadIdx.x) * V;
    act[k] = c < a.cols;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      wv[k][i] = 0.f;
      dwa[k][i] = 0.f;
    }
    if (act[k]) load<TW, V>(static_cast<const TW*>(a.w) + c, wv[k]);
  }
  const TY* DY = static_cast<const TY*>(a.dy);
  const T* H = static_cast<const T*>(a.h);
  PY dyp[ITERS];  // current row, packed
  PT hp[ITERS];
  int64_t r = blockIdx.x;
  if constexpr (PREFETCH) {
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      if (!act[k] || r >= a.rows) continue;
      const int64_t c = (k * nt + threadIdx.x) * V;
      dyp[k] = *reinterpret_cast<const PY*>(DY + r * a.cols + c);
      hp[k] = *reinterpret_cast<const PT*>(H + r * a.cols + c);
    }
  }
  for (; r < a.rows; r += gridDim.x) {
    // PREFETCH: this row's dy/h arrived during the previous row; ask for the next row's now. Otherwise load now.
    const int64_t rl = PREFETCH ? r + gridDim.x : r;
    PY dyn[ITERS];
    PT hn[ITERS], dhp[ITERS];
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      if (!act[k]) continue;
      const int64_t c = (k * nt + threadIdx.x) * V;
      if (rl < a.rows) {
        dyn[k] = *reinterpret_cast<const PY*>(DY + rl * a.cols + c);
        hn[k] = *reinterpret_cast<const PT*>(H + rl * a.cols + c);
      }
      if (a.dh) dhp[k] = *reinterpret_cast<const PT*>(static_cast<const T*>(a.dh) + r * a.cols + c);
      if constexpr (!PREFETCH) {
        dyp[k] = dyn[k];
        hp[k] = hn[k];
      }
    }
    const float rstd = a.rstd[r];
    // dy/h stay packed (bf16: half the registers) and are unpacked again in pass 2.
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      if (!act[k]) continue;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float dyv = to_f(dyp[k].v[i]);
        const float n = to_f(hp[k].v[i]) * rstd;
        dot += dyv * wv[k][i] * n;
        dwa[k][i] += dyv * round_to<T>(n);
      }
    }
    const float m = block_sum(dot, red) / float(a.cols);
    T* dx = static_cast<T*>(a.dx) + r * a.cols;
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      if (!act[k]) continue;
      const int64_t c = (k * nt + threadIdx.x) * V;
      float dxv[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float dhv = a.dh ? to_f(dhp[k].v[i]) : 0.f;
        dxv[i] = rstd * (to_f(dyp[k].v[i]) * wv[k][i] - to_f(hp[k].v[i]) * rstd * m) + dhv;
      }
      store<T, V>(dx + c, dxv);
      if constexpr (PREFETCH) {
        dyp[k] = dyn[k];
        hp[k] = hn[k];
      }
    }
  }
  float* ws = a.workspace + int64_t(blockIdx.x) * a.cols;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    if (!act[k]) continue;
    const int64_t c = (k * nt + threadIdx.x) * V;
#pragma unroll
    for (int i = 0; i < V; ++i) ws[c + i] = dwa[k][i];
  }
}

// dw[c] = sum_b ws[b, c]. A block takes 32 columns (one coalesced 128-byte row piece per warp) and 8 warps split
// the partial rows; a shared-memory sum finishes each column. Deterministic (fixed order), and wide enough
// (cols / 32 blocks) to read the workspace at full bandwidth.
constexpr int kReduceCols = 32, kReduceGroups = 8;
__global__ void __launch_bounds__(kReduceCols * kReduceGroups)
    dw_reduce_kernel(const float* __restrict__ ws, float* __restrict__ dw, int64_t blocks, int64_t cols) {
  __shared__ float part[kReduceGroups][kReduceCols + 1];
  const int64_t c = int64_t(blockIdx.x) * kReduceCols + threadIdx.x;
  float acc = 0.f;
  if (c < cols)
    for (int64_t b = threadIdx.y; b < blocks; b += kReduceGroups) acc += ws[b * cols + c];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < kReduceGroups; ++g) total += part[g][threadIdx.x];
    dw[c] = total;
  }
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

// Dynamic shared memory beyond the default needs an opt-in; the static arrays (at most a few hundred bytes) count
// against the same 48 KB, hence the margin.
template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  if (smem + 1024 <= 48 * 1024) return cudaSuccess;
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
  // Register variants: one V-wide piece per thread, up to 1024 threads (cols <= 1024 V: 8192 bf16, 4096 fp32);
  // wider rows take the shared-memory variant. (More pieces per thread cost > 100 registers, measured.)
  const int64_t pieces = (a.cols + V - 1) / V;
  const int reg_threads = static_cast<int>(std::max<int64_t>(32, (std::min<int64_t>(pieces, 1024) + 31) / 32 * 32));
  int64_t blocks = 0;
  cudaError_t err = cudaSuccess;
  // The grid is what fits on the GPU at once (the blocks loop over rows), capped by the workspace.
  auto go = [&](auto kernel, int threads, size_t smem) {
    if (smem > 0) {
      if ((err = allow_smem(kernel, smem)) != cudaSuccess) return;
    }
    int per_sm = 0, dev = 0, sms = 0;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem)) != cudaSuccess) return;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return;
    blocks = std::min<int64_t>({a.rows, kMaxBlocks, std::max<int64_t>(1, int64_t(per_sm) * sms)});
    kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(a);
    err = cudaGetLastError();
  };
  int variant = a.variant;
  if (variant == 0) variant = kAutoVariant;
  if (pieces > 1024) variant = 1;
  if (variant == 1) {
    const int threads = threads_for(a.cols, V);
    go(bwd_kernel<T, TW, V>, threads, smem_for(a.cols, threads, V));
  } else if (variant == 3) {
    go(bwd_reg_kernel<T, TW, V, 1, true>, reg_threads, 0);
  } else {
    go(bwd_reg_kernel<T, TW, V, 1, false>, reg_threads, 0);
  }
  if (err != cudaSuccess) return err;
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (!a.dw) return cudaSuccess;
  dw_reduce_kernel<<<static_cast<unsigned>((a.cols + kReduceCols - 1) / kReduceCols), dim3(kReduceCols, kReduceGroups),
                     0, stream>>>(a.workspace, a.dw, blocks, a.cols);
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
