// NSA selected-branch attention (core/mixers/nsa.h, nsa_selected_attention): plain-pointer interface for the CPU
// reference and the CUDA kernels.
//
// Contract. Query head h uses kv head h / G (G = H / KV). Query t of (b, kv head c) attends to the key tokens
// s = j*l' + i (i < l') of its selected blocks j = block_idx[b, t, c, :] with j >= 0 and s <= t (hence s < T):
//   S[h, s]  = scale * q[b, t, h] . k[b, s, c]
//   lse[h]   = log sum_s exp(S[h, s])                      (-inf when the row has no allowed key)
//   o[h]     = sum_s exp(S[h, s] - lse[h]) v[b, s, c]      (0 for an empty row)
// Backward, with P = exp(S - lse) and delta[h] = dO[h] . o[h] (rowsum, computed by the caller in fp32):
//   dS = P * (dO . v - delta);  dq = scale * sum_s dS k[s];  dk[s] += scale * dS q;  dv[s] += P dO.
// A block listed twice in one row counts twice (the LibTorch path does the same); the selection never does that.
//
// Layouts (all contiguous, row-major): q, o, dO, dq (B, T, H, hd); k, v (B, T, KV, hd); block_idx (B, T, KV, n)
// int64; lse, delta (B, T, H) fp32; dk, dv (B, T, KV, hd) fp32 accumulators that the caller zeroes.
// q/k/v/o/dO/dq share one element type (fp32, bf16 or fp16; the CPU reference takes fp32 only). Math is fp32.
//
// CUDA work split. Forward and dq: one thread block per (b, t, kv head) holding the G query heads; K/V tiles of
// 64 tokens are staged through shared memory; online softmax in fp32. dk/dv: key-centric, one thread block per
// (segment, 64-token tile of the block): a segment is a run of at most `seg_rows / G` queries that selected one
// block, taken from the inverse index the caller builds (queries sorted by (b, kv, block)); partial dk/dv go to
// the fp32 accumulators with one atomicAdd per element per thread block.
//
// Tensor cores (kernels/nsa_select_tc.cu, design notes at its top). For bf16/fp16 inputs with head_dim 64 or 128,
// G in 1..16 and l' in {32, 64, 128}, on sm_80+, nsa_select_forward_cuda / nsa_select_backward_cuda run wmma
// (16x16x16, fp32 accumulate) kernels with the same work split: forward and dq per (b, t, kv head) with the G heads
// as the M = 16 rows of each MMA (zero-padded for G < 16), 64-key tiles as N; dk/dv per (segment, 64-key tile) over
// the same inverse index, chunks of 32 (query, head) rows. S, softmax statistics, dP and accumulators are fp32; P
// and dS are rounded to the input type before their MMA (as FlashAttention-2 does). fp32 inputs and every other
// shape keep the FMA kernels. Switch: nsa_select_set_tensor_cores(false) or ABLATE_NSA_TC=0 in the environment
// (read once, at the first query of the switch) selects the FMA kernels for bf16/fp16 too. Default on.
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

enum class NsaDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct NsaSelectShape {
  int64_t B = 0, T = 0, H = 0, KV = 0, head_dim = 0;
  int64_t num_selected = 0;  // n
  int64_t block = 0;         // l'
  float scale = 1.f;
  NsaDtype dtype = NsaDtype::kF32;
};

struct NsaSelectFwdArgs {
  NsaSelectShape s;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int64_t* block_idx = nullptr;
  void* o = nullptr;      // out, dtype
  float* lse = nullptr;   // out, (B, T, H)
};

// The inverse index for the key-centric dk/dv pass (CUDA only; the reference ignores it):
// rows_t[e] are query positions, grouped by flat key (b * KV + c) * Ns + j (Ns = ceil(T / l')), and
// segment g covers rows_t[seg_start[g], seg_start[g] + seg_len[g]) of key seg_key[g], seg_len[g] >= 1.
struct NsaSelectInverse {
  const int32_t* rows_t = nullptr;
  const int32_t* seg_key = nullptr;
  const int32_t* seg_start = nullptr;
  const int32_t* seg_len = nullptr;
  int64_t num_segments = 0;
};

struct NsaSelectBwdArgs {
  NsaSelectShape s;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int64_t* block_idx = nullptr;
  const void* dout = nullptr;   // dO, dtype
  const float* lse = nullptr;   // from the forward
  const float* delta = nullptr; // rowsum(dO * o) in fp32
  void* dq = nullptr;           // out, dtype (written, not accumulated)
  float* dk = nullptr;          // accumulated, fp32
  float* dv = nullptr;          // accumulated, fp32
  NsaSelectInverse inv;
};

// Queries per dk/dv segment for G heads per group: the work of one thread block stays ~kNsaSegRows rows.
inline constexpr int64_t kNsaSegRows = 512;
inline int64_t nsa_select_seg_queries(int64_t G) { return G >= kNsaSegRows ? 1 : kNsaSegRows / G; }

// What the CUDA kernels take: head_dim 64 or 128, G = H / KV in 1..16 (any l' >= 1).
inline bool nsa_select_cuda_supports(int64_t head_dim, int64_t G) {
  return (head_dim == 64 || head_dim == 128) && G >= 1 && G <= 16;
}

// The tensor-core switch (both builds; only the CUDA launchers read it). Default: on unless ABLATE_NSA_TC=0.
void nsa_select_set_tensor_cores(bool enabled);
bool nsa_select_tensor_cores();
// Test hook: how many forward/backward launches took the tensor-core kernels (process-wide, never reset).
int64_t nsa_select_tc_launches();
void nsa_select_note_tc_launch();  // called by the tensor-core launchers

// CPU reference (fp32 only). Returns false (and does nothing) for a dtype other than fp32.
bool nsa_select_forward_ref(const NsaSelectFwdArgs& a);
bool nsa_select_backward_ref(const NsaSelectBwdArgs& a);

#if ABLATE_WITH_CUDA
// cudaErrorInvalidValue for a shape nsa_select_cuda_supports refuses.
cudaError_t nsa_select_forward_cuda(const NsaSelectFwdArgs& a, cudaStream_t stream);
// Writes dq and adds into dk/dv (launches the dq and the dk/dv kernels on `stream`).
cudaError_t nsa_select_backward_cuda(const NsaSelectBwdArgs& a, cudaStream_t stream);
// The tensor-core kernels (kernels/nsa_select_tc.cu): whether they take this shape (switch on, bf16/fp16, head_dim
// 64/128, G 1..16, l' 32/64/128, current device sm_80+), and the launchers the two above dispatch to
// (cudaErrorInvalidValue where nsa_select_tc_applies is false).
bool nsa_select_tc_applies(const NsaSelectShape& s);
cudaError_t nsa_select_forward_tc(const NsaSelectFwdArgs& a, cudaStream_t stream);
cudaError_t nsa_select_backward_tc(const NsaSelectBwdArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
