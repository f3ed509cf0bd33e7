// Fused CUDA kernels of the NSA compressed branch (contract in kernels/nsa_compress.h).
//
// STATUS: compiled (sm_80/sm_90) but, when written, never run on a GPU. core/mixers/nsa.cpp uses them only with
// ABLATE_NSA_CMP_FUSED=1 / nsa_set_cmp_fused_enabled(true); tests/mixers/nsa_compress_gpu_test.cpp checks them.
//
// Design (FlashAttention-2 style, in the manner of kernels/nsa_select_tc.cu).
// - Every kernel runs 4 warps. The MMAs are warp-level "16 x N" products (WarpAcc below): for bf16/fp16 wmma
//   16x16x16 with fp32 accumulators (tensor cores, sm_80+), for fp32 plain FMA with a 4 x N/8 register tile per
//   lane. Both read their operands from shared memory, so the kernel bodies are one code for the three dtypes.
//   The wmma fragment layout is opaque, so elementwise work (scaling, masking, softmax, dS) goes through shared
//   memory as fp32, exactly like nsa_select_tc.cu.
// - Query-centric kernels (forward, importance, dq): one thread block per (b, kv head c, query tile). A tile is
//   TQ = 64 / G consecutive queries x the G heads of the group = TQ*G <= 64 rows (row r: query tq0 + r / G, head
//   c*G + r % G; rows past TQ*G or past the end are zero and never written); warp w owns rows 16w .. 16w + 15. So
//   the G heads of a group share every compressed K/V tile (KT = 64 keys for bf16/fp16, 32 for fp32 to keep the
//   fp32 shared memory under the 163 KB of an A100). A tile walks keys [0, ne(last query)) and masks per row with
//   key j < ne(t_r) (the causal rule j*d + l - 1 <= t). Blocks are issued longest rows first.
//     forward:    S = Q K^T (fp32), online softmax in the log2 domain (m, l of row i in lanes i and i + 16),
//                 P rounded to the input type, O += P V in registers; O is rescaled (through shared
//                 memory for wmma) only when some row max moved. o = O / l, lse = (m + log2 l) ln 2; a row that
//                 sees no key gets o = 0, lse = -inf.
//     importance: S again, P = exp2(S log2e - lse log2e) in place (fp32), then per (query, selection block js)
//                 touched by the tile: sum over the tile's compressed blocks i of |sub-blocks shared| * sum_g P.
//                 Each (query, js) entry belongs to this block only, so it is a plain read-add-write into the
//                 caller's zeroed (B, KV, chunk, cols) buffer; consecutive key tiles that share a boundary js are
//                 ordered by the __syncthreads between them. No atomics, deterministic.
//     dq:         S and dP = dO V^T per tile, P from lse, dS = P (dP - delta) rounded to the input type,
//                 dq += dS K in registers; dq = scale * dq.
// - dkc/dvc (key-centric): one block per (b, kv head, 64 compressed keys, query segment). Warp w owns keys
//   16w .. 16w + 15 and keeps its dK, dV (16 x hd) in registers; the segment's queries come in chunks of R = 64
//   (fp32: 32) rows (R / G queries x G heads); per chunk the warp computes S^T = K_w Q^T and dP^T = V_w dO^T for
//   its keys, P^T and dS^T (rounded to the input type), then dV += P^T dO and dK += dS^T Q. No cross-warp
//   dependency inside a chunk. Why key-centric with segments and fp32 atomics: a compressed key is seen by every
//   later query, so per-key work grows with T - t; a block per key tile alone would leave the first key tiles
//   (T queries each) as the critical path, and per-(query tile, key tile) atomics from the dq pass would be
//   64x more atomics. Splitting the queries into segments of ~8192 rows gives enough blocks to fill the GPU and
//   costs one fp32 atomicAdd per (key, channel) per segment. (Summation order across segments is therefore
//   not deterministic.)
// - Shared-memory rows are padded by 16 bytes (8 bf16/fp16 or 4 fp32): wmma tile pointers stay 32-byte aligned
//   (every region starts 128-byte aligned), float4 rows of the FMA path stay 16-byte aligned, and rows fall in
//   distinct bank groups. Every kernel asks for dynamic shared memory (up to ~160 KB) through allow_smem.
// Not done: fusing the top-n (nsa_select_blocks runs on the importance chunk), cp.async double buffering, packing
// query tiles of several kv heads, mma.sync with register-resident softmax.
#include "kernels/nsa_compress.h"
#include "kernels/cuda_common.cuh"
#include "kernels/warp_mma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ablate::kernels {
namespace {

using cuda_common::copy_rows;
using cuda_common::from_f;
using cuda_common::warp_max;
using cuda_common::warp_sum;
using warp_mma::align128;
using warp_mma::allow_smem;
using warp_mma::kPad;
using warp_mma::kTC;
using warp_mma::WarpAcc;

constexpr int kRows = 64;           // (query, head) rows per block of the query-centric kernels: 4 warps x 16
constexpr int kThreads = 128;       // 4 warps, every kernel
constexpr int kKeys = 64;           // compressed keys per block of the dkc/dvc kernel: 4 warps x 16
constexpr int64_t kSegRows = 8192;  // (query, head) rows per dkc/dvc segment
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename E>
constexpr int kKT = kTC<E> ? 64 : 32;  // compressed keys per tile of the query-centric kernels
template <typename E>
constexpr int kR = kTC<E> ? 64 : 32;  // rows per query chunk of the dkc/dvc kernel
constexpr size_t kSmemMax = 160 * 1024;  // below the 163 KB opt-in limit of sm_80

__device__ __forceinline__ float ninf() { return -INFINITY; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Compressed blocks visible to query t: j*d + l - 1 <= t (core/mixers/nsa.cpp cmp_visible).
__device__ __forceinline__ int64_t visible(int64_t t, int64_t l, int64_t d, int64_t nc) {
  if (t < l - 1) return 0;
  return imin(nc, (t - l + 1) / d + 1);
}

// ---- shared-memory layouts ----

// Forward: Q rows, one K/V tile, S (fp32), P (E), an O scratch (rescale, final staging), per-row scalars.
template <typename E, int D>
struct FwdLayout {
  static constexpr int KT = kKT<E>;
  static constexpr int KP = D + kPad<E>;   // E row stride of Q, K, V
  static constexpr int SP = KT + 4;        // fp32 row stride of S
  static constexpr int PP = KT + kPad<E>;  // E row stride of P
  static constexpr int OP = D + 4;         // fp32 row stride of O
  static constexpr size_t kQ = 0;                                                // [kRows][KP] E
  static constexpr size_t kK = align128(kQ + size_t(kRows) * KP * sizeof(E));    // [KT][KP] E
  static constexpr size_t kV = align128(kK + size_t(KT) * KP * sizeof(E));       // [KT][KP] E
  static constexpr size_t kS = align128(kV + size_t(KT) * KP * sizeof(E));       // [kRows][SP] fp32
  static constexpr size_t kP = align128(kS + size_t(kRows) * SP * sizeof(float));  // [kRows][PP] E
  static constexpr size_t kO = align128(kP + size_t(kRows) * PP * sizeof(E));     // [kRows][OP] fp32
  static constexpr size_t kRow = align128(kO + size_t(kRows) * OP * sizeof(float));  // ne (int), alpha, m, l
  static constexpr size_t kBytes = kRow + 4 * kRows * sizeof(float);
  static_assert(kBytes <= kSmemMax, "forward shared memory");
};

// Importance: Q rows, one K tile, S / P (fp32, in place), per-row scalars.
template <typename E, int D>
struct ImpLayout {
  static constexpr int KT = kKT<E>;
  static constexpr int KP = D + kPad<E>;
  static constexpr int SP = KT + 4;
  static constexpr size_t kQ = 0;                                                  // [kRows][KP] E
  static constexpr size_t kK = align128(kQ + size_t(kRows) * KP * sizeof(E));      // [KT][KP] E
  static constexpr size_t kS = align128(kK + size_t(KT) * KP * sizeof(E));         // [kRows][SP] fp32
  static constexpr size_t kRow = align128(kS + size_t(kRows) * SP * sizeof(float));  // ne (int), lse2
  static constexpr size_t kBytes = kRow + 2 * kRows * sizeof(float);
  static_assert(kBytes <= kSmemMax, "importance shared memory");
};

// dq: Q and dO rows, one K/V tile, S and dP (fp32), dS (E), per-row scalars; the final dq staging reuses the
// space from the K tile on.
template <typename E, int D>
struct DqLayout {
  static constexpr int KT = kKT<E>;
  static constexpr int KP = D + kPad<E>;
  static constexpr int SP = KT + 4;
  static constexpr int PP = KT + kPad<E>;
  static constexpr int OP = D + 4;
  static constexpr size_t kQ = 0;                                                  // [kRows][KP] E
  static constexpr size_t kDO = align128(kQ + size_t(kRows) * KP * sizeof(E));     // [kRows][KP] E
  static constexpr size_t kK = align128(kDO + size_t(kRows) * KP * sizeof(E));     // [KT][KP] E
  static constexpr size_t kV = align128(kK + size_t(KT) * KP * sizeof(E));         // [KT][KP] E
  static constexpr size_t kS = align128(kV + size_t(KT) * KP * sizeof(E));         // [kRows][SP] fp32
  static constexpr size_t kDP = align128(kS + size_t(kRows) * SP * sizeof(float));   // [kRows][SP] fp32
  static constexpr size_t kP = align128(kDP + size_t(kRows) * SP * sizeof(float));   // [kRows][PP] E (dS)
  static constexpr size_t kRow = align128(kP + size_t(kRows) * PP * sizeof(E));      // ne (int), lse2, delta
  static constexpr size_t kBytes = kRow + 3 * kRows * sizeof(float);
  static constexpr size_t kO = kK;  // [kRows][OP] fp32 after the key loop
  static_assert(kO + size_t(kRows) * OP * sizeof(float) <= kRow, "dq staging overlaps the row scalars");
  static_assert(kBytes <= kSmemMax, "dq shared memory");
};

// dkc/dvc: the block's K/V keys, Q and dO rows of one chunk, S^T and dP^T (fp32), P^T and dS^T (E), per-row
// scalars; the final dK/dV staging reuses the space from the Q rows on.
template <typename E, int D>
struct KvLayout {
  static constexpr int R = kR<E>;
  static constexpr int KP = D + kPad<E>;  // E row stride of K, V, Q, dO
  static constexpr int SP = R + 4;        // fp32 row stride of S^T, dP^T (one row per key)
  static constexpr int PP = R + kPad<E>;  // E row stride of P^T, dS^T
  static constexpr int OP = D + 4;        // fp32 row stride of the dK/dV staging
  static constexpr size_t kK = 0;                                                  // [kKeys][KP] E
  static constexpr size_t kV = align128(kK + size_t(kKeys) * KP * sizeof(E));      // [kKeys][KP] E
  static constexpr size_t kQ = align128(kV + size_t(kKeys) * KP * sizeof(E));      // [R][KP] E
  static constexpr size_t kDO = align128(kQ + size_t(R) * KP * sizeof(E));         // [R][KP] E
  static constexpr size_t kS = align128(kDO + size_t(R) * KP * sizeof(E));         // [kKeys][SP] fp32
  static constexpr size_t kDP = align128(kS + size_t(kKeys) * SP * sizeof(float));   // [kKeys][SP] fp32
  static constexpr size_t kP = align128(kDP + size_t(kKeys) * SP * sizeof(float));   // [kKeys][PP] E
  static constexpr size_t kDS = align128(kP + size_t(kKeys) * PP * sizeof(E));       // [kKeys][PP] E
  static constexpr size_t kRow = align128(kDS + size_t(kKeys) * PP * sizeof(E));     // ne (int), lse2, delta
  static constexpr size_t kBytes = kRow + 3 * R * sizeof(float);
  static constexpr size_t kStage = kQ;  // [kKeys][OP] fp32 after the query loop
  static_assert(kStage + size_t(kKeys) * OP * sizeof(float) <= kRow, "dK/dV staging overlaps the row scalars");
  static_assert(kBytes <= kSmemMax, "dkc/dvc shared memory");
};

// The (query, head) rows of a query-centric tile: row r is query tq0 + r / G (valid below tend) and head
// c * G + r % G; rows >= TQ * G are padding.
struct Rows {
  int64_t tq0, tend;
  int G, n;  // n = TQ * G
  __device__ __forceinline__ int64_t t(int r) const {
    const int64_t tt = tq0 + r / G;
    return (r < n && tt < tend) ? tt : -1;
  }
};

// ---- forward ----

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) cmp_fwd_kernel(NsaCmpFwdArgs a, int64_t ntiles) {
  using L = FwdLayout<E, D>;
  constexpr int KT = L::KT, KP = L::KP, SP = L::SP, PP = L::PP, OP = L::OP;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem + L::kQ);
  E* Ks = reinterpret_cast<E*>(smem + L::kK);
  E* Vs = reinterpret_cast<E*>(smem + L::kV);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  E* Ps = reinterpret_cast<E*>(smem + L::kP);
  float* Os = reinterpret_cast<float*>(smem + L::kO);
  int* ne_s = reinterpret_cast<int*>(smem + L::kRow);
  float* alpha_s = reinterpret_cast<float*>(ne_s + kRows);
  float* m_s = alpha_s + kRows;
  float* l_s = m_s + kRows;

