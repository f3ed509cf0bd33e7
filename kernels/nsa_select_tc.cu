// Tensor-core kernels of the NSA selected branch for bf16/fp16 inputs (contract in kernels/nsa_select.h; the fp32
// FMA kernels of kernels/nsa_select_cuda.cu stay for fp32 and for everything this file does not take).
//
// STATUS: compiled (sm_80/sm_90) but, when written, not yet run on a GPU; tests/mixers/nsa_gpu_test.cpp checks it.
//
// Design (FlashAttention-2 / fla parallel_nsa style, kept simple):
// - MMAs through the nvcuda::wmma API, 16x16x16 tiles, bf16/fp16 operands from shared memory, fp32 accumulators.
//   The fragment layout of wmma is opaque, so every elementwise step (scaling, masking, softmax, dS) goes through
//   shared memory: accumulators are stored with store_matrix_sync as fp32, processed, and written back as E.
// - Query-centric kernels (forward, dq): one thread block of 4 warps per (b, t, kv head). The G <= 16 query heads
//   of the group are the M = 16 rows of every MMA (rows >= G are zero queries and are never written out). Selected
//   blocks are walked in tiles of kT = 64 keys (l' = 32: one half-empty tile; l' = 128: two tiles); keys past
//   min(block end, t + 1) are zero rows in shared memory and get P = 0.
//     forward: S = Q K^T (warp w: key columns 16w..16w+15), S * scale*log2(e), online softmax in fp32 in the log2
//              domain (warp w owns rows w + 4i; m, l in registers), P rounded to E, O (fp32, in shared memory,
//              warp w owns channel tiles w + 4i) = alpha O + P V. o = O / l, lse = (m + log2 l) ln 2.
//     dq:      S = Q K^T and dP = dO V^T (warp w: key columns 16w..), P = exp2(S*scale*log2e - lse*log2e),
//              dS = P (dP - delta) rounded to E, dq += dS K in register fragments (warp w: channel tiles w + 4i).
// - Key-centric kernel (dk, dv): one thread block of 8 warps per (segment, 64-key tile of the block), over the
//   caller's inverse index as before. The tile's K/V stay in shared memory; the segment's (query, head) rows come in
//   chunks of kR = 32 rows (32 / G queries). Per chunk: S and dP (32 x 64, warp w: rows 16(w/4).., keys 16(w%4)..),
//   P and dS rounded to E, then dV += P^T dO and dK += dS^T Q (64 x D outputs; warp w owns tiles w + 8i; P^T is
//   read as a col_major matrix_a from the row-major P). At the end the accumulators go through shared memory to one
//   fp32 atomicAdd per element (dK times scale).
// - Shared-memory rows are padded by 8 E (16 bytes) / 4 floats: ldmatrix rows then fall in distinct bank quads, and
//   every 16x16 tile pointer stays 32-byte aligned as wmma requires (each region starts 128-byte aligned).
// - Rounding compared with the FMA kernels: P (forward, dk/dv) and dS (dq, dk) are rounded to E before their MMA,
//   as in FlashAttention-2; S, the softmax statistics, dP and all accumulators are fp32.
// Not done: packing several query positions into the M rows when G < 16 (rows are padded instead), cp.async
// double buffering of K/V, mma.sync with register-resident softmax.
#include "kernels/nsa_select.h"
#include "kernels/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

