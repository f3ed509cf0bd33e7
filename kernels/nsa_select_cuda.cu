// CUDA kernels of the NSA selected branch (contract in kernels/nsa_select.h). fp32 FMA code; all math in fp32.
// bf16/fp16 inputs of the shapes nsa_select_tc_applies takes go to the tensor-core kernels of
// kernels/nsa_select_tc.cu instead (the launchers at the bottom dispatch); these kernels stay for fp32, for the other
// shapes, and for bf16/fp16 when nsa_select_set_tensor_cores(false) / ABLATE_NSA_TC=0.
//
// Common pieces. K/V are read in tiles of 64 tokens of one kv head, converted to fp32 and staged in shared memory
// with a row stride of D + 4 floats: a thread reading a float4 of "its" key row then hits distinct banks within
// each quarter warp (the 128-bit access granularity), and a warp reading one row's float4s is contiguous. Tokens
// past the allowed range are zero-filled, so P = 0 entries never meet NaN garbage.
//
// Forward (fwd_kernel, 128 threads, one block per (b, t, kv head)): for each selected block, for each 64-token
// tile: S = Q K^T for the G heads (thread = key j, rows hh + 2i), online softmax in the log2 domain (warp w owns
// rows w + 4i and keeps m, l in registers), then O += P V (thread = 4 consecutive channels x rows rg + RG*i).
//
// dq (dq_kernel, same grid and thread map): S and dP = dO V^T per tile, dS = P (dP - delta), dq += dS K.
//
// dk/dv (dkdv_kernel, 256 threads, one block per (segment, 64-token tile)): the tile's K/V stay in shared memory;
// the segment's queries come in chunks of 32 rows (row = (query, head)); per chunk S and dP (thread = key j,
// rows rq + 4i), then dV += P^T dO and dK += dS^T Q into register accumulators (thread = 4 channels x keys
// kg + KG*i). One atomicAdd per accumulator element at the end.
#include "kernels/nsa_select.h"
#include "kernels/cuda_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace ablate::kernels {
namespace {

using cuda_common::Vec;
using cuda_common::from_f;
using cuda_common::to_f;
using cuda_common::warp_max;
using cuda_common::warp_sum;

constexpr int kTile = 64;           // tokens per K/V tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kFwdThreads = 128;
constexpr int kBwdThreads = 256;
constexpr int kRows = 32;           // rows per chunk in dkdv_kernel

__device__ __forceinline__ float ninf() { return -INFINITY; }
__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Copies `rows` rows of D elements (row r at src(r), or zeros where src(r) is null) into dst[r * (D + 4)], as fp32.
// 16-byte loads; src rows must be 16-byte aligned.
template <typename E, int D, int NT, typename Src>
__device__ __forceinline__ void stage_rows(float* dst, int rows, Src src) {
  constexpr int V = 16 / sizeof(E);
  constexpr int PER_ROW = D / V;
  for (int idx = threadIdx.x; idx < rows * PER_ROW; idx += NT) {
    const int r = idx / PER_ROW, part = idx % PER_ROW;
    float* d = dst + r * (D + 4) + part * V;
    const E* s = src(r);
    if (s != nullptr) {
      const Vec<E, V> x = *reinterpret_cast<const Vec<E, V>*>(s + part * V);
#pragma unroll
      for (int i = 0; i < V; i += 4)
        *reinterpret_cast<float4*>(d + i) =
            make_float4(to_f(x.v[i]), to_f(x.v[i + 1]), to_f(x.v[i + 2]), to_f(x.v[i + 3]));
    } else {
#pragma unroll
      for (int i = 0; i < V; i += 4) *reinterpret_cast<float4*>(d + i) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

__device__ __forceinline__ float dot4(const float4 a, const float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ void axpy4(float4& acc, float s, const float4 x) {
  acc.x = fmaf(s, x.x, acc.x);
  acc.y = fmaf(s, x.y, acc.y);
  acc.z = fmaf(s, x.z, acc.z);
  acc.w = fmaf(s, x.w, acc.w);
}

template <typename E>
__device__ __forceinline__ void store4(E* p, const float4 x) {
  Vec<E, 4> r;
  r.v[0] = from_f<E>(x.x);
  r.v[1] = from_f<E>(x.y);
  r.v[2] = from_f<E>(x.z);
  r.v[3] = from_f<E>(x.w);
  *reinterpret_cast<Vec<E, 4>*>(p) = r;
}

// ---- query-centric kernels: forward and dq ----

template <int D, int MG>
struct QSmem {
  static constexpr int DP = D + 4;
  static constexpr int kK = 0;                       // [64][DP]
  static constexpr int kV = kK + kTile * DP;         // [64][DP]
  static constexpr int kQ = kV + kTile * DP;         // [MG][DP]
  static constexpr int kO = kQ + MG * DP;            // [MG][DP] (dO, dq kernel only)
  static constexpr int kP = kO + MG * DP;            // [MG][64]
  static constexpr int kRow = kP + MG * kTile;       // [4][MG] per-row scalars
  static constexpr int kFloats = kRow + 4 * MG;
  static constexpr size_t kBytes = kFloats * sizeof(float);
};

// Thread maps of the query-centric kernels (128 threads).
template <int D, int MG>
struct QMap {
  static constexpr int NQ = D / 4;                       // channel quads
  static constexpr int RG = kFwdThreads / NQ;            // row groups in the P V / dS K stage
  static constexpr int RPT = (MG + RG - 1) / RG;         // rows per thread there
  static constexpr int SR = MG / 2;                      // rows per thread in the S stage (2 halves)
  static constexpr int WR = (MG + 3) / 4;                // rows per warp in the softmax stage
};

template <typename E, int D, int MG>
__global__ void __launch_bounds__(kFwdThreads) fwd_kernel(NsaSelectFwdArgs a) {
  using L = QSmem<D, MG>;
  using M = QMap<D, MG>;
  constexpr int DP = L::DP;
  extern __shared__ float4 smem4[];
  float* sm = reinterpret_cast<float*>(smem4);
  float* Ks = sm + L::kK;
  float* Vs = sm + L::kV;
  float* Qs = sm + L::kQ;
  float* Ps = sm + L::kP;
  float* alpha_s = sm + L::kRow;
  float* m_s = alpha_s + MG;
  float* l_s = m_s + MG;

  const int64_t T = a.s.T, KV = a.s.KV, H = a.s.H;
  const int G = static_cast<int>(H / KV);
  const int64_t bt = blockIdx.x / KV;  // b * T + t
  const int c = static_cast<int>(blockIdx.x % KV);
  const int64_t t = bt % T, b = bt / T;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const E* q = static_cast<const E*>(a.q) + (bt * H + int64_t(c) * G) * D;
  const E* k = static_cast<const E*>(a.k) + (b * T * KV + c) * D;  // + s * KV * D
  const E* v = static_cast<const E*>(a.v) + (b * T * KV + c) * D;

  // Q, scaled into the log2 domain; rows >= G are zero.
  stage_rows<E, D, kFwdThreads>(Qs, MG, [&](int r) { return r < G ? q + int64_t(r) * D : nullptr; });
  __syncthreads();
  const float qscale = a.s.scale * kLog2e;
  for (int i = tid; i < MG * D; i += kFwdThreads) Qs[(i / D) * DP + i % D] *= qscale;

  float m_r[M::WR], l_r[M::WR];
#pragma unroll
  for (int i = 0; i < M::WR; ++i) {
    m_r[i] = ninf();
    l_r[i] = 0.f;
  }
  float4 acc[M::RPT];
#pragma unroll
  for (int i = 0; i < M::RPT; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  const int j = tid % kTile, hh = tid / kTile;
  const int dq4 = tid % M::NQ, rg = tid / M::NQ;

  const int64_t* idx = a.block_idx + blockIdx.x * a.s.num_selected;
  const int64_t lp = a.s.block;
  for (int64_t slot = 0; slot < a.s.num_selected; ++slot) {
    const int64_t blk = idx[slot];
    if (blk < 0 || blk * lp > t) continue;
    const int64_t end = imin(blk * lp + lp, t + 1);  // allowed tokens: [blk * lp, end)
    for (int64_t s0 = blk * lp; s0 < end; s0 += kTile) {
      const int nk = static_cast<int>(imin(kTile, end - s0));
      __syncthreads();  // the previous tile's readers are done
      stage_rows<E, D, kFwdThreads>(Ks, kTile, [&](int r) { return r < nk ? k + (s0 + r) * KV * D : nullptr; });
      stage_rows<E, D, kFwdThreads>(Vs, kTile, [&](int r) { return r < nk ? v + (s0 + r) * KV * D : nullptr; });
      __syncthreads();
      // S = Q K^T (log2 domain), masked.
      {
        float s[M::SR];
#pragma unroll
        for (int i = 0; i < M::SR; ++i) s[i] = 0.f;
        const float* kr = Ks + j * DP;
#pragma unroll 4
        for (int e = 0; e < D; e += 4) {
          const float4 kk = *reinterpret_cast<const float4*>(kr + e);
#pragma unroll
          for (int i = 0; i < M::SR; ++i)
            s[i] = dot4(*reinterpret_cast<const float4*>(Qs + (hh + 2 * i) * DP + e), kk, s[i]);
        }
#pragma unroll
        for (int i = 0; i < M::SR; ++i) Ps[(hh + 2 * i) * kTile + j] = j < nk ? s[i] : ninf();
      }
      __syncthreads();
      // Online softmax: warp `warp` owns rows warp + 4i.
#pragma unroll
      for (int i = 0; i < M::WR; ++i) {
        const int g = warp + 4 * i;
        if (g < MG) {
          const float x0 = Ps[g * kTile + lane], x1 = Ps[g * kTile + lane + 32];
          const float mn = fmaxf(m_r[i], warp_max(fmaxf(x0, x1)));
          float p0 = 0.f, p1 = 0.f, al = 1.f;
          if (mn != ninf()) {
            p0 = exp2f(x0 - mn);
            p1 = exp2f(x1 - mn);
            al = exp2f(m_r[i] - mn);
          }
          l_r[i] = l_r[i] * al + warp_sum(p0 + p1);
          m_r[i] = mn;
          Ps[g * kTile + lane] = p0;
          Ps[g * kTile + lane + 32] = p1;
          if (lane == 0) alpha_s[g] = al;
        }
      }
      __syncthreads();
      // O = alpha O + P V.
#pragma unroll
      for (int i = 0; i < M::RPT; ++i) {
        const int g = rg + M::RG * i;
        if (g < MG) {
          const float al = alpha_s[g];
          acc[i].x *= al;
          acc[i].y *= al;
          acc[i].z *= al;
          acc[i].w *= al;
        }
      }
#pragma unroll 4
      for (int jj = 0; jj < kTile; ++jj) {
        const float4 vv = *reinterpret_cast<const float4*>(Vs + jj * DP + 4 * dq4);
#pragma unroll
        for (int i = 0; i < M::RPT; ++i) {
          const int g = rg + M::RG * i;
          if (g < MG) axpy4(acc[i], Ps[g * kTile + jj], vv);
        }
      }
    }
  }
  // Row statistics to the output map.
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < M::WR; ++i) {
      const int g = warp + 4 * i;
      if (g < MG) {
        m_s[g] = m_r[i];
        l_s[g] = l_r[i];
      }
    }
  }
  __syncthreads();
  E* o = static_cast<E*>(a.o) + (bt * H + int64_t(c) * G) * D;
#pragma unroll
  for (int i = 0; i < M::RPT; ++i) {
    const int g = rg + M::RG * i;
    if (g < G) {
      const float l = l_s[g];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      store4<E>(o + g * D + 4 * dq4, make_float4(acc[i].x * inv, acc[i].y * inv, acc[i].z * inv, acc[i].w * inv));
    }
  }
  if (tid < G) {
    const float l = l_s[tid];
    a.lse[bt * H + int64_t(c) * G + tid] = l > 0.f ? (m_s[tid] + log2f(l)) * kLn2 : ninf();
  }
}

template <typename E, int D, int MG>
__global__ void __launch_bounds__(kFwdThreads) dq_kernel(NsaSelectBwdArgs a) {
  using L = QSmem<D, MG>;
  using M = QMap<D, MG>;
  constexpr int DP = L::DP;
  extern __shared__ float4 smem4[];
  float* sm = reinterpret_cast<float*>(smem4);
  float* Ks = sm + L::kK;
  float* Vs = sm + L::kV;
  float* Qs = sm + L::kQ;
  float* Os = sm + L::kO;
  float* dSs = sm + L::kP;
  float* lse_s = sm + L::kRow;
  float* delta_s = lse_s + MG;

  const int64_t T = a.s.T, KV = a.s.KV, H = a.s.H;
  const int G = static_cast<int>(H / KV);
  const int64_t bt = blockIdx.x / KV;
  const int c = static_cast<int>(blockIdx.x % KV);
  const int64_t t = bt % T, b = bt / T;
  const int tid = threadIdx.x;
  const int64_t row0 = bt * H + int64_t(c) * G;
  const E* q = static_cast<const E*>(a.q) + row0 * D;
  const E* dout = static_cast<const E*>(a.dout) + row0 * D;
  const E* k = static_cast<const E*>(a.k) + (b * T * KV + c) * D;
  const E* v = static_cast<const E*>(a.v) + (b * T * KV + c) * D;

  stage_rows<E, D, kFwdThreads>(Qs, MG, [&](int r) { return r < G ? q + int64_t(r) * D : nullptr; });
  stage_rows<E, D, kFwdThreads>(Os, MG, [&](int r) { return r < G ? dout + int64_t(r) * D : nullptr; });
  if (tid < MG) {
    lse_s[tid] = tid < G ? a.lse[row0 + tid] * kLog2e : ninf();
    delta_s[tid] = tid < G ? a.delta[row0 + tid] : 0.f;
  }
  __syncthreads();
  const float qscale = a.s.scale * kLog2e;
  for (int i = tid; i < MG * D; i += kFwdThreads) Qs[(i / D) * DP + i % D] *= qscale;

  float4 acc[M::RPT];
#pragma unroll
  for (int i = 0; i < M::RPT; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  const int j = tid % kTile, hh = tid / kTile;
  const int dq4 = tid % M::NQ, rg = tid / M::NQ;

  const int64_t* idx = a.block_idx + blockIdx.x * a.s.num_selected;
  const int64_t lp = a.s.block;
  for (int64_t slot = 0; slot < a.s.num_selected; ++slot) {
    const int64_t blk = idx[slot];
    if (blk < 0 || blk * lp > t) continue;
    const int64_t end = imin(blk * lp + lp, t + 1);
    for (int64_t s0 = blk * lp; s0 < end; s0 += kTile) {
      const int nk = static_cast<int>(imin(kTile, end - s0));
      __syncthreads();
      stage_rows<E, D, kFwdThreads>(Ks, kTile, [&](int r) { return r < nk ? k + (s0 + r) * KV * D : nullptr; });
      stage_rows<E, D, kFwdThreads>(Vs, kTile, [&](int r) { return r < nk ? v + (s0 + r) * KV * D : nullptr; });
      __syncthreads();
      {
        float s[M::SR], dp[M::SR];
#pragma unroll
        for (int i = 0; i < M::SR; ++i) s[i] = dp[i] = 0.f;
        const float* kr = Ks + j * DP;
        const float* vr = Vs + j * DP;
#pragma unroll 4
        for (int e = 0; e < D; e += 4) {
          const float4 kk = *reinterpret_cast<const float4*>(kr + e);
          const float4 vv = *reinterpret_cast<const float4*>(vr + e);
#pragma unroll
          for (int i = 0; i < M::SR; ++i) {
            const int g = hh + 2 * i;
            s[i] = dot4(*reinterpret_cast<const float4*>(Qs + g * DP + e), kk, s[i]);
            dp[i] = dot4(*reinterpret_cast<const float4*>(Os + g * DP + e), vv, dp[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < M::SR; ++i) {
          const int g = hh + 2 * i;
          const float lse = lse_s[g];
          const float p = (j < nk && lse != ninf()) ? exp2f(s[i] - lse) : 0.f;
          dSs[g * kTile + j] = p * (dp[i] - delta_s[g]);
        }
      }
      __syncthreads();
#pragma unroll 4
      for (int jj = 0; jj < kTile; ++jj) {
        const float4 kk = *reinterpret_cast<const float4*>(Ks + jj * DP + 4 * dq4);
#pragma unroll
        for (int i = 0; i < M::RPT; ++i) {
          const int g = rg + M::RG * i;
          if (g < MG) axpy4(acc[i], dSs[g * kTile + jj], kk);
        }
      }
    }
  }
  E* dq = static_cast<E*>(a.dq) + row0 * D;
  const float sc = a.s.scale;
#pragma unroll
  for (int i = 0; i < M::RPT; ++i) {
    const int g = rg + M::RG * i;
    if (g < G) store4<E>(dq + g * D + 4 * dq4, make_float4(acc[i].x * sc, acc[i].y * sc, acc[i].z * sc, acc[i].w * sc));
  }
}

// ---- key-centric kernel: dk, dv ----

template <int D>
struct KSmem {
  static constexpr int DP = D + 4;
  static constexpr int kK = 0;                        // [64][DP]
  static constexpr int kV = kK + kTile * DP;          // [64][DP]
  static constexpr int kQ = kV + kTile * DP;          // [kRows][DP]
  static constexpr int kO = kQ + kRows * DP;          // [kRows][DP]
  static constexpr int kP = kO + kRows * DP;          // [kRows][64]
  static constexpr int kS = kP + kRows * kTile;       // [kRows][64]
  static constexpr int kRow = kS + kRows * kTile;     // lse, delta, t (as int) per row
  static constexpr int kFloats = kRow + 3 * kRows;
  static constexpr size_t kBytes = kFloats * sizeof(float);
};

template <typename E, int D>
__global__ void __launch_bounds__(kBwdThreads) dkdv_kernel(NsaSelectBwdArgs a, int ntiles) {
  using L = KSmem<D>;
  constexpr int DP = L::DP;
  constexpr int NQ = D / 4;               // channel quads
  constexpr int KG = kBwdThreads / NQ;    // key groups (16 or 8)
  constexpr int KPT = kTile / KG;         // keys per thread in the accumulation (4 or 8)
  constexpr int SRT = kRows / (kBwdThreads / kTile);  // rows per thread in the S stage (8)
  extern __shared__ float4 smem4[];
  float* sm = reinterpret_cast<float*>(smem4);
  float* Ks = sm + L::kK;
  float* Vs = sm + L::kV;
  float* Qs = sm + L::kQ;
  float* Os = sm + L::kO;
  float* Ps = sm + L::kP;
  float* dSs = sm + L::kS;
  float* lse_s = sm + L::kRow;
  float* delta_s = lse_s + kRows;
  int* t_s = reinterpret_cast<int*>(delta_s + kRows);

  const int64_t T = a.s.T, KV = a.s.KV, H = a.s.H, lp = a.s.block;
  const int64_t ns = (T + lp - 1) / lp;
  const int G = static_cast<int>(H / KV);
  const int64_t seg = blockIdx.x / ntiles;
  const int tile = static_cast<int>(blockIdx.x % ntiles);
  const int64_t key = a.inv.seg_key[seg];
  const int64_t blk = key % ns, bc = key / ns;
  const int c = static_cast<int>(bc % KV);
  const int64_t b = bc / KV;
  const int64_t s0 = blk * lp + int64_t(tile) * kTile;
  const int64_t s1 = imin(imin(blk * lp + lp, s0 + kTile), T);
  if (s0 >= s1) return;  // uniform over the block
  const int nk = static_cast<int>(s1 - s0);
  const int tid = threadIdx.x;
  const E* k = static_cast<const E*>(a.k) + (b * T * KV + c) * D;
  const E* v = static_cast<const E*>(a.v) + (b * T * KV + c) * D;
  stage_rows<E, D, kBwdThreads>(Ks, kTile, [&](int r) { return r < nk ? k + (s0 + r) * KV * D : nullptr; });
  stage_rows<E, D, kBwdThreads>(Vs, kTile, [&](int r) { return r < nk ? v + (s0 + r) * KV * D : nullptr; });

  const int32_t* rows_t = a.inv.rows_t + a.inv.seg_start[seg];
  const int len = a.inv.seg_len[seg];
  const int qc = G >= kRows ? 1 : kRows / G;  // queries per chunk
  const int rows = qc * G;                    // <= kRows
  const E* qbase = static_cast<const E*>(a.q) + (b * T * H + int64_t(c) * G) * D;      // + t * H * D + g * D
  const E* obase = static_cast<const E*>(a.dout) + (b * T * H + int64_t(c) * G) * D;
  const float* lse_b = a.lse + b * T * H + int64_t(c) * G;
  const float* delta_b = a.delta + b * T * H + int64_t(c) * G;
  const float qscale = a.s.scale * kLog2e;

  float4 dk[KPT], dv[KPT];
#pragma unroll
  for (int i = 0; i < KPT; ++i) dk[i] = dv[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  const int j = tid % kTile, rq = tid / kTile;
  const int dq4 = tid % NQ, kg = tid / NQ;

  for (int q0 = 0; q0 < len; q0 += qc) {
    __syncthreads();  // previous chunk's readers are done (and K/V staging on the first pass)
    auto row_t = [&](int r) -> int { return (r < rows && q0 + r / G < len) ? rows_t[q0 + r / G] : -1; };
    stage_rows<E, D, kBwdThreads>(Qs, kRows, [&](int r) {
      const int tq = row_t(r);
      return tq >= 0 ? qbase + int64_t(tq) * H * D + (r % G) * D : nullptr;
    });
    stage_rows<E, D, kBwdThreads>(Os, kRows, [&](int r) {
      const int tq = row_t(r);
      return tq >= 0 ? obase + int64_t(tq) * H * D + (r % G) * D : nullptr;
    });
    if (tid < kRows) {
      const int tq = row_t(tid);
      t_s[tid] = tq;
      lse_s[tid] = tq >= 0 ? lse_b[int64_t(tq) * H + tid % G] * kLog2e : ninf();
      delta_s[tid] = tq >= 0 ? delta_b[int64_t(tq) * H + tid % G] : 0.f;
    }
    __syncthreads();
    {
      float s[SRT], dp[SRT];
#pragma unroll
      for (int i = 0; i < SRT; ++i) s[i] = dp[i] = 0.f;
      const float* kr = Ks + j * DP;
      const float* vr = Vs + j * DP;
#pragma unroll 2
      for (int e = 0; e < D; e += 4) {
        const float4 kk = *reinterpret_cast<const float4*>(kr + e);
        const float4 vv = *reinterpret_cast<const float4*>(vr + e);
#pragma unroll
        for (int i = 0; i < SRT; ++i) {
          const int r = rq + 4 * i;
          s[i] = dot4(*reinterpret_cast<const float4*>(Qs + r * DP + e), kk, s[i]);
          dp[i] = dot4(*reinterpret_cast<const float4*>(Os + r * DP + e), vv, dp[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < SRT; ++i) {
        const int r = rq + 4 * i;
        const int tq = t_s[r];
        const bool ok = j < nk && tq >= 0 && s0 + j <= tq && lse_s[r] != ninf();
        const float p = ok ? exp2f(s[i] * qscale - lse_s[r]) : 0.f;
        Ps[r * kTile + j] = p;
        dSs[r * kTile + j] = p * (dp[i] - delta_s[r]);
      }
    }
    __syncthreads();
    for (int r = 0; r < rows; ++r) {
      const float4 qq = *reinterpret_cast<const float4*>(Qs + r * DP + 4 * dq4);
      const float4 oo = *reinterpret_cast<const float4*>(Os + r * DP + 4 * dq4);
#pragma unroll
      for (int i = 0; i < KPT; ++i) {
        const int jj = kg + KG * i;
        axpy4(dv[i], Ps[r * kTile + jj], oo);
        axpy4(dk[i], dSs[r * kTile + jj], qq);
      }
    }
  }
  const float sc = a.s.scale;
#pragma unroll
  for (int i = 0; i < KPT; ++i) {
    const int jj = kg + KG * i;
    if (jj < nk) {
      const int64_t off = ((b * T + s0 + jj) * KV + c) * D + 4 * dq4;
      atomicAdd(a.dk + off + 0, dk[i].x * sc);
      atomicAdd(a.dk + off + 1, dk[i].y * sc);
      atomicAdd(a.dk + off + 2, dk[i].z * sc);
      atomicAdd(a.dk + off + 3, dk[i].w * sc);
      atomicAdd(a.dv + off + 0, dv[i].x);
      atomicAdd(a.dv + off + 1, dv[i].y);
      atomicAdd(a.dv + off + 2, dv[i].z);
      atomicAdd(a.dv + off + 3, dv[i].w);
    }
  }
}

// ---- launchers ----

template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename E, int D, int MG>
cudaError_t launch_fwd(const NsaSelectFwdArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.s.B * a.s.T * a.s.KV;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  constexpr size_t bytes = QSmem<D, MG>::kBytes;
  if (const auto e = allow_smem(fwd_kernel<E, D, MG>, bytes); e != cudaSuccess) return e;
  fwd_kernel<E, D, MG><<<static_cast<unsigned>(blocks), kFwdThreads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename E, int D, int MG>
cudaError_t launch_bwd(const NsaSelectBwdArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.s.B * a.s.T * a.s.KV;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  constexpr size_t bytes = QSmem<D, MG>::kBytes;
  if (const auto e = allow_smem(dq_kernel<E, D, MG>, bytes); e != cudaSuccess) return e;
  dq_kernel<E, D, MG><<<static_cast<unsigned>(blocks), kFwdThreads, bytes, stream>>>(a);
  if (const auto e = cudaGetLastError(); e != cudaSuccess) return e;
  const int ntiles = static_cast<int>((a.s.block + kTile - 1) / kTile);
  const int64_t kblocks = a.inv.num_segments * ntiles;
  if (kblocks == 0) return cudaSuccess;
  if (kblocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  constexpr size_t kbytes = KSmem<D>::kBytes;
  if (const auto e = allow_smem(dkdv_kernel<E, D>, kbytes); e != cudaSuccess) return e;
  dkdv_kernel<E, D><<<static_cast<unsigned>(kblocks), kBwdThreads, kbytes, stream>>>(a, ntiles);
  return cudaGetLastError();
}

template <typename E, int D>
cudaError_t by_group_fwd(const NsaSelectFwdArgs& a, int64_t G, cudaStream_t stream) {
  if (G <= 4) return launch_fwd<E, D, 4>(a, stream);
  if (G <= 8) return launch_fwd<E, D, 8>(a, stream);
  return launch_fwd<E, D, 16>(a, stream);
}

template <typename E, int D>
cudaError_t by_group_bwd(const NsaSelectBwdArgs& a, int64_t G, cudaStream_t stream) {
  if (G <= 4) return launch_bwd<E, D, 4>(a, stream);
  if (G <= 8) return launch_bwd<E, D, 8>(a, stream);
  return launch_bwd<E, D, 16>(a, stream);
}

bool valid(const NsaSelectShape& s) {
  return s.KV > 0 && s.H % s.KV == 0 && s.block > 0 && s.num_selected >= 0 &&
         nsa_select_cuda_supports(s.head_dim, s.H / s.KV);
}

template <typename E>
cudaError_t fwd_typed(const NsaSelectFwdArgs& a, cudaStream_t stream) {
  const int64_t G = a.s.H / a.s.KV;
  return a.s.head_dim == 64 ? by_group_fwd<E, 64>(a, G, stream) : by_group_fwd<E, 128>(a, G, stream);
}

template <typename E>
cudaError_t bwd_typed(const NsaSelectBwdArgs& a, cudaStream_t stream) {
  const int64_t G = a.s.H / a.s.KV;
  return a.s.head_dim == 64 ? by_group_bwd<E, 64>(a, G, stream) : by_group_bwd<E, 128>(a, G, stream);
}

}  // namespace

cudaError_t nsa_select_forward_cuda(const NsaSelectFwdArgs& a, cudaStream_t stream) {
  if (!valid(a.s)) return cudaErrorInvalidValue;
  if (nsa_select_tc_applies(a.s)) return nsa_select_forward_tc(a, stream);  // bf16/fp16: kernels/nsa_select_tc.cu
  switch (a.s.dtype) {
    case NsaDtype::kF32: return fwd_typed<float>(a, stream);
    case NsaDtype::kBF16: return fwd_typed<__nv_bfloat16>(a, stream);
    case NsaDtype::kF16: return fwd_typed<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t nsa_select_backward_cuda(const NsaSelectBwdArgs& a, cudaStream_t stream) {
  if (!valid(a.s)) return cudaErrorInvalidValue;
  if (nsa_select_tc_applies(a.s)) return nsa_select_backward_tc(a, stream);
  switch (a.s.dtype) {
    case NsaDtype::kF32: return bwd_typed<float>(a, stream);
    case NsaDtype::kBF16: return bwd_typed<__nv_bfloat16>(a, stream);
    case NsaDtype::kF16: return bwd_typed<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ablate::kernels
