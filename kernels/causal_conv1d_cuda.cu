// CUDA causal depthwise conv1d (see causal_conv1d.h), forward and backward, fp32 / bf16 / fp16 data, fp32 math.
//
// One thread per (V channels, time range of TR = 64 steps of one batch row): consecutive threads own consecutive
// channels, so every access to x, y, dy, dx at one time step is one contiguous piece per warp (V = 2 for 16-bit data
// when C is even: 128 bytes per warp instead of 64). Block (kThreads) = channels, grid.x = ranges, grid.y = channel
// blocks. The weights stay in registers; W is a template parameter so every W-sized loop unrolls and the windows
// below are plain registers (the shifts are register moves, no dynamic indexing).
//
// Forward: a sliding window of the last W inputs (preloaded with x[t0-W+1 .. t0-1]), so each x is read once (plus
// W-1 halo reads per range). Time is walked in batches of kU steps whose loads are all issued before the math.
//
// Backward: z[t'] is recomputed from the same sliding window, dz[t'] = dy[t'] silu'(z[t']). dz[t'] feeds
// dx[t'-W+1 .. t'], held in a ring of W pending accumulators (acc[j] is dx[t'-W+1+j] after step t'): after step t',
// acc[0] = dx[t'-W+1] is complete and stored (when it lies in this range), and the ring shifts. The walk covers the
// range [t0, t1) and then W-1 tail steps t1 .. t1+W-2 that only finish dx[t1-W+1 .. t1-1] (dz = 0 at t' >= T, by
// zero loads). dw / dbias partial sums accumulate over [t0, t1) only and are written once per thread, to the range's
// row of dwb. Halo: W-1 extra steps of x and dy per range (about 5% at W = 4).
#include "kernels/causal_conv1d.h"
#include "kernels/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace ablate::kernels {
namespace {

using namespace cuda_common;  // load, store, to_f, from_f

constexpr int kThreads = 128;                                  // channel threads per block
constexpr int kTR = static_cast<int>(kCausalConv1dTimeRange);  // time steps per thread
constexpr int kU = 8;                                          // time steps whose loads are issued together
static_assert(kTR % kU == 0, "a full range is whole batches of kU steps");

// sigmoid(z) and sigmoid(-z) = 1 - sigmoid(z) from one exp of -|z|: no overflow, no cancellation. expf (not __expf)
// keeps fp32 within a few ulps of the fp64 reference.
__device__ __forceinline__ void sigmoid_pair(float z, float& s, float& sm) {
  const float e = expf(-fabsf(z));
  const float r = 1.f / (1.f + e);  // sigmoid(|z|)
  const float q = e * r;            // sigmoid(-|z|)
  s = z >= 0.f ? r : q;
  sm = z >= 0.f ? q : r;
}

__device__ __forceinline__ float silu_of(float z) {
  float s, sm;
  sigmoid_pair(z, s, sm);
  return z * s;
}

template <typename T, int V>
__device__ __forceinline__ void load_or_zero(const T* p, bool ok, float (&out)[V]) {
  if (ok) {
    load<T, V>(p, out);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = 0.f;
  }
}

// The per-thread state shared by both directions: weights, bias and the input window.
template <typename T, int W, int V>
struct Window {
  float w[W][V];
  float bias[V];
  float x[W][V];  // after push(x_t): x[j] = x[t - W + 1 + j]

  __device__ __forceinline__ void init(const float* wp, const float* bp, int64_t c0, const T* xrow, int64_t t0,
                                       int64_t C) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
#pragma unroll
      for (int j = 0; j < W; ++j) w[j][v] = wp[(c0 + v) * W + j];
      bias[v] = bp != nullptr ? bp[c0 + v] : 0.f;
    }
    // x[1 .. W-1] = x[t0-W+1 .. t0-1]; the first push moves them down to x[0 .. W-2].
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int64_t t = t0 - W + j;
      load_or_zero<T, V>(xrow + t * C, j > 0 && t >= 0, x[j]);
    }
  }

  __device__ __forceinline__ void push(const float (&xt)[V]) {
#pragma unroll
    for (int j = 0; j + 1 < W; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) x[j][v] = x[j + 1][v];
#pragma unroll
    for (int v = 0; v < V; ++v) x[W - 1][v] = xt[v];
  }

  __device__ __forceinline__ float conv(int v) const {
    float z = bias[v];
#pragma unroll
    for (int j = 0; j < W; ++j) z = fmaf(w[j][v], x[j][v], z);
    return z;
  }
};