namespace ablate::kernels {
namespace {

namespace wmma = nvcuda::wmma;
using cuda_common::Vec;
using cuda_common::copy_rows;
using cuda_common::from_f;
using cuda_common::to_f;
using cuda_common::warp_max;
using cuda_common::warp_sum;

constexpr int kT = 64;          // keys per tile
constexpr int kM = 16;          // rows (query heads) of the query-centric kernels
constexpr int kR = 32;          // rows per chunk of the key-centric kernel
constexpr int kQThreads = 128;  // 4 warps
constexpr int kKThreads = 256;  // 8 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float ninf() { return -INFINITY; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

// rows x D fp32 values src[r * LD + d] (times mul(r)) to dst[r * D + d] as E, 8 per access.
template <typename E, int D, int LD, int NT, typename Mul>
__device__ __forceinline__ void write_rows(E* dst, const float* src, int rows, Mul mul) {
  for (int idx = threadIdx.x; idx < rows * (D / 8); idx += NT) {
    const int r = idx / (D / 8), d = (idx % (D / 8)) * 8;
    const float m = mul(r);
    Vec<E, 8> out;
#pragma unroll
    for (int i = 0; i < 8; ++i) out.v[i] = from_f<E>(src[r * LD + d + i] * m);
    *reinterpret_cast<Vec<E, 8>*>(dst + int64_t(r) * D + d) = out;
  }
}

template <typename E>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major>;
template <typename E>
using FragAc = wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::col_major>;
template <typename E>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major>;
template <typename E>
using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ABLATE_NSA_TC_BODY 1
#else
#define ABLATE_NSA_TC_BODY 0
#endif

// ---- query-centric kernels: forward and dq ----

template <typename E, int D, bool kBwd>
struct QLayout {
  static constexpr int KP = D + 8;   // E row stride of Q, dO, K, V
  static constexpr int SP = kT + 4;  // fp32 row stride of S, dP
  static constexpr int PP = kT + 8;  // E row stride of P, dS
  static constexpr int OP = D + 4;   // fp32 row stride of O / dq
  static constexpr size_t kQ = 0;                                          // [kM][KP] E
  static constexpr size_t kDO = align128(kQ + kM * KP * sizeof(E));        // [kM][KP] E (dq only; empty in fwd)
  static constexpr size_t kK = align128(kDO + (kBwd ? kM : 0) * KP * sizeof(E));  // [kT][KP] E
  static constexpr size_t kV = align128(kK + kT * KP * sizeof(E));         // [kT][KP] E
  static constexpr size_t kS = align128(kV + kT * KP * sizeof(E));         // [kM][SP] fp32
  static constexpr size_t kDP = align128(kS + kM * SP * sizeof(float));    // [kM][SP] fp32 (dq only; empty in fwd)
  static constexpr size_t kP = align128(kDP + (kBwd ? kM : 0) * SP * sizeof(float));  // [kM][PP] E
  static constexpr size_t kO = align128(kP + kM * PP * sizeof(E));         // [kM][OP] fp32
  static constexpr size_t kRow = align128(kO + kM * OP * sizeof(float));   // 4 x [kM] fp32
  static constexpr size_t kBytes = kRow + 4 * kM * sizeof(float);
};

template <typename E, int D>
__global__ void __launch_bounds__(kQThreads, 4) fwd_tc_kernel(NsaSelectFwdArgs a) {
#if ABLATE_NSA_TC_BODY
  using L = QLayout<E, D, false>;
  constexpr int KP = L::KP, SP = L::SP, PP = L::PP, OP = L::OP;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem + L::kQ);
  E* Ks = reinterpret_cast<E*>(smem + L::kK);
  E* Vs = reinterpret_cast<E*>(smem + L::kV);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  E* Ps = reinterpret_cast<E*>(smem + L::kP);
  float* Os = reinterpret_cast<float*>(smem + L::kO);
  float* alpha_s = reinterpret_cast<float*>(smem + L::kRow);
  float* m_s = alpha_s + kM;
  float* l_s = m_s + kM;

  const int64_t T = a.s.T, KV = a.s.KV, H = a.s.H;
  const int G = static_cast<int>(H / KV);
  const int64_t bt = blockIdx.x / KV;  // b * T + t
  const int c = static_cast<int>(blockIdx.x % KV);
  const int64_t t = bt % T, b = bt / T;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const E* q = static_cast<const E*>(a.q) + (bt * H + int64_t(c) * G) * D;
  const E* k = static_cast<const E*>(a.k) + (b * T * KV + c) * D;  // + s * KV * D
  const E* v = static_cast<const E*>(a.v) + (b * T * KV + c) * D;

  copy_rows<E, D, KP, kM, kQThreads>(Qs, [&](int r) -> const E* { return r < G ? q + int64_t(r) * D : nullptr; });
  for (int i = tid; i < kM * OP; i += kQThreads) Os[i] = 0.f;
  __syncthreads();
  FragA<E> qa[D / 16];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) wmma::load_matrix_sync(qa[ks], Qs + 16 * ks, KP);

