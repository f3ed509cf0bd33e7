// Fused CUDA kernels of the SSD intra-chunk term (contract in kernels/ssd_intra.h).
//
// Why: the LibTorch path (core/mixers/ssd.cpp IntraChunkFn) materialises per-head L x L tensors — the decay matrix,
// CB ∘ Lmat, dy xdᵀ, their products and sums — 1 G elements per pass at B 1, T 32K, 32 heads, chunk 256; on the H200
// those elementwise passes, not the GEMMs, were the cost (K3 at 10 TFLOP/s; bf16 GEMMs changed nothing,
// bench/RESULTS.md session 7). Here an L x L tile lives only in shared memory and registers; per group C Bᵀ
// (H / G times smaller than the per-head tensors) is the only L x L tensor in memory.
//
// Design (FlashAttention-2 style, like kernels/nsa_compress_cuda.cu; 4 warps, 64 x 64 tiles, the warp-level products
// of kernels/warp_mma.cuh: tensor cores for bf16/fp16, FMA for fp32):
// - forward: one block per (b·h, chunk, row tile i of 64 positions l). For each column tile j <= i the block builds
//   M = CB ∘ Lmat (64 x 64, rounded to the element type) in shared memory from CB and cs, loads xd's rows of tile j
//   and warp w accumulates y[16w .. 16w + 15] += M xd in registers; the accumulator is stored straight to y (fp32).
//   Tiles with more work (larger i) are issued first.
// - dxd: the same loop with roles swapped (one function, mx_tiles<..., BWD>): one block per (b·h, chunk, column tile
//   j), row tiles i >= j, Mᵀ built in shared memory (transposed store), dxd[j] += Mᵀ dy[i].
// - dCB / dcs: one block per (b·g, chunk, tile pair i >= j); it walks the H / G heads of the group: S = dy[i] xd[j]ᵀ
//   on the warps (16 rows each) into fp32 shared memory, then each lane takes rows of its own warp, two columns:
//   Gh = S ∘ Lmat is added to dCB (registers, summed over the heads, written once at the end — no atomics), and
//   W = Gh ∘ CB (strictly below the diagonal) to the row sums (warp shuffles) and column sums (shared-memory atomics,
//   4 warps) that go to dcs with one fp32 atomicAdd per (head, position, tile pair). (dcs's summation order across
//   tile pairs is therefore not deterministic.)
// Not done: cp.async double buffering; fusing dxd into the dCB pass (needs atomics across row tiles); computing
// C Bᵀ in the kernels (it stays a batched GEMM in the caller; per group it is small).
#include "kernels/ssd_intra.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda_common.cuh"
#include "kernels/warp_mma.cuh"