template <typename T, int W, int V>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const CausalConv1dFwdArgs a, const int64_t ranges_per_row) {
  const int64_t C = a.s.C, len = a.s.T;  // len: time steps per row
  const int64_t c0 = (int64_t(blockIdx.y) * kThreads + threadIdx.x) * V;
  if (c0 >= C) return;  // C is a multiple of V
  const int64_t b = blockIdx.x / ranges_per_row;
  const int64_t t0 = (blockIdx.x - b * ranges_per_row) * kTR, t1 = t0 + kTR < len ? t0 + kTR : len;
  const int64_t off = b * len * C + c0;
  const T* x = static_cast<const T*>(a.x) + off;
  T* y = static_cast<T*>(a.y) + off;
  const bool silu = a.s.silu;
  Window<T, W, V> win;
  win.init(a.w, a.bias, c0, x, t0, C);
  for (int64_t tb = t0; tb < t1; tb += kU) {
    float xs[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) load_or_zero<T, V>(x + (tb + u) * C, tb + u < t1, xs[u]);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (tb + u >= t1) break;  // only in the last, shorter range of a row
      win.push(xs[u]);
      float out[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float z = win.conv(v);
        out[v] = silu ? silu_of(z) : z;
      }
      store<T, V>(y + (tb + u) * C, out);
    }
  }
}

template <typename T, int W, int V>
struct BwdWalker {
  Window<T, W, V> win;
  float acc[W][V];  // after step t': acc[j] = the part of dx[t' - W + 1 + j] summed so far
  float dw[W][V];
  float db[V];
  bool silu;

  // One time step t' with input x[t'] and upstream gradient dy[t'] (both 0 at t' >= T); `accumulate`: t' lies in
  // this range (its dw / dbias terms are ours). Stores dx[t'-W+1] when it is >= t0.
  __device__ __forceinline__ void step(const float (&xt)[V], const float (&gt)[V], bool accumulate, bool store_dx,
                                       T* dx_at) {
    win.push(xt);
    float out[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      float dz = gt[v];
      if (silu) {
        const float z = win.conv(v);
        float s, sm;
        sigmoid_pair(z, s, sm);
        dz *= s * fmaf(z, sm, 1.f);  // silu'(z) = s (1 + z (1 - s))
      }
      if (accumulate) {
#pragma unroll
        for (int j = 0; j < W; ++j) dw[j][v] = fmaf(dz, win.x[j][v], dw[j][v]);
        db[v] += dz;
      }
#pragma unroll
      for (int j = 0; j < W; ++j) acc[j][v] = fmaf(win.w[j][v], dz, acc[j][v]);
      out[v] = acc[0][v];
    }
    if (store_dx) store<T, V>(dx_at, out);
#pragma unroll
    for (int j = 0; j + 1 < W; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[j][v] = acc[j + 1][v];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[W - 1][v] = 0.f;
  }
};

template <typename T, int W, int V>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const CausalConv1dBwdArgs a, const int64_t ranges_per_row) {
  const int64_t C = a.s.C, len = a.s.T;  // len: time steps per row
  const int64_t c0 = (int64_t(blockIdx.y) * kThreads + threadIdx.x) * V;
  if (c0 >= C) return;
  const int64_t r = blockIdx.x;
  const int64_t b = r / ranges_per_row;
  const int64_t t0 = (r - b * ranges_per_row) * kTR, t1 = t0 + kTR < len ? t0 + kTR : len;
  const int64_t off = b * len * C + c0;
  const T* x = static_cast<const T*>(a.x) + off;
  const T* dy = static_cast<const T*>(a.dy) + off;
  T* dx = static_cast<T*>(a.dx) + off;
  BwdWalker<T, W, V> k;
  k.silu = a.s.silu;
  k.win.init(a.w, a.bias, c0, x, t0, C);
#pragma unroll
  for (int j = 0; j < W; ++j)
#pragma unroll
    for (int v = 0; v < V; ++v) k.acc[j][v] = k.dw[j][v] = 0.f;
#pragma unroll
  for (int v = 0; v < V; ++v) k.db[v] = 0.f;
  // The range itself.
  for (int64_t tb = t0; tb < t1; tb += kU) {
    float xs[kU][V], gs[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      load_or_zero<T, V>(x + (tb + u) * C, tb + u < t1, xs[u]);
      load_or_zero<T, V>(dy + (tb + u) * C, tb + u < t1, gs[u]);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (tb + u >= t1) break;
      const int64_t s = tb + u - (W - 1);  // the dx completed by this step
      k.step(xs[u], gs[u], /*accumulate=*/true, s >= t0, dx + s * C);
    }
  }
  // W-1 tail steps past the range finish dx[t1-W+1 .. t1-1] (their dz terms belong to the next range's sums).
  if constexpr (W > 1) {
    float xs[W - 1][V], gs[W - 1][V];
#pragma unroll
    for (int u = 0; u < W - 1; ++u) {
      load_or_zero<T, V>(x + (t1 + u) * C, t1 + u < len, xs[u]);
      load_or_zero<T, V>(dy + (t1 + u) * C, t1 + u < len, gs[u]);
    }
#pragma unroll
    for (int u = 0; u < W - 1; ++u) {
      const int64_t s = t1 + u - (W - 1);
      k.step(xs[u], gs[u], /*accumulate=*/false, s >= t0, dx + s * C);
    }
  }
  float* out = a.dwb + (r * C + c0) * (W + 1);
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int j = 0; j < W; ++j) out[v * (W + 1) + j] = k.dw[j][v];
    out[v * (W + 1) + W] = k.db[v];
  }
}