  const float qscale = a.s.scale * kLog2e;
  float m_r[kM / 4], l_r[kM / 4];
#pragma unroll
  for (int i = 0; i < kM / 4; ++i) {
    m_r[i] = ninf();
    l_r[i] = 0.f;
  }

  const int64_t* idx = a.block_idx + blockIdx.x * a.s.num_selected;
  const int64_t lp = a.s.block;
  for (int64_t slot = 0; slot < a.s.num_selected; ++slot) {
    const int64_t blk = idx[slot];
    if (blk < 0 || blk * lp > t) continue;
    const int64_t end = imin(blk * lp + lp, t + 1);  // allowed tokens: [blk * lp, end)
    for (int64_t s0 = blk * lp; s0 < end; s0 += kT) {
      const int nk = static_cast<int>(imin(kT, end - s0));
      __syncthreads();  // the previous tile's readers of Ks, Vs, Ps are done
      copy_rows<E, D, KP, kT, kQThreads>(Ks,
          [&](int r) -> const E* { return r < nk ? k + (s0 + r) * KV * D : nullptr; });
      copy_rows<E, D, KP, kT, kQThreads>(Vs,
          [&](int r) -> const E* { return r < nk ? v + (s0 + r) * KV * D : nullptr; });
      __syncthreads();
      // S = Q K^T, key columns 16 * warp .. + 15.
      {
        FragC sacc;
        wmma::fill_fragment(sacc, 0.f);
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          FragBc<E> kb;
          wmma::load_matrix_sync(kb, Ks + (16 * warp) * KP + 16 * ks, KP);
          wmma::mma_sync(sacc, qa[ks], kb, sacc);
        }
        wmma::store_matrix_sync(Ss + 16 * warp, sacc, SP, wmma::mem_row_major);
      }
      __syncthreads();
      // Online softmax (log2 domain): warp owns rows warp + 4i.
#pragma unroll
      for (int i = 0; i < kM / 4; ++i) {
        const int g = warp + 4 * i;
        const float x0 = lane < nk ? Ss[g * SP + lane] * qscale : ninf();
        const float x1 = lane + 32 < nk ? Ss[g * SP + lane + 32] * qscale : ninf();
        const float mn = fmaxf(m_r[i], warp_max(fmaxf(x0, x1)));
        float p0 = 0.f, p1 = 0.f, al = 1.f;
        if (mn != ninf()) {
          p0 = exp2f(x0 - mn);
          p1 = exp2f(x1 - mn);
          al = exp2f(m_r[i] - mn);
        }
        l_r[i] = l_r[i] * al + warp_sum(p0 + p1);
        m_r[i] = mn;
        Ps[g * PP + lane] = from_f<E>(p0);
        Ps[g * PP + lane + 32] = from_f<E>(p1);
        if (lane == 0) alpha_s[g] = al;
      }
      __syncthreads();
      // O = alpha O + P V, channel tiles warp + 4i (O lives in shared memory, each tile owned by one warp).
#pragma unroll
      for (int i = 0; i < D / 64; ++i) {
        const int nt = warp + 4 * i;
        float* ot = Os + 16 * nt;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int e = lane + 32 * u;
          ot[(e >> 4) * OP + (e & 15)] *= alpha_s[e >> 4];
        }
        __syncwarp();
        FragC oacc;
        wmma::load_matrix_sync(oacc, ot, OP, wmma::mem_row_major);
#pragma unroll
        for (int ks = 0; ks < kT / 16; ++ks) {
          FragA<E> pa;
          FragB<E> vb;
          wmma::load_matrix_sync(pa, Ps + 16 * ks, PP);
          wmma::load_matrix_sync(vb, Vs + (16 * ks) * KP + 16 * nt, KP);
          wmma::mma_sync(oacc, pa, vb, oacc);
        }
        wmma::store_matrix_sync(ot, oacc, OP, wmma::mem_row_major);
        __syncwarp();
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kM / 4; ++i) {
      m_s[warp + 4 * i] = m_r[i];
      l_s[warp + 4 * i] = l_r[i];
    }
  }
  __syncthreads();
  E* o = static_cast<E*>(a.o) + (bt * H + int64_t(c) * G) * D;
  write_rows<E, D, OP, kQThreads>(o, Os, G, [&](int g) {
    const float l = l_s[g];
    return l > 0.f ? 1.f / l : 0.f;
  });
  if (tid < G) {
    const float l = l_s[tid];
    a.lse[bt * H + int64_t(c) * G + tid] = l > 0.f ? (m_s[tid] + log2f(l)) * kLn2 : ninf();
  }