  const int64_t T = a.s.T, H = a.s.H, KV = a.s.KV, nc = a.s.num_cmp, l = a.s.cmp_block, d = a.s.cmp_stride;
  const int G = static_cast<int>(H / KV);
  const int TQ = kRows / G;
  const int64_t BKV = a.s.B * KV;
  const int64_t tile = ntiles - 1 - static_cast<int64_t>(blockIdx.x) / BKV;  // the longest rows first
  const int64_t bc = static_cast<int64_t>(blockIdx.x) % BKV;
  const int64_t b = bc / KV;
  const int c = static_cast<int>(bc % KV);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r0 = 16 * warp;
  Rows rows{tile * TQ, imin(tile * TQ + TQ, T), G, TQ * G};
  const E* q = static_cast<const E*>(a.q);
  const E* kc = static_cast<const E*>(a.kc) + (b * nc * KV + c) * D;  // + j * KV * D
  const E* vc = static_cast<const E*>(a.vc) + (b * nc * KV + c) * D;
  auto row_off = [&](int r, int64_t t) { return ((b * T + t) * H + int64_t(c) * G + r % G) * D; };

  copy_rows<E, D, KP, kRows, kThreads>(Qs, [&](int r) -> const E* {
    const int64_t t = rows.t(r);
    return t >= 0 ? q + row_off(r, t) : nullptr;
  });
  if (tid < kRows) {
    const int64_t t = rows.t(tid);
    ne_s[tid] = t >= 0 ? static_cast<int>(visible(t, l, d, nc)) : 0;
  }
  const int64_t ne_max = visible(rows.tend - 1, l, d, nc);
  const float qscale = a.s.scale * kLog2e;