namespace ablate::kernels {
namespace {

using cuda_common::copy_rows;
using cuda_common::from_f;
using cuda_common::to_f;
using cuda_common::warp_sum;
using warp_mma::align128;
using warp_mma::allow_smem;
using warp_mma::kPad;
using warp_mma::WarpAcc;

constexpr int kTile = 64;     // positions per tile side; 4 warps x 16 rows
constexpr int kThreads = 128;

// Shared memory of the forward and dxd kernels: one M (or Mᵀ) tile, one xd (or dy) tile, the tile pair's cs.
template <typename E, int P>
struct MxLayout {
  static constexpr int MP = kTile + kPad<E>;  // E row stride of M
  static constexpr int XP = P + kPad<E>;      // E row stride of the xd / dy tile
  static constexpr size_t kM = 0;
  static constexpr size_t kX = align128(kM + size_t(kTile) * MP * sizeof(E));
  static constexpr size_t kCs = align128(kX + size_t(kTile) * XP * sizeof(E));  // cs of rows l, then of columns s
  static constexpr size_t kBytes = kCs + 2 * kTile * sizeof(float);
};

// Shared memory of the dCB / dcs kernel: dy rows (tile i), xd rows (tile j), S (fp32), cs of both, row/column sums.
template <typename E, int P>
struct DcbLayout {
  static constexpr int XP = P + kPad<E>;
  static constexpr int SP = kTile + 4;  // fp32 row stride of S
  static constexpr size_t kDy = 0;
  static constexpr size_t kX = align128(kDy + size_t(kTile) * XP * sizeof(E));
  static constexpr size_t kS = align128(kX + size_t(kTile) * XP * sizeof(E));
  static constexpr size_t kCs = align128(kS + size_t(kTile) * SP * sizeof(float));  // cs rows, cs columns
  static constexpr size_t kSums = kCs + 2 * kTile * sizeof(float);                   // row sums, column sums
  static constexpr size_t kBytes = kSums + 2 * kTile * sizeof(float);
};

// Decay-weighted CB of one tile pair into shared memory as E: dst[l][s] = M[l][s], or dst[s][l] when TRANSPOSE.
// Reads CB rows coalesced (64 consecutive columns per row). csl / css: cs of the tile's rows / columns (fp32, shared).
template <typename E, bool TRANSPOSE>
__device__ __forceinline__ void build_m(E* dst, int ld, const E* cb_tile, int64_t cb_ld, const float* csl,
                                        const float* css, bool diagonal) {
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int l = e / kTile, s = e % kTile;
    float v = 0.f;
    if (!diagonal || s <= l) {
      v = to_f(cb_tile[l * cb_ld + s]);
      if (!diagonal || s < l) v *= expf(csl[l] - css[s]);
    }
    if (TRANSPOSE) {
      dst[s * ld + l] = from_f<E>(v);
    } else {
      dst[l * ld + s] = from_f<E>(v);
    }
  }
}

// The forward and the dxd kernel are one loop with the roles of rows and columns swapped. Forward: block tile i
// (= nt - 1 - blockIdx.x, heaviest first) of y for head h, columns j = 0 .. i: y[i] += M[i, j] xd[j]. dxd (BWD):
// block tile j (= blockIdx.x, heaviest first), rows i = j .. nt - 1: dxd[j] += M[i, j]ᵀ dy[i] (Mᵀ built in shared
// memory by a transposed store). Grid (tiles, nc, B*H). src: xd or dy; out: y or dxd (fp32, written).
template <typename E, int P, bool BWD>
__device__ __forceinline__ void mx_tiles(const SsdIntraShape& s, const E* cb_all, const float* cs_all, const E* src,
                                         float* out) {
  using Lay = MxLayout<E, P>;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Ms = reinterpret_cast<E*>(smem + Lay::kM);
  E* Xs = reinterpret_cast<E*>(smem + Lay::kX);
  float* csl = reinterpret_cast<float*>(smem + Lay::kCs);  // cs of rows (tile i), then of columns (tile j)
  float* css = csl + kTile;
  const int nt = static_cast<int>(s.L / kTile);
  const int fixed = BWD ? static_cast<int>(blockIdx.x) : nt - 1 - static_cast<int>(blockIdx.x);
  const int64_t c = blockIdx.y, bh = blockIdx.z, b = bh / s.H, h = bh % s.H, g = h / (s.H / s.G);
  const int w = static_cast<int>(threadIdx.x) >> 5;
  const E* cb = cb_all + ((b * s.G + g) * s.nc + c) * s.L * s.L;
  const float* cs = cs_all + (bh * s.nc + c) * s.L;
  const int64_t row0 = b * s.nc * s.L + c * s.L;  // (b, c, 0) as a row of the (B*T, H, P) layout
  WarpAcc<E, P> acc;
  acc.zero();
  const int first = BWD ? fixed : 0, last = BWD ? nt - 1 : fixed;
  for (int u = first; u <= last; ++u) {
    const int i = BWD ? u : fixed, j = BWD ? fixed : u;
    static_assert(kThreads == 2 * kTile, "one thread per entry of csl and css");
    const int t = static_cast<int>(threadIdx.x);
    csl[t] = t < kTile ? cs[i * kTile + t] : cs[j * kTile + t - kTile];  // css = csl + kTile
    copy_rows<E, P, Lay::XP, kTile, kThreads>(Xs,
                                              [&](int r) { return src + ((row0 + u * kTile + r) * s.H + h) * s.P; });
    __syncthreads();
    build_m<E, BWD>(Ms, Lay::MP, cb + int64_t(i) * kTile * s.L + j * kTile, s.L, csl, css, i == j);
    __syncthreads();
    acc.template ab<kTile>(Ms + 16 * w * Lay::MP, Lay::MP, Xs, Lay::XP);
    __syncthreads();
  }
  acc.store(out + ((row0 + fixed * kTile + 16 * w) * s.H + h) * s.P, static_cast<int>(s.H * s.P));
}

template <typename E, int P>
__global__ void __launch_bounds__(kThreads) ssd_intra_fwd_kernel(SsdIntraFwdArgs a) {
  mx_tiles<E, P, false>(a.s, static_cast<const E*>(a.cb), a.cs, static_cast<const E*>(a.xd), a.y);
}

template <typename E, int P>
__global__ void __launch_bounds__(kThreads) ssd_intra_dxd_kernel(SsdIntraBwdArgs a) {
  mx_tiles<E, P, true>(a.s, static_cast<const E*>(a.cb), a.cs, static_cast<const E*>(a.dy), a.dxd);
}

// dCB and dcs: grid (tile pairs, nc, B*G); pair p -> (i, j), j <= i, in row-major order of the lower triangle.
template <typename E, int P>
__global__ void __launch_bounds__(kThreads) ssd_intra_dcb_kernel(SsdIntraBwdArgs a) {
  using Lay = DcbLayout<E, P>;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Dys = reinterpret_cast<E*>(smem + Lay::kDy);
  E* Xs = reinterpret_cast<E*>(smem + Lay::kX);
  float* Ss = reinterpret_cast<float*>(smem + Lay::kS);
  float* csl = reinterpret_cast<float*>(smem + Lay::kCs);
  float* css = csl + kTile;
  float* rows = reinterpret_cast<float*>(smem + Lay::kSums);
  float* cols = rows + kTile;
  const auto& s = a.s;
  int i = 0;
  int p = static_cast<int>(blockIdx.x);
  while (p > i) p -= ++i;  // p-th entry of the lower triangle: row i, column j = p
  const int j = p;
  const int64_t c = blockIdx.y, bg = blockIdx.z, b = bg / s.G, g = bg % s.G, R = s.H / s.G;
  const int w = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  const bool diagonal = i == j;
  const E* xd = static_cast<const E*>(a.xd);
  const E* dy = static_cast<const E*>(a.dy);
  const int64_t tile_off = ((bg * s.nc + c) * s.L + int64_t(i) * kTile) * s.L + j * kTile;
  const E* cb = static_cast<const E*>(a.cb) + tile_off;
  const int64_t row0 = b * s.nc * s.L + c * s.L;
  // This lane's entries: rows 16w + r (r < 16), columns lane and lane + 32. CB once; dCB summed over the heads.
  float cbv[16][2], dcb[16][2];
#pragma unroll
  for (int r = 0; r < 16; ++r)
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      cbv[r][k] = to_f(cb[(16 * w + r) * s.L + lane + 32 * k]);
      dcb[r][k] = 0.f;
    }
  for (int64_t hr = 0; hr < R; ++hr) {
    const int64_t h = g * R + hr;
    const float* cs = a.cs + ((b * s.H + h) * s.nc + c) * s.L;
    if (threadIdx.x < kTile) {
      csl[threadIdx.x] = cs[i * kTile + threadIdx.x];
      css[threadIdx.x] = cs[j * kTile + threadIdx.x];
      cols[threadIdx.x] = 0.f;
    }
    copy_rows<E, P, Lay::XP, kTile, kThreads>(
        Dys, [&](int r) { return dy + ((row0 + i * kTile + r) * s.H + h) * s.P; });
    copy_rows<E, P, Lay::XP, kTile, kThreads>(
        Xs, [&](int r) { return xd + ((row0 + j * kTile + r) * s.H + h) * s.P; });
    __syncthreads();
    {
      WarpAcc<E, kTile> sacc;
      sacc.zero();
      sacc.template abt<P>(Dys + 16 * w * Lay::XP, Lay::XP, Xs, Lay::XP);
      sacc.store(Ss + 16 * w * Lay::SP, Lay::SP);
    }
    __syncwarp();
    float colsum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int l = 16 * w + r;
      float rowsum = 0.f;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int m = lane + 32 * k;
        float gh = 0.f, wv = 0.f;
        if (!diagonal || m < l) {
          gh = Ss[l * Lay::SP + m] * expf(csl[l] - css[m]);
          wv = gh * cbv[r][k];
        } else if (m == l) {
          gh = Ss[l * Lay::SP + m];  // Lmat's diagonal is 1; W is 0 there
        }
        dcb[r][k] += gh;
        rowsum += wv;
        colsum[k] += wv;
      }
      rowsum = warp_sum(rowsum);
      if (lane == 0) rows[l] = rowsum;
    }
    atomicAdd(&cols[lane], colsum[0]);
    atomicAdd(&cols[lane + 32], colsum[1]);
    __syncthreads();
    float* dcs = a.dcs + ((b * s.H + h) * s.nc + c) * s.L;
    if (threadIdx.x < kTile) {
      atomicAdd(&dcs[i * kTile + threadIdx.x], rows[threadIdx.x]);
    } else {
      atomicAdd(&dcs[j * kTile + threadIdx.x - kTile], -cols[threadIdx.x - kTile]);
    }
    __syncthreads();  // before the next head overwrites the tiles, cs and the sums
  }
  float* out = a.dcb + tile_off;