#else
  __trap();
#endif
}

template <typename E, int D>
__global__ void __launch_bounds__(kQThreads, 4) dq_tc_kernel(NsaSelectBwdArgs a) {
#if ABLATE_NSA_TC_BODY
  using L = QLayout<E, D, true>;
  constexpr int KP = L::KP, SP = L::SP, PP = L::PP, OP = L::OP;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem + L::kQ);
  E* dOs = reinterpret_cast<E*>(smem + L::kDO);
  E* Ks = reinterpret_cast<E*>(smem + L::kK);
  E* Vs = reinterpret_cast<E*>(smem + L::kV);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  float* dPs = reinterpret_cast<float*>(smem + L::kDP);
  E* dSs = reinterpret_cast<E*>(smem + L::kP);
  float* Os = reinterpret_cast<float*>(smem + L::kO);
  float* lse_s = reinterpret_cast<float*>(smem + L::kRow);
  float* delta_s = lse_s + kM;

  const int64_t T = a.s.T, KV = a.s.KV, H = a.s.H;
  const int G = static_cast<int>(H / KV);
  const int64_t bt = blockIdx.x / KV;
  const int c = static_cast<int>(blockIdx.x % KV);
  const int64_t t = bt % T, b = bt / T;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row0 = bt * H + int64_t(c) * G;
  const E* q = static_cast<const E*>(a.q) + row0 * D;
  const E* dout = static_cast<const E*>(a.dout) + row0 * D;
  const E* k = static_cast<const E*>(a.k) + (b * T * KV + c) * D;
  const E* v = static_cast<const E*>(a.v) + (b * T * KV + c) * D;

  copy_rows<E, D, KP, kM, kQThreads>(Qs, [&](int r) -> const E* { return r < G ? q + int64_t(r) * D : nullptr; });
  copy_rows<E, D, KP, kM, kQThreads>(dOs, [&](int r) -> const E* { return r < G ? dout + int64_t(r) * D : nullptr; });
  if (tid < kM) {
    lse_s[tid] = tid < G ? a.lse[row0 + tid] * kLog2e : ninf();
    delta_s[tid] = tid < G ? a.delta[row0 + tid] : 0.f;
  }
  const float qscale = a.s.scale * kLog2e;

  FragC acc[D / 64];