  WarpAcc<E, D> acc;
  acc.zero();
  // Running max and sum (log2 domain) of row r0 + (lane & 15), held by lanes lane and lane ^ 16.
  float m_mine = ninf(), l_mine = 0.f;
  for (int64_t j0 = 0; j0 < ne_max; j0 += KT) {
    const int nk = static_cast<int>(imin(KT, ne_max - j0));
    __syncthreads();  // the previous tile's readers of Ks, Vs are done (and Q, ne_s are staged on the first pass)
    copy_rows<E, D, KP, KT, kThreads>(Ks, [&](int r) -> const E* { return r < nk ? kc + (j0 + r) * KV * D : nullptr; });
    copy_rows<E, D, KP, KT, kThreads>(Vs, [&](int r) -> const E* { return r < nk ? vc + (j0 + r) * KV * D : nullptr; });
    __syncthreads();
    {
      WarpAcc<E, KT> s;
      s.zero();
      s.template abt<D>(Qs + r0 * KP, KP, Ks, KP);
      s.store(Ss + r0 * SP, SP);
    }
    __syncwarp();
    // Online softmax of this warp's 16 rows, one row at a time over the whole warp.
    bool rescale = false;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int r = r0 + i;
      const int64_t lim = int64_t(ne_s[r]) - j0;  // this row sees the tile's keys j < lim
      float x[KT / 32];
      float mx = ninf();
#pragma unroll
      for (int u = 0; u < KT / 32; ++u) {
        const int j = lane + 32 * u;
        x[u] = j < lim ? Ss[r * SP + j] * qscale : ninf();
        mx = fmaxf(mx, x[u]);
      }
      const float m_old = __shfl_sync(0xffffffffu, m_mine, i);
      const float mn = fmaxf(m_old, warp_max(mx));
      float ps = 0.f;
#pragma unroll
      for (int u = 0; u < KT / 32; ++u) {
        const float p = mn == ninf() ? 0.f : exp2f(x[u] - mn);
        ps += p;
        Ps[r * PP + lane + 32 * u] = from_f<E>(p);
      }
      const float al = mn == ninf() ? 1.f : exp2f(m_old - mn);  // 0 when the row had no key before (O = 0)
      const float rs = warp_sum(ps);
      if ((lane & 15) == i) {
        l_mine = l_mine * al + rs;
        m_mine = mn;
      }
      if (lane == i) alpha_s[r] = al;
      rescale = rescale || al != 1.f;  // uniform over the warp
    }
    __syncwarp();  // P and alpha visible to the whole warp
    if (rescale) acc.scale_rows(alpha_s + r0, Os + r0 * OP, OP);
    acc.template ab<KT>(Ps + r0 * PP, PP, Vs, KP);
  }
  if (lane < 16) {
    m_s[r0 + lane] = m_mine;
    l_s[r0 + lane] = l_mine;
  }
  acc.store(Os + r0 * OP, OP);
  __syncwarp();
  constexpr int V = 16 / sizeof(E);
  E* o = static_cast<E*>(a.o);
  for (int e = lane; e < 16 * (D / V); e += 32) {
    const int r = r0 + e / (D / V), d0 = (e % (D / V)) * V;
    const int64_t t = rows.t(r);
    if (t < 0) continue;
    const float lsum = l_s[r];
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    float vals[V];
#pragma unroll
    for (int i = 0; i < V; ++i) vals[i] = Os[r * OP + d0 + i] * inv;
    cuda_common::store<E, V>(o + row_off(r, t) + d0, vals);
  }
  if (lane < 16) {
    const int r = r0 + lane;
    const int64_t t = rows.t(r);
    if (t >= 0) {
      const float lsum = l_s[r];
      a.lse[(b * T + t) * H + int64_t(c) * G + r % G] = lsum > 0.f ? (m_s[r] + log2f(lsum)) * kLn2 : ninf();
    }
  }
}