#pragma unroll
  for (int r = 0; r < 16; ++r)
#pragma unroll
    for (int k = 0; k < 2; ++k) out[(16 * w + r) * s.L + lane + 32 * k] = dcb[r][k];
}

bool device_ok(NsaDtype dtype) {
  if (dtype == NsaDtype::kF32) return true;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 8;  // bf16 / fp16 wmma with fp32 accumulate
}

bool shape_ok(const SsdIntraShape& s) { return ssd_intra_cuda_supports(s) && device_ok(s.dtype); }

template <typename E, int P>
cudaError_t launch_fwd(const SsdIntraFwdArgs& a, cudaStream_t stream) {
  constexpr size_t bytes = MxLayout<E, P>::kBytes;
  if (const auto e = allow_smem(ssd_intra_fwd_kernel<E, P>, bytes); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(a.s.L / kTile), static_cast<unsigned>(a.s.nc),
                  static_cast<unsigned>(a.s.B * a.s.H));
  ssd_intra_fwd_kernel<E, P><<<grid, kThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename E, int P>
cudaError_t launch_bwd(const SsdIntraBwdArgs& a, cudaStream_t stream) {
  constexpr size_t mx_bytes = MxLayout<E, P>::kBytes;
  constexpr size_t dcb_bytes = DcbLayout<E, P>::kBytes;
  if (const auto e = allow_smem(ssd_intra_dxd_kernel<E, P>, mx_bytes); e != cudaSuccess) return e;
  if (const auto e = allow_smem(ssd_intra_dcb_kernel<E, P>, dcb_bytes); e != cudaSuccess) return e;
  const int64_t nt = a.s.L / kTile;
  const dim3 grid_dxd(static_cast<unsigned>(nt), static_cast<unsigned>(a.s.nc), static_cast<unsigned>(a.s.B * a.s.H));
  ssd_intra_dxd_kernel<E, P><<<grid_dxd, kThreads, mx_bytes, stream>>>(a);
  if (const auto e = cudaGetLastError(); e != cudaSuccess) return e;
  const dim3 grid_dcb(static_cast<unsigned>(nt * (nt + 1) / 2), static_cast<unsigned>(a.s.nc),
                      static_cast<unsigned>(a.s.B * a.s.G));
  ssd_intra_dcb_kernel<E, P><<<grid_dcb, kThreads, dcb_bytes, stream>>>(a);
  return cudaGetLastError();
}

template <template <typename, int> class Launch, typename Args>
cudaError_t dispatch(const Args& a, cudaStream_t stream) {
  if (!shape_ok(a.s)) return cudaErrorInvalidValue;
  switch (a.s.dtype) {
    case NsaDtype::kF32:
      return a.s.P == 64 ? Launch<float, 64>::run(a, stream) : Launch<float, 128>::run(a, stream);
    case NsaDtype::kBF16:
      return a.s.P == 64 ? Launch<__nv_bfloat16, 64>::run(a, stream) : Launch<__nv_bfloat16, 128>::run(a, stream);
    case NsaDtype::kF16:
      return a.s.P == 64 ? Launch<__half, 64>::run(a, stream) : Launch<__half, 128>::run(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename E, int P>
struct FwdLaunch {
  static cudaError_t run(const SsdIntraFwdArgs& a, cudaStream_t st) { return launch_fwd<E, P>(a, st); }
};
template <typename E, int P>
struct BwdLaunch {
  static cudaError_t run(const SsdIntraBwdArgs& a, cudaStream_t st) { return launch_bwd<E, P>(a, st); }
};

}  // namespace

cudaError_t ssd_intra_forward_cuda(const SsdIntraFwdArgs& a, cudaStream_t stream) {
  return dispatch<FwdLaunch>(a, stream);
}

cudaError_t ssd_intra_backward_cuda(const SsdIntraBwdArgs& a, cudaStream_t stream) {
  return dispatch<BwdLaunch>(a, stream);
}

bool ssd_intra_cuda_device_ok(NsaDtype dtype) { return device_ok(dtype); }

}  // namespace ablate::kernels