#pragma unroll
  for (int i = 0; i < D / 64; ++i) wmma::fill_fragment(acc[i], 0.f);

  const int64_t* idx = a.block_idx + blockIdx.x * a.s.num_selected;
  const int64_t lp = a.s.block;
  for (int64_t slot = 0; slot < a.s.num_selected; ++slot) {
    const int64_t blk = idx[slot];
    if (blk < 0 || blk * lp > t) continue;
    const int64_t end = imin(blk * lp + lp, t + 1);
    for (int64_t s0 = blk * lp; s0 < end; s0 += kT) {
      const int nk = static_cast<int>(imin(kT, end - s0));
      __syncthreads();  // previous tile's readers of Ks, dSs are done (and Q/dO/lse staging on the first pass)
      copy_rows<E, D, KP, kT, kQThreads>(Ks,
          [&](int r) -> const E* { return r < nk ? k + (s0 + r) * KV * D : nullptr; });
      copy_rows<E, D, KP, kT, kQThreads>(Vs,
          [&](int r) -> const E* { return r < nk ? v + (s0 + r) * KV * D : nullptr; });
      __syncthreads();
      // S = Q K^T and dP = dO V^T for key columns 16 * warp .. + 15; then dS for the same columns by this warp.
      {
        FragC sacc, dpacc;
        wmma::fill_fragment(sacc, 0.f);
        wmma::fill_fragment(dpacc, 0.f);
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          FragA<E> xa;
          FragBc<E> yb;
          wmma::load_matrix_sync(xa, Qs + 16 * ks, KP);
          wmma::load_matrix_sync(yb, Ks + (16 * warp) * KP + 16 * ks, KP);
          wmma::mma_sync(sacc, xa, yb, sacc);
          wmma::load_matrix_sync(xa, dOs + 16 * ks, KP);
          wmma::load_matrix_sync(yb, Vs + (16 * warp) * KP + 16 * ks, KP);
          wmma::mma_sync(dpacc, xa, yb, dpacc);
        }
        wmma::store_matrix_sync(Ss + 16 * warp, sacc, SP, wmma::mem_row_major);
        wmma::store_matrix_sync(dPs + 16 * warp, dpacc, SP, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int e = lane + 32 * u;
          const int r = e >> 4, j = 16 * warp + (e & 15);
          const float lse = lse_s[r];
          const float p = (j < nk && lse != ninf()) ? exp2f(Ss[r * SP + j] * qscale - lse) : 0.f;
          dSs[r * PP + j] = from_f<E>(p * (dPs[r * SP + j] - delta_s[r]));
        }
      }
      __syncthreads();
      // dq += dS K, channel tiles warp + 4i.
#pragma unroll
      for (int i = 0; i < D / 64; ++i) {
        const int nt = warp + 4 * i;
#pragma unroll
        for (int ks = 0; ks < kT / 16; ++ks) {
          FragA<E> da;
          FragB<E> kb;
          wmma::load_matrix_sync(da, dSs + 16 * ks, PP);
          wmma::load_matrix_sync(kb, Ks + (16 * ks) * KP + 16 * nt, KP);
          wmma::mma_sync(acc[i], da, kb, acc[i]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < D / 64; ++i) wmma::store_matrix_sync(Os + 16 * (warp + 4 * i), acc[i], OP, wmma::mem_row_major);
  __syncthreads();
  const float sc = a.s.scale;
  write_rows<E, D, OP, kQThreads>(static_cast<E*>(a.dq) + row0 * D, Os, G, [&](int) { return sc; });
#else
  __trap();
#endif
}

// ---- key-centric kernel: dk, dv ----

template <typename E, int D>
struct KLayout {
  static constexpr int KP = D + 8;   // E row stride of K, V, Q, dO
  static constexpr int SP = kT + 4;  // fp32 row stride of S, dP
  static constexpr int PP = kT + 8;  // E row stride of P, dS
  static constexpr int OP = D + 4;   // fp32 row stride of the final dK / dV staging
  static constexpr size_t kK = 0;                                          // [kT][KP] E
  static constexpr size_t kV = align128(kK + kT * KP * sizeof(E));         // [kT][KP] E
  static constexpr size_t kQ = align128(kV + kT * KP * sizeof(E));         // [kR][KP] E
  static constexpr size_t kDO = align128(kQ + kR * KP * sizeof(E));        // [kR][KP] E
  static constexpr size_t kS = align128(kDO + kR * KP * sizeof(E));        // [kR][SP] fp32
  static constexpr size_t kDP = align128(kS + kR * SP * sizeof(float));    // [kR][SP] fp32
  static constexpr size_t kP = align128(kDP + kR * SP * sizeof(float));    // [kR][PP] E
  static constexpr size_t kDS = align128(kP + kR * PP * sizeof(E));        // [kR][PP] E
  static constexpr size_t kRow = align128(kDS + kR * PP * sizeof(E));      // lse, delta, t per row
  static constexpr size_t kBytes = kRow + 3 * kR * sizeof(float);
  // The final [kT][OP] fp32 staging reuses the chunk buffers from kQ on.
  static_assert(kQ + kT * OP * sizeof(float) <= kRow, "dK/dV staging does not fit over the chunk buffers");
};

template <typename E, int D>
__global__ void __launch_bounds__(kKThreads, 2) dkdv_tc_kernel(NsaSelectBwdArgs a, int ntiles) {
#if ABLATE_NSA_TC_BODY
  using L = KLayout<E, D>;
  constexpr int KP = L::KP, SP = L::SP, PP = L::PP, OP = L::OP;
  constexpr int NTD = D / 16;                         // channel tiles
  constexpr int NTW = (kT / 16) * NTD / (kKThreads / 32);  // dK (and dV) output tiles per warp: 2 or 4
  extern __shared__ __align__(128) unsigned char smem[];
  E* Ks = reinterpret_cast<E*>(smem + L::kK);
  E* Vs = reinterpret_cast<E*>(smem + L::kV);
  E* Qs = reinterpret_cast<E*>(smem + L::kQ);
  E* dOs = reinterpret_cast<E*>(smem + L::kDO);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  float* dPs = reinterpret_cast<float*>(smem + L::kDP);
  E* Ps = reinterpret_cast<E*>(smem + L::kP);
  E* dSs = reinterpret_cast<E*>(smem + L::kDS);
  float* lse_s = reinterpret_cast<float*>(smem + L::kRow);
  float* delta_s = lse_s + kR;
  int* t_s = reinterpret_cast<int*>(delta_s + kR);
  float* Stage = reinterpret_cast<float*>(smem + L::kQ);

  const int64_t T = a.s.T, KV = a.s.KV, H = a.s.H, lp = a.s.block;
  const int64_t ns = (T + lp - 1) / lp;
  const int G = static_cast<int>(H / KV);
  const int64_t seg = blockIdx.x / ntiles;
  const int tile = static_cast<int>(blockIdx.x % ntiles);
  const int64_t key = a.inv.seg_key[seg];
  const int64_t blk = key % ns, bc = key / ns;
  const int c = static_cast<int>(bc % KV);
  const int64_t b = bc / KV;
  const int64_t s0 = blk * lp + int64_t(tile) * kT;
  const int64_t s1 = imin(imin(blk * lp + lp, s0 + kT), T);
  if (s0 >= s1) return;  // uniform over the block
  const int nk = static_cast<int>(s1 - s0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const E* k = static_cast<const E*>(a.k) + (b * T * KV + c) * D;
  const E* v = static_cast<const E*>(a.v) + (b * T * KV + c) * D;
  copy_rows<E, D, KP, kT, kKThreads>(Ks, [&](int r) -> const E* { return r < nk ? k + (s0 + r) * KV * D : nullptr; });
  copy_rows<E, D, KP, kT, kKThreads>(Vs, [&](int r) -> const E* { return r < nk ? v + (s0 + r) * KV * D : nullptr; });

  const int32_t* rows_t = a.inv.rows_t + a.inv.seg_start[seg];
  const int len = a.inv.seg_len[seg];
  const int qc = kR / G;     // queries per chunk (G <= 16, so >= 2)
  const int rows = qc * G;   // <= kR
  const E* qbase = static_cast<const E*>(a.q) + (b * T * H + int64_t(c) * G) * D;  // + t * H * D + g * D
  const E* obase = static_cast<const E*>(a.dout) + (b * T * H + int64_t(c) * G) * D;
  const float* lse_b = a.lse + b * T * H + int64_t(c) * G;
  const float* delta_b = a.delta + b * T * H + int64_t(c) * G;
  const float qscale = a.s.scale * kLog2e;

  FragC dk[NTW], dv[NTW];
#pragma unroll
  for (int i = 0; i < NTW; ++i) {
    wmma::fill_fragment(dk[i], 0.f);
    wmma::fill_fragment(dv[i], 0.f);
  }
  const int rt = warp >> 2, kt = warp & 3;  // this warp's S / dP tile: rows 16 rt.., keys 16 kt..

  for (int q0 = 0; q0 < len; q0 += qc) {
    __syncthreads();  // previous chunk's readers are done (and K/V staging on the first pass)
    auto row_t = [&](int r) -> int { return (r < rows && q0 + r / G < len) ? rows_t[q0 + r / G] : -1; };
    copy_rows<E, D, KP, kR, kKThreads>(Qs, [&](int r) -> const E* {
      const int tq = row_t(r);
      return tq >= 0 ? qbase + int64_t(tq) * H * D + (r % G) * D : nullptr;
    });
    copy_rows<E, D, KP, kR, kKThreads>(dOs, [&](int r) -> const E* {
      const int tq = row_t(r);
      return tq >= 0 ? obase + int64_t(tq) * H * D + (r % G) * D : nullptr;
    });
    if (tid < kR) {
      const int tq = row_t(tid);
      t_s[tid] = tq;
      lse_s[tid] = tq >= 0 ? lse_b[int64_t(tq) * H + tid % G] * kLog2e : ninf();
      delta_s[tid] = tq >= 0 ? delta_b[int64_t(tq) * H + tid % G] : 0.f;
    }
    __syncthreads();
    {
      FragC sacc, dpacc;
      wmma::fill_fragment(sacc, 0.f);
      wmma::fill_fragment(dpacc, 0.f);
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        FragA<E> xa;
        FragBc<E> yb;
        wmma::load_matrix_sync(xa, Qs + (16 * rt) * KP + 16 * ks, KP);
        wmma::load_matrix_sync(yb, Ks + (16 * kt) * KP + 16 * ks, KP);
        wmma::mma_sync(sacc, xa, yb, sacc);
        wmma::load_matrix_sync(xa, dOs + (16 * rt) * KP + 16 * ks, KP);
        wmma::load_matrix_sync(yb, Vs + (16 * kt) * KP + 16 * ks, KP);
        wmma::mma_sync(dpacc, xa, yb, dpacc);
      }
      wmma::store_matrix_sync(Ss + (16 * rt) * SP + 16 * kt, sacc, SP, wmma::mem_row_major);
      wmma::store_matrix_sync(dPs + (16 * rt) * SP + 16 * kt, dpacc, SP, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int e = lane + 32 * u;
        const int r = 16 * rt + (e >> 4), j = 16 * kt + (e & 15);
        const int tq = t_s[r];
        const float lse = lse_s[r];
        const bool ok = j < nk && tq >= 0 && s0 + j <= tq && lse != ninf();
        const float p = ok ? exp2f(Ss[r * SP + j] * qscale - lse) : 0.f;
        Ps[r * PP + j] = from_f<E>(p);
        dSs[r * PP + j] = from_f<E>(p * (dPs[r * SP + j] - delta_s[r]));
      }
    }
    __syncthreads();
    // dV += P^T dO, dK += dS^T Q over the chunk's rows; output tile w + 8i = (key tile, channel tile).
#pragma unroll
    for (int i = 0; i < NTW; ++i) {
      const int ot = warp + (kKThreads / 32) * i;
      const int okt = ot / NTD, ont = ot % NTD;
#pragma unroll
      for (int ks = 0; ks < kR / 16; ++ks) {
        FragAc<E> xa;  // (P or dS)^T: element (key m, row k) at X[k * PP + m]
        FragB<E> yb;
        wmma::load_matrix_sync(xa, Ps + (16 * ks) * PP + 16 * okt, PP);
        wmma::load_matrix_sync(yb, dOs + (16 * ks) * KP + 16 * ont, KP);
        wmma::mma_sync(dv[i], xa, yb, dv[i]);
        wmma::load_matrix_sync(xa, dSs + (16 * ks) * PP + 16 * okt, PP);
        wmma::load_matrix_sync(yb, Qs + (16 * ks) * KP + 16 * ont, KP);
        wmma::mma_sync(dk[i], xa, yb, dk[i]);
      }
    }
  }
  // Accumulators -> shared fp32 -> one atomicAdd per element (dV, then dK times scale).
  const int64_t out0 = ((b * T + s0) * KV + c) * D;  // + j * KV * D + d
  auto flush = [&](FragC(&acc)[NTW], float* dst, float mul) {
    __syncthreads();  // the chunk's readers / the previous flush's readers are done with the shared memory
#pragma unroll
    for (int i = 0; i < NTW; ++i) {
      const int ot = warp + (kKThreads / 32) * i;
      wmma::store_matrix_sync(Stage + (16 * (ot / NTD)) * OP + 16 * (ot % NTD), acc[i], OP, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < nk * D; e += kKThreads) {
      const int j = e / D, d = e % D;
      atomicAdd(dst + out0 + int64_t(j) * KV * D + d, Stage[j * OP + d] * mul);
    }
  };
  flush(dv, a.dv, 1.f);
  flush(dk, a.dk, a.s.scale);
#else
  __trap();
#endif
}

// ---- launchers ----

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename E, int D>
cudaError_t launch_fwd(const NsaSelectFwdArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.s.B * a.s.T * a.s.KV;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  constexpr size_t bytes = QLayout<E, D, false>::kBytes;
  if (const auto e = allow_smem(fwd_tc_kernel<E, D>, bytes); e != cudaSuccess) return e;
  fwd_tc_kernel<E, D><<<static_cast<unsigned>(blocks), kQThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename E, int D>
cudaError_t launch_bwd(const NsaSelectBwdArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.s.B * a.s.T * a.s.KV;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  constexpr size_t bytes = QLayout<E, D, true>::kBytes;
  if (const auto e = allow_smem(dq_tc_kernel<E, D>, bytes); e != cudaSuccess) return e;
  dq_tc_kernel<E, D><<<static_cast<unsigned>(blocks), kQThreads, bytes, stream>>>(a);
  if (const auto e = cudaGetLastError(); e != cudaSuccess) return e;
  const int ntiles = static_cast<int>((a.s.block + kT - 1) / kT);
  const int64_t kblocks = a.inv.num_segments * ntiles;
  if (kblocks == 0) return cudaSuccess;
  if (kblocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  constexpr size_t kbytes = KLayout<E, D>::kBytes;
  if (const auto e = allow_smem(dkdv_tc_kernel<E, D>, kbytes); e != cudaSuccess) return e;
  dkdv_tc_kernel<E, D><<<static_cast<unsigned>(kblocks), kKThreads, kbytes, stream>>>(a, ntiles);
  return cudaGetLastError();
}

template <typename E>
cudaError_t fwd_typed(const NsaSelectFwdArgs& a, cudaStream_t stream) {
  return a.s.head_dim == 64 ? launch_fwd<E, 64>(a, stream) : launch_fwd<E, 128>(a, stream);
}

template <typename E>
cudaError_t bwd_typed(const NsaSelectBwdArgs& a, cudaStream_t stream) {
  return a.s.head_dim == 64 ? launch_bwd<E, 64>(a, stream) : launch_bwd<E, 128>(a, stream);
}

// Tensor cores of sm_80 or newer (bf16 wmma) on the current device.
bool device_has_bf16_mma() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 8;
}

}  // namespace

bool nsa_select_tc_applies(const NsaSelectShape& s) {
  if (!nsa_select_tensor_cores()) return false;
  if (s.dtype != NsaDtype::kBF16 && s.dtype != NsaDtype::kF16) return false;
  if (s.KV <= 0 || s.H % s.KV != 0 || s.num_selected < 0) return false;
  const int64_t G = s.H / s.KV;
  if (!(s.head_dim == 64 || s.head_dim == 128) || G < 1 || G > 16) return false;
  if (!(s.block == 32 || s.block == 64 || s.block == 128)) return false;
  return device_has_bf16_mma();
}

cudaError_t nsa_select_forward_tc(const NsaSelectFwdArgs& a, cudaStream_t stream) {
  if (!nsa_select_tc_applies(a.s)) return cudaErrorInvalidValue;
  nsa_select_note_tc_launch();
  return a.s.dtype == NsaDtype::kBF16 ? fwd_typed<__nv_bfloat16>(a, stream) : fwd_typed<__half>(a, stream);
}

cudaError_t nsa_select_backward_tc(const NsaSelectBwdArgs& a, cudaStream_t stream) {
  if (!nsa_select_tc_applies(a.s)) return cudaErrorInvalidValue;
  nsa_select_note_tc_launch();
  return a.s.dtype == NsaDtype::kBF16 ? bwd_typed<__nv_bfloat16>(a, stream) : bwd_typed<__half>(a, stream);
}

}  // namespace ablate::kernels