// ---- importance ----

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) cmp_imp_kernel(NsaCmpImportanceArgs a, int64_t ntiles) {
  using L = ImpLayout<E, D>;
  constexpr int KT = L::KT, KP = L::KP, SP = L::SP;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem + L::kQ);
  E* Ks = reinterpret_cast<E*>(smem + L::kK);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  int* ne_s = reinterpret_cast<int*>(smem + L::kRow);
  float* lse2_s = reinterpret_cast<float*>(ne_s + kRows);

  const int64_t T = a.s.T, H = a.s.H, KV = a.s.KV, nc = a.s.num_cmp, l = a.s.cmp_block, d = a.s.cmp_stride;
  const int64_t rr = l / d, mm = a.s.slc_block / d;  // stride sub-blocks per compressed / selection block
  const int64_t t0 = a.t0, C = a.t1 - a.t0, cols = a.num_cols;
  const int G = static_cast<int>(H / KV);
  const int TQ = kRows / G;
  const int64_t BKV = a.s.B * KV;
  const int64_t tile = ntiles - 1 - static_cast<int64_t>(blockIdx.x) / BKV;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) % BKV;
  const int64_t b = bc / KV;
  const int c = static_cast<int>(bc % KV);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r0 = 16 * warp;
  Rows rows{t0 + tile * TQ, imin(t0 + tile * TQ + TQ, a.t1), G, TQ * G};
  const E* q = static_cast<const E*>(a.q);
  const E* kc = static_cast<const E*>(a.kc) + (b * nc * KV + c) * D;
  float* imp = a.importance + bc * C * cols;  // (b, c) slab: [C][cols]

  copy_rows<E, D, KP, kRows, kThreads>(Qs, [&](int r) -> const E* {
    const int64_t t = rows.t(r);
    return t >= 0 ? q + ((b * T + t) * H + int64_t(c) * G + r % G) * D : nullptr;
  });
  if (tid < kRows) {
    const int64_t t = rows.t(tid);
    ne_s[tid] = t >= 0 ? static_cast<int>(visible(t, l, d, nc)) : 0;
    lse2_s[tid] = t >= 0 ? a.lse[(b * T + t) * H + int64_t(c) * G + tid % G] * kLog2e : ninf();
  }
  const int64_t ne_max = visible(rows.tend - 1, l, d, nc);
  const float qscale = a.s.scale * kLog2e;

  for (int64_t j0 = 0; j0 < ne_max; j0 += KT) {
    const int nk = static_cast<int>(imin(KT, ne_max - j0));
    __syncthreads();  // the previous tile's readers of Ks, Ss (and its importance writes) are done
    copy_rows<E, D, KP, KT, kThreads>(Ks, [&](int r) -> const E* { return r < nk ? kc + (j0 + r) * KV * D : nullptr; });
    __syncthreads();
    {
      WarpAcc<E, KT> s;
      s.zero();
      s.template abt<D>(Qs + r0 * KP, KP, Ks, KP);
      s.store(Ss + r0 * SP, SP);
    }
    __syncwarp();
    for (int e = lane; e < 16 * KT; e += 32) {
      const int r = r0 + e / KT, j = e % KT;
      const float lse2 = lse2_s[r];
      float* sp = Ss + r * SP + j;
      *sp = (j0 + j < ne_s[r] && lse2 != ninf()) ? exp2f(*sp * qscale - lse2) : 0.f;
    }
    __syncthreads();  // P of every row: a query's G rows may lie in two warps
    // Selection blocks touched by compressed blocks [j0, j0 + nk): sub-blocks j0 .. j0 + nk - 1 + rr - 1.
    const int64_t js_lo = j0 / mm, js_hi = (j0 + nk - 1 + rr - 1) / mm;
    const int njs = static_cast<int>(js_hi - js_lo + 1);
    for (int e = tid; e < TQ * njs; e += kThreads) {
      const int tq = e / njs;
      const int64_t js = js_lo + e % njs;
      const int64_t t = rows.tq0 + tq;
      if (t >= rows.tend || js >= cols) continue;
      const int64_t i_lo = imax(j0, js * mm - rr + 1), i_hi = imin(j0 + nk, js * mm + mm);  // [i_lo, i_hi)
      float sum = 0.f;
      for (int64_t i = i_lo; i < i_hi; ++i) {
        float ps = 0.f;
        for (int g = 0; g < G; ++g) ps += Ss[(tq * G + g) * SP + static_cast<int>(i - j0)];
        const int64_t w = imin(i + rr, js * mm + mm) - imax(i, js * mm);  // shared sub-blocks, >= 1 here
        sum = fmaf(static_cast<float>(w), ps, sum);
      }
      imp[(t - t0) * cols + js] += sum;
    }
  }
}