bool aligned(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// Calls f(std::integral_constant<int, W>{}) for the runtime width; cudaErrorInvalidValue outside 1..8.
template <typename F>
cudaError_t with_width(int64_t W, F&& f) {
  switch (W) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}
static_assert(kCausalConv1dMaxWidth == 8, "with_width instantiates widths 1..8");

// Sizes and grid common to both directions; false for what the kernels refuse. `empty`: nothing to launch.
bool launch_shape(const CausalConv1dShape& s, int v, dim3& grid, int64_t& ranges_per_row, bool& empty) {
  if (s.B < 0 || s.T < 0 || s.C < 0 || s.W < 1 || s.W > kCausalConv1dMaxWidth) return false;
  empty = s.B == 0 || s.T == 0 || s.C == 0;
  if (empty) return true;
  ranges_per_row = causal_conv1d_num_ranges(1, s.T);
  const int64_t ranges = causal_conv1d_num_ranges(s.B, s.T);
  const int64_t channel_blocks = (s.C / v + kThreads - 1) / kThreads;
  if (ranges > 0x7fffffff || channel_blocks > 65535) return false;
  grid = dim3(static_cast<unsigned>(ranges), static_cast<unsigned>(channel_blocks));
  return true;
}

template <typename T, int V>
cudaError_t fwd(const CausalConv1dFwdArgs& a, cudaStream_t stream) {
  dim3 grid;
  int64_t per_row = 0;
  bool empty = false;
  if (!launch_shape(a.s, V, grid, per_row, empty)) return cudaErrorInvalidValue;
  if (empty) return cudaSuccess;
  return with_width(a.s.W, [&](auto wc) {
    fwd_kernel<T, decltype(wc)::value, V><<<grid, kThreads, 0, stream>>>(a, per_row);
    return cudaGetLastError();
  });
}

template <typename T, int V>
cudaError_t bwd(const CausalConv1dBwdArgs& a, cudaStream_t stream) {
  dim3 grid;
  int64_t per_row = 0;
  bool empty = false;
  if (!launch_shape(a.s, V, grid, per_row, empty)) return cudaErrorInvalidValue;
  if (empty) return cudaSuccess;
  return with_width(a.s.W, [&](auto wc) {
    bwd_kernel<T, decltype(wc)::value, V><<<grid, kThreads, 0, stream>>>(a, per_row);
    return cudaGetLastError();
  });
}

// Pairs of 16-bit channels per thread when C is even and every data pointer 4-byte aligned.
template <typename T, typename Args, typename... P>
cudaError_t by_pairs(cudaError_t (*one)(const Args&, cudaStream_t), cudaError_t (*two)(const Args&, cudaStream_t),
                     const Args& a, cudaStream_t stream, P... ptrs) {
  const bool pairs = a.s.C % 2 == 0 && (aligned(ptrs, 2 * sizeof(T)) && ...);
  return pairs ? two(a, stream) : one(a, stream);
}

}  // namespace

cudaError_t causal_conv1d_fwd_cuda(const CausalConv1dFwdArgs& a, cudaStream_t stream) {
  const bool work = a.s.B > 0 && a.s.T > 0 && a.s.C > 0;
  if (work && (a.x == nullptr || a.w == nullptr || a.y == nullptr)) return cudaErrorInvalidValue;
  switch (a.s.dtype) {
    case NsaDtype::kF32: return fwd<float, 1>(a, stream);
    case NsaDtype::kBF16:
      return by_pairs<__nv_bfloat16>(fwd<__nv_bfloat16, 1>, fwd<__nv_bfloat16, 2>, a, stream, a.x, a.y);
    case NsaDtype::kF16: return by_pairs<__half>(fwd<__half, 1>, fwd<__half, 2>, a, stream, a.x, a.y);
  }
  return cudaErrorInvalidValue;
}

cudaError_t causal_conv1d_bwd_cuda(const CausalConv1dBwdArgs& a, cudaStream_t stream) {
  const bool work = a.s.B > 0 && a.s.T > 0 && a.s.C > 0;
  if (work && (a.x == nullptr || a.w == nullptr || a.dy == nullptr || a.dx == nullptr || a.dwb == nullptr))
    return cudaErrorInvalidValue;
  switch (a.s.dtype) {
    case NsaDtype::kF32: return bwd<float, 1>(a, stream);
    case NsaDtype::kBF16:
      return by_pairs<__nv_bfloat16>(bwd<__nv_bfloat16, 1>, bwd<__nv_bfloat16, 2>, a, stream, a.x, a.dy, a.dx);
    case NsaDtype::kF16: return by_pairs<__half>(bwd<__half, 1>, bwd<__half, 2>, a, stream, a.x, a.dy, a.dx);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ablate::kernels
