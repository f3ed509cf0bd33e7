// NSA compressed branch (core/mixers/nsa.h, nsa_compressed_attention): fused CUDA kernels with a plain-pointer
// interface, no LibTorch and no autograd (core/mixers/nsa.cpp wraps them in its CmpFn).
//
// Contract. l = cmp_block, d = cmp_stride, l' = slc_block, Nc = num_cmp (T >= l ? (T - l) / d + 1 : 0),
// G = H / KV; query head h uses kv head c = h / G. Query t sees compressed block j iff j*d + l - 1 <= t, i.e. the
// first ne(t) = (t < l - 1) ? 0 : min(Nc, (t - l + 1) / d + 1) blocks.
//   S[t, h, j] = scale * q[b, t, h] . kc[b, j, c]                      (j < ne(t))
//   lse[t, h]  = log sum_j exp(S[t, h, j])                             (-inf when ne(t) = 0)
//   o[t, h]    = sum_j exp(S[t, h, j] - lse[t, h]) vc[b, j, c]          (0 when ne(t) = 0)
// Importance (what nsa_cmp_to_slc_importance(P summed over the G heads of the group) gives; paper eq. 9): with
// r = l / d stride sub-blocks per compressed block and m = l' / d per selection block, compressed block i covers
// sub-blocks [i, i + r - 1] and selection block js covers [js*m, js*m + m - 1], so
//   imp[b, c, t, js] = sum_i (sum_g P[t, c*G + g, i]) * |[i, i + r - 1] ∩ [js*m, js*m + m - 1]|.
// Backward, with P = exp(S - lse) and delta[t, h] = dO[t, h] . o[t, h] (rowsum, computed by the caller in fp32):
//   dS = P * (dO . vc - delta);  dq = scale * sum_j dS kc[j];  dkc[j] += scale * sum dS q;  dvc[j] += sum P dO.
//
// Layouts (all contiguous, row-major): q, o, dO, dq (B, T, H, hd); kc, vc (B, Nc, KV, hd) (what the module's
// compression MLPs return); lse, delta (B, T, H) fp32; dkc, dvc (B, Nc, KV, hd) fp32 accumulators that the caller
// zeroes; importance (B, KV, t1 - t0, num_cols) fp32 for the query chunk [t0, t1), zeroed by the caller (entries
// js > t / l' stay 0; nsa_select_blocks never picks them). q/kc/vc/o/dO/dq share one element type (fp32, bf16 or
// fp16), every pointer 16-byte aligned. All math is fp32.
//
// Kernels (kernels/nsa_compress_cuda.cu, design notes at its top): forward (online softmax, one block per (b, kv
// head, tile of 64 / G queries x G heads)), importance (same tiles over a query chunk, recomputes P from lse),
// dq (same tiles) and dkc/dvc (key-centric, one block per (b, kv head, 64 compressed keys, query segment), fp32
// atomics across segments). bf16/fp16 run on tensor cores (wmma 16x16x16, fp32 accumulate; sm_80+), fp32 on FMA.
//
// STATUS: passed tests/mixers/nsa_compress_gpu_test.cpp on the H200 (2026-11-29); core/mixers/nsa.cpp takes them
// by default on CUDA (ABLATE_NSA_CMP_FUSED=0 or nsa_set_cmp_fused_enabled(false) turns them off).
#pragma once
#include <cstdint>

#include "kernels/nsa_select.h"  // NsaDtype

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct NsaCmpShape {
  int64_t B = 0, T = 0, H = 0, KV = 0, head_dim = 0;
  int64_t num_cmp = 0;     // Nc
  int64_t cmp_block = 0;   // l
  int64_t cmp_stride = 0;  // d (l % d == 0)
  int64_t slc_block = 0;   // l' (l' % d == 0)
  float scale = 1.f;
  NsaDtype dtype = NsaDtype::kF32;
};

struct NsaCmpFwdArgs {
  NsaCmpShape s;
  const void* q = nullptr;
  const void* kc = nullptr;
  const void* vc = nullptr;
  void* o = nullptr;     // out, dtype, (B, T, H, hd)
  float* lse = nullptr;  // out, (B, T, H)
};

struct NsaCmpImportanceArgs {
  NsaCmpShape s;
  const void* q = nullptr;
  const void* kc = nullptr;
  const float* lse = nullptr;  // from the forward
  int64_t t0 = 0, t1 = 0;      // query chunk [t0, t1)
  int64_t num_cols = 0;        // >= min(ceil(T / l'), (t1 - 1) / l' + 1)
  float* importance = nullptr; // accumulated, (B, KV, t1 - t0, num_cols), zeroed by the caller
};

struct NsaCmpBwdArgs {
  NsaCmpShape s;
  const void* q = nullptr;
  const void* kc = nullptr;
  const void* vc = nullptr;
  const void* dout = nullptr;    // dO, dtype
  const float* lse = nullptr;    // from the forward
  const float* delta = nullptr;  // rowsum(dO * o) in fp32
  void* dq = nullptr;            // out, dtype (written, not accumulated)
  float* dkc = nullptr;          // accumulated, fp32
  float* dvc = nullptr;          // accumulated, fp32
};

// What the kernels take: head_dim 64 or 128, G = H / KV in 1..16 (any l, d, l' the options allow).
inline bool nsa_cmp_cuda_supports(int64_t head_dim, int64_t G) {
  return (head_dim == 64 || head_dim == 128) && G >= 1 && G <= 16;
}

#if ABLATE_WITH_CUDA
// Each returns cudaErrorInvalidValue for a shape nsa_cmp_cuda_supports refuses (or bf16/fp16 on a device older than
// sm_80), else the launch status. All work goes to `stream`.
cudaError_t nsa_cmp_forward_cuda(const NsaCmpFwdArgs& a, cudaStream_t stream);
cudaError_t nsa_cmp_importance_cuda(const NsaCmpImportanceArgs& a, cudaStream_t stream);
// Writes dq and adds into dkc/dvc (launches the dq and the dkc/dvc kernels).
cudaError_t nsa_cmp_backward_cuda(const NsaCmpBwdArgs& a, cudaStream_t stream);
// Whether the current device can run the kernels for this dtype (bf16/fp16 need sm_80+ tensor cores).
bool nsa_cmp_cuda_device_ok(NsaDtype dtype);
#endif

}  // namespace ablate::kernels