// ---- dq ----

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) cmp_dq_kernel(NsaCmpBwdArgs a, int64_t ntiles) {
  using L = DqLayout<E, D>;
  constexpr int KT = L::KT, KP = L::KP, SP = L::SP, PP = L::PP, OP = L::OP;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem + L::kQ);
  E* dOs = reinterpret_cast<E*>(smem + L::kDO);
  E* Ks = reinterpret_cast<E*>(smem + L::kK);
  E* Vs = reinterpret_cast<E*>(smem + L::kV);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  float* dPs = reinterpret_cast<float*>(smem + L::kDP);
  E* dSs = reinterpret_cast<E*>(smem + L::kP);
  float* Os = reinterpret_cast<float*>(smem + L::kO);
  int* ne_s = reinterpret_cast<int*>(smem + L::kRow);
  float* lse2_s = reinterpret_cast<float*>(ne_s + kRows);
  float* delta_s = lse2_s + kRows;

  const int64_t T = a.s.T, H = a.s.H, KV = a.s.KV, nc = a.s.num_cmp, l = a.s.cmp_block, d = a.s.cmp_stride;
  const int G = static_cast<int>(H / KV);
  const int TQ = kRows / G;
  const int64_t BKV = a.s.B * KV;
  const int64_t tile = ntiles - 1 - static_cast<int64_t>(blockIdx.x) / BKV;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) % BKV;
  const int64_t b = bc / KV;
  const int c = static_cast<int>(bc % KV);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r0 = 16 * warp;
  Rows rows{tile * TQ, imin(tile * TQ + TQ, T), G, TQ * G};
  const E* q = static_cast<const E*>(a.q);
  const E* dout = static_cast<const E*>(a.dout);
  const E* kc = static_cast<const E*>(a.kc) + (b * nc * KV + c) * D;
  const E* vc = static_cast<const E*>(a.vc) + (b * nc * KV + c) * D;
  auto row_idx = [&](int r, int64_t t) { return (b * T + t) * H + int64_t(c) * G + r % G; };

  copy_rows<E, D, KP, kRows, kThreads>(Qs, [&](int r) -> const E* {
    const int64_t t = rows.t(r);
    return t >= 0 ? q + row_idx(r, t) * D : nullptr;
  });
  copy_rows<E, D, KP, kRows, kThreads>(dOs, [&](int r) -> const E* {
    const int64_t t = rows.t(r);
    return t >= 0 ? dout + row_idx(r, t) * D : nullptr;
  });
  if (tid < kRows) {
    const int64_t t = rows.t(tid);
    ne_s[tid] = t >= 0 ? static_cast<int>(visible(t, l, d, nc)) : 0;
    lse2_s[tid] = t >= 0 ? a.lse[row_idx(tid, t)] * kLog2e : ninf();
    delta_s[tid] = t >= 0 ? a.delta[row_idx(tid, t)] : 0.f;
  }
  const int64_t ne_max = visible(rows.tend - 1, l, d, nc);
  const float qscale = a.s.scale * kLog2e;

  WarpAcc<E, D> acc;
  acc.zero();
  for (int64_t j0 = 0; j0 < ne_max; j0 += KT) {
    const int nk = static_cast<int>(imin(KT, ne_max - j0));
    __syncthreads();  // the previous tile's readers of Ks, Vs are done (and the rows are staged on the first pass)
    copy_rows<E, D, KP, KT, kThreads>(Ks, [&](int r) -> const E* { return r < nk ? kc + (j0 + r) * KV * D : nullptr; });
    copy_rows<E, D, KP, KT, kThreads>(Vs, [&](int r) -> const E* { return r < nk ? vc + (j0 + r) * KV * D : nullptr; });
    __syncthreads();
    {
      WarpAcc<E, KT> s;
      s.zero();
      s.template abt<D>(Qs + r0 * KP, KP, Ks, KP);
      s.store(Ss + r0 * SP, SP);
    }
    {
      WarpAcc<E, KT> s;
      s.zero();
      s.template abt<D>(dOs + r0 * KP, KP, Vs, KP);
      s.store(dPs + r0 * SP, SP);
    }
    __syncwarp();
    for (int e = lane; e < 16 * KT; e += 32) {
      const int r = r0 + e / KT, j = e % KT;
      const float lse2 = lse2_s[r];
      const float p = (j0 + j < ne_s[r] && lse2 != ninf()) ? exp2f(Ss[r * SP + j] * qscale - lse2) : 0.f;
      dSs[r * PP + j] = from_f<E>(p * (dPs[r * SP + j] - delta_s[r]));
    }
    __syncwarp();
    acc.template ab<KT>(dSs + r0 * PP, PP, Ks, KP);
  }
  __syncthreads();  // every warp is done with Ks / Vs: the staging below overwrites them
  acc.store(Os + r0 * OP, OP);
  __syncwarp();
  constexpr int V = 16 / sizeof(E);
  E* dq = static_cast<E*>(a.dq);
  const float sc = a.s.scale;
  for (int e = lane; e < 16 * (D / V); e += 32) {
    const int r = r0 + e / (D / V), d0 = (e % (D / V)) * V;
    const int64_t t = rows.t(r);
    if (t < 0) continue;
    float vals[V];
#pragma unroll
    for (int i = 0; i < V; ++i) vals[i] = Os[r * OP + d0 + i] * sc;
    cuda_common::store<E, V>(dq + row_idx(r, t) * D + d0, vals);
  }
}

// ---- dkc, dvc ----

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) cmp_dkdv_kernel(NsaCmpBwdArgs a, int64_t nkt, int64_t nseg,
                                                             int64_t seg_q) {
  using L = KvLayout<E, D>;
  constexpr int R = L::R, KP = L::KP, SP = L::SP, PP = L::PP, OP = L::OP;
  extern __shared__ __align__(128) unsigned char smem[];
  E* Ks = reinterpret_cast<E*>(smem + L::kK);
  E* Vs = reinterpret_cast<E*>(smem + L::kV);
  E* Qs = reinterpret_cast<E*>(smem + L::kQ);
  E* dOs = reinterpret_cast<E*>(smem + L::kDO);
  float* Ss = reinterpret_cast<float*>(smem + L::kS);
  float* dPs = reinterpret_cast<float*>(smem + L::kDP);
  E* Ps = reinterpret_cast<E*>(smem + L::kP);
  E* dSs = reinterpret_cast<E*>(smem + L::kDS);
  int* ne_s = reinterpret_cast<int*>(smem + L::kRow);
  float* lse2_s = reinterpret_cast<float*>(ne_s + R);
  float* delta_s = lse2_s + R;
  float* Stage = reinterpret_cast<float*>(smem + L::kStage);

  const int64_t T = a.s.T, H = a.s.H, KV = a.s.KV, nc = a.s.num_cmp, l = a.s.cmp_block, d = a.s.cmp_stride;
  const int G = static_cast<int>(H / KV);
  const int64_t BKV = a.s.B * KV;
  const int64_t bc = static_cast<int64_t>(blockIdx.x) % BKV, rest = static_cast<int64_t>(blockIdx.x) / BKV;
  const int64_t kt = rest % nkt, sg = nseg - 1 - rest / nkt;
  const int64_t b = bc / KV;
  const int c = static_cast<int>(bc % KV);
  const int64_t j0 = kt * kKeys;
  const int nk = static_cast<int>(imin(kKeys, nc - j0));
  // Queries of this segment that see at least key j0 (the first one of the tile): t >= j0*d + l - 1.
  const int64_t qa = imax(sg * seg_q, j0 * d + l - 1), qb = imin(sg * seg_q + seg_q, T);
  if (qa >= qb) return;  // uniform over the block
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int k0 = 16 * warp;  // this warp's keys k0 .. k0 + 15 of the tile
  const E* kc = static_cast<const E*>(a.kc) + (b * nc * KV + c) * D;
  const E* vc = static_cast<const E*>(a.vc) + (b * nc * KV + c) * D;
  auto key_row = [&](const E* base, int r) -> const E* { return r < nk ? base + (j0 + r) * KV * D : nullptr; };
  copy_rows<E, D, KP, kKeys, kThreads>(Ks, [&](int r) { return key_row(kc, r); });
  copy_rows<E, D, KP, kKeys, kThreads>(Vs, [&](int r) { return key_row(vc, r); });

  const int TQ = R / G;  // queries per chunk (G <= 16 <= R, so >= 2)
  const E* q = static_cast<const E*>(a.q);
  const E* dout = static_cast<const E*>(a.dout);
  auto row_idx = [&](int r, int64_t t) { return (b * T + t) * H + int64_t(c) * G + r % G; };
  const float qscale = a.s.scale * kLog2e;

  WarpAcc<E, D> dk, dv;
  dk.zero();
  dv.zero();
  for (int64_t qc0 = qa; qc0 < qb; qc0 += TQ) {
    const Rows rows{qc0, imin(qc0 + TQ, qb), G, TQ * G};
    __syncthreads();  // the previous chunk's readers are done (and K/V are staged on the first pass)
    copy_rows<E, D, KP, R, kThreads>(Qs, [&](int r) -> const E* {
      const int64_t t = rows.t(r);
      return t >= 0 ? q + row_idx(r, t) * D : nullptr;
    });
    copy_rows<E, D, KP, R, kThreads>(dOs, [&](int r) -> const E* {
      const int64_t t = rows.t(r);
      return t >= 0 ? dout + row_idx(r, t) * D : nullptr;
    });
    if (tid < R) {
      const int64_t t = rows.t(tid);
      ne_s[tid] = t >= 0 ? static_cast<int>(visible(t, l, d, nc)) : 0;
      lse2_s[tid] = t >= 0 ? a.lse[row_idx(tid, t)] * kLog2e : ninf();
      delta_s[tid] = t >= 0 ? a.delta[row_idx(tid, t)] : 0.f;
    }
    __syncthreads();
    {
      WarpAcc<E, R> s;
      s.zero();
      s.template abt<D>(Ks + k0 * KP, KP, Qs, KP);  // S^T for this warp's keys: [16][R]
      s.store(Ss + k0 * SP, SP);
    }
    {
      WarpAcc<E, R> s;
      s.zero();
      s.template abt<D>(Vs + k0 * KP, KP, dOs, KP);  // dP^T
      s.store(dPs + k0 * SP, SP);
    }
    __syncwarp();
    for (int e = lane; e < 16 * R; e += 32) {
      const int kk = k0 + e / R, r = e % R;
      const float lse2 = lse2_s[r];
      const bool ok = j0 + kk < ne_s[r] && lse2 != ninf();
      const float p = ok ? exp2f(Ss[kk * SP + r] * qscale - lse2) : 0.f;
      Ps[kk * PP + r] = from_f<E>(p);
      dSs[kk * PP + r] = from_f<E>(p * (dPs[kk * SP + r] - delta_s[r]));
    }
    __syncwarp();
    dv.template ab<R>(Ps + k0 * PP, PP, dOs, KP);
    dk.template ab<R>(dSs + k0 * PP, PP, Qs, KP);
  }
  // Accumulators -> shared fp32 -> one atomicAdd per element (dV, then dK times scale).
  const int64_t out0 = ((b * nc + j0) * KV + c) * D;  // + key * KV * D + channel
  auto flush = [&](WarpAcc<E, D>& acc, float* dst, float mul) {
    __syncthreads();  // the chunk's readers / the previous flush's readers are done with the shared memory
    acc.store(Stage + k0 * OP, OP);
    __syncthreads();
    for (int e = tid; e < nk * D; e += kThreads) {
      const int kk = e / D, ch = e % D;
      atomicAdd(dst + out0 + int64_t(kk) * KV * D + ch, Stage[kk * OP + ch] * mul);
    }
  };
  flush(dv, a.dvc, 1.f);
  flush(dk, a.dkc, a.s.scale);
}

// ---- launchers ----

constexpr int64_t kMaxBlocks = 0x7fffffffLL;

int64_t query_tiles(int64_t n, int64_t G) {
  const int64_t TQ = kRows / G;
  return (n + TQ - 1) / TQ;
}

template <typename E, int D>
struct FwdOp {
  static cudaError_t run(const NsaCmpFwdArgs& a, cudaStream_t stream) {
    const int64_t ntiles = query_tiles(a.s.T, a.s.H / a.s.KV), blocks = a.s.B * a.s.KV * ntiles;
    if (blocks == 0) return cudaSuccess;
    if (blocks > kMaxBlocks) return cudaErrorInvalidValue;
    constexpr size_t bytes = FwdLayout<E, D>::kBytes;
    if (const auto e = allow_smem(cmp_fwd_kernel<E, D>, bytes); e != cudaSuccess) return e;
    cmp_fwd_kernel<E, D><<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(a, ntiles);
    return cudaGetLastError();
  }
};

template <typename E, int D>
struct ImpOp {
  static cudaError_t run(const NsaCmpImportanceArgs& a, cudaStream_t stream) {
    const int64_t ntiles = query_tiles(a.t1 - a.t0, a.s.H / a.s.KV), blocks = a.s.B * a.s.KV * ntiles;
    if (blocks == 0) return cudaSuccess;
    if (blocks > kMaxBlocks) return cudaErrorInvalidValue;
    constexpr size_t bytes = ImpLayout<E, D>::kBytes;
    if (const auto e = allow_smem(cmp_imp_kernel<E, D>, bytes); e != cudaSuccess) return e;
    cmp_imp_kernel<E, D><<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(a, ntiles);
    return cudaGetLastError();
  }
};

template <typename E, int D>
struct BwdOp {
  static cudaError_t run(const NsaCmpBwdArgs& a, cudaStream_t stream) {
    const int64_t G = a.s.H / a.s.KV;
    const int64_t ntiles = query_tiles(a.s.T, G), blocks = a.s.B * a.s.KV * ntiles;
    if (blocks == 0) return cudaSuccess;
    if (blocks > kMaxBlocks) return cudaErrorInvalidValue;
    constexpr size_t bytes = DqLayout<E, D>::kBytes;
    if (const auto e = allow_smem(cmp_dq_kernel<E, D>, bytes); e != cudaSuccess) return e;
    cmp_dq_kernel<E, D><<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(a, ntiles);
    if (const auto e = cudaGetLastError(); e != cudaSuccess) return e;
    // dkc/dvc: 64-key tiles x query segments of ~kSegRows rows (whole chunks of R / G queries).
    const int64_t nkt = (a.s.num_cmp + kKeys - 1) / kKeys;
    const int64_t tq = kR<E> / G;
    const int64_t seg_q = std::max<int64_t>(tq, (kSegRows / G / tq) * tq);
    const int64_t nseg = (a.s.T + seg_q - 1) / seg_q;
    const int64_t kblocks = a.s.B * a.s.KV * nkt * nseg;
    if (kblocks == 0) return cudaSuccess;
    if (kblocks > kMaxBlocks) return cudaErrorInvalidValue;
    constexpr size_t kbytes = KvLayout<E, D>::kBytes;
    if (const auto e = allow_smem(cmp_dkdv_kernel<E, D>, kbytes); e != cudaSuccess) return e;
    cmp_dkdv_kernel<E, D><<<static_cast<unsigned>(kblocks), kThreads, kbytes, stream>>>(a, nkt, nseg, seg_q);
    return cudaGetLastError();
  }
};

template <template <typename, int> class Op, typename Args>
cudaError_t dispatch(const Args& a, cudaStream_t stream) {
  const bool d64 = a.s.head_dim == 64;
  switch (a.s.dtype) {
    case NsaDtype::kF32: return d64 ? Op<float, 64>::run(a, stream) : Op<float, 128>::run(a, stream);
    case NsaDtype::kBF16:
      return d64 ? Op<__nv_bfloat16, 64>::run(a, stream) : Op<__nv_bfloat16, 128>::run(a, stream);
    case NsaDtype::kF16: return d64 ? Op<__half, 64>::run(a, stream) : Op<__half, 128>::run(a, stream);
  }
  return cudaErrorInvalidValue;
}

bool valid(const NsaCmpShape& s) {
  if (s.B < 0 || s.T < 0 || s.T >= (int64_t{1} << 31) || s.KV <= 0 || s.H % s.KV != 0) return false;
  if (!nsa_cmp_cuda_supports(s.head_dim, s.H / s.KV)) return false;
  const int64_t l = s.cmp_block, d = s.cmp_stride;
  if (l <= 0 || d <= 0 || l % d != 0 || s.slc_block <= 0 || s.slc_block % d != 0) return false;
  if (s.num_cmp != (s.T >= l ? (s.T - l) / d + 1 : 0)) return false;
  return nsa_cmp_cuda_device_ok(s.dtype);
}

}  // namespace

bool nsa_cmp_cuda_device_ok(NsaDtype dtype) {
  if (dtype == NsaDtype::kF32) return true;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 8;  // bf16 / fp16 wmma with fp32 accumulate as compiled here
}

cudaError_t nsa_cmp_forward_cuda(const NsaCmpFwdArgs& a, cudaStream_t stream) {
  if (!valid(a.s)) return cudaErrorInvalidValue;
  return dispatch<FwdOp>(a, stream);
}

cudaError_t nsa_cmp_importance_cuda(const NsaCmpImportanceArgs& a, cudaStream_t stream) {
  if (!valid(a.s) || a.t0 < 0 || a.t1 > a.s.T || a.t0 > a.t1) return cudaErrorInvalidValue;
  if (a.t0 == a.t1) return cudaSuccess;
  const int64_t ns = (a.s.T + a.s.slc_block - 1) / a.s.slc_block;
  if (a.num_cols < std::min<int64_t>(ns, (a.t1 - 1) / a.s.slc_block + 1)) return cudaErrorInvalidValue;
  return dispatch<ImpOp>(a, stream);
}

cudaError_t nsa_cmp_backward_cuda(const NsaCmpBwdArgs& a, cudaStream_t stream) {
  if (!valid(a.s)) return cudaErrorInvalidValue;
  return dispatch<BwdOp>(a, stream);
}

}  // namespace ablate::kernels
