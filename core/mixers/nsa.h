// Native Sparse Attention (Yuan et al. 2025, arXiv 2502.11089): three branches per query, mixed by per-head
// sigmoid gates computed from the layer input.
//   cmp: attention over learned block compressions (block l = cmp_block, stride d = cmp_stride);
//   slc: attention over the top-n selection blocks (block l' = slc_block), scored from the cmp probabilities
//        (paper eq. 9) summed over the heads of a GQA group, so all G = H/KV heads of a group share blocks;
//        the initial block(s) and the local block(s) are always selected;
//   swa: sliding-window attention over [t - w + 1, t].
//
// The fast path is chunked over queries and never materialises T x T scores, nor gathered K/V for all queries
// at once: every per-chunk intermediate is bounded by `chunk_budget` elements. The three branches are custom
// autograd Functions whose backward recomputes scores chunk by chunk, so the saved state is the inputs only
// (O(T*H*hd + T*KV*n)). Plain LibTorch ops: runs on CPU and CUDA. `nsa_reference` is the dense O(T^2) oracle.
//
// Layout: q (B, T, H, hd), k/v (B, T, KV, hd), x (B, T, d_model); query head h uses kv head h / G
// (the repeat_interleave convention). q/k are already projected and RoPE'd by the caller.
#pragma once
#include <torch/torch.h>

#include <cstdint>

namespace ablate::core {

struct NsaAttentionOptions {
  NsaAttentionOptions(int64_t d_model, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim)
      : d_model_(d_model), num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim) {}

  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, num_heads);
  TORCH_ARG(int64_t, num_kv_heads);
  TORCH_ARG(int64_t, head_dim);
  // Compression: block l, stride d (l % d == 0). Block j covers tokens [j*d, j*d + l).
  TORCH_ARG(int64_t, cmp_block) = 32;
  TORCH_ARG(int64_t, cmp_stride) = 16;
  // Hidden width of the 2-layer compression MLP; 0 means head_dim.
  TORCH_ARG(int64_t, cmp_hidden) = 0;
  // Selection: block l' (l' % d == 0), n blocks per query, of which these are forced.
  TORCH_ARG(int64_t, slc_block) = 64;
  TORCH_ARG(int64_t, num_selected) = 16;
  TORCH_ARG(int64_t, num_init_blocks) = 1;   // blocks 0 .. num_init_blocks-1
  TORCH_ARG(int64_t, num_local_blocks) = 2;  // the query's own block and the ones just before it
  TORCH_ARG(int64_t, window) = 512;
  TORCH_ARG(double, softmax_scale) = 0.0;  // 0 means 1/sqrt(head_dim)
  // Upper bound on queries per chunk, and on the elements of any per-chunk intermediate (scores, gathered
  // K/V); the chunk shrinks to honour the budget (never below one query). The default (64 MiB of fp32) suits
  // a GPU; on CPU ~1 << 22 is faster (fewer page faults per chunk).
  TORCH_ARG(int64_t, query_chunk) = 512;
  TORCH_ARG(int64_t, chunk_budget) = int64_t{1} << 24;

 public:  // TORCH_ARG leaves the section private
  // Throws (TORCH_CHECK) on inconsistent settings.
  void validate() const;
  double scale() const;
  int64_t num_cmp_blocks(int64_t T) const;  // blocks fully inside [0, T): T >= l ? (T - l) / d + 1 : 0
  int64_t num_slc_blocks(int64_t T) const;  // ceil(T / l')
};

// Per-branch outputs, exposed for tests and for the later CUDA kernels.
struct NsaBranches {
  torch::Tensor out;        // (B, T, H, hd) gated sum
  torch::Tensor o_cmp;      // (B, T, H, hd)
  torch::Tensor o_slc;      // (B, T, H, hd)
  torch::Tensor o_swa;      // (B, T, H, hd)
  torch::Tensor gates;      // (B, T, 3, H): sigmoid gates for cmp, slc, swa
  torch::Tensor block_idx;  // (B, T, KV, n) int64 selection blocks, ascending, -1 = unused slot
};

// Compression MLP (one for keys, one for values): phi(block) = fc2(gelu(fc1(flatten(block + pe)))), with pe a
// learned (l, hd) intra-block position embedding. Two layers rather than one Linear(l*hd -> hd) because with a
// single linear map the position embedding folds into a bias and carries no information. Shared by all KV heads.
struct NsaAttentionImpl : torch::nn::Module {
  explicit NsaAttentionImpl(const NsaAttentionOptions& options);
  void reset();
  void reset_parameters();

  // -> (B, T, H, hd)
  torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& x);
  NsaBranches forward_branches(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& x);
  // (B, T, KV, hd) -> (B, Nc, KV, hd) compressed keys / values.
  torch::Tensor compress_keys(const torch::Tensor& k);
  torch::Tensor compress_values(const torch::Tensor& v);
  // (B, T, d_model) -> (B, T, 3, H) sigmoid gates.
  torch::Tensor gates(const torch::Tensor& x);

  NsaAttentionOptions options;
  torch::Tensor cmp_k_pe, cmp_v_pe;  // (l, hd)
  torch::nn::Linear cmp_k_fc1{nullptr}, cmp_k_fc2{nullptr}, cmp_v_fc1{nullptr}, cmp_v_fc2{nullptr};
  torch::nn::Linear gate{nullptr};  // d_model -> 3H, with bias

 private:
  torch::Tensor compress(const torch::Tensor& kv, const torch::Tensor& pe, torch::nn::Linear& fc1,
                         torch::nn::Linear& fc2);
};
TORCH_MODULE(NsaAttention);

// ---- The three chunked branches (custom autograd Functions; backward recomputes per query chunk). ----

struct NsaCmpResult {
  torch::Tensor out;        // (B, T, H, hd); zero for queries with no complete compressed block
  torch::Tensor block_idx;  // (B, T, KV, n) int64, non-differentiable
};
// q (B,T,H,hd), kc/vc (B,Nc,KV,hd): compressed attention, plus the top-n selection derived from its
// probabilities. Query t sees compressed block j iff j*d + l - 1 <= t.
NsaCmpResult nsa_compressed_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                                      const NsaAttentionOptions& o);
// Selected attention: query t attends to tokens s <= t of its selected blocks (block_idx, -1 = unused).
torch::Tensor nsa_selected_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& block_idx, const NsaAttentionOptions& o);
// Sliding window: query t attends to tokens in [t - w + 1, t].
torch::Tensor nsa_window_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const NsaAttentionOptions& o);

// ---- Selection pieces, shared by the fast path and the reference (they define the selection rule). ----

// Compressed-block probabilities (..., Ncb) -> selection-block importance (..., Ns), paper eq. 9 for l, l'
// multiples of d: p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d) j + m - n], i.e. each compressed block
// weighted by how many of its stride-d sub-blocks lie in selection block j. (The paper prints "- m", which
// under our 0-based block convention would point one selection block too early.)
torch::Tensor nsa_cmp_to_slc_importance(const torch::Tensor& p_cmp, int64_t num_slc_blocks,
                                        const NsaAttentionOptions& o);
// importance (B, KV, C, Ns) for query positions t_pos (C) -> (B, KV, C, n) int64 block ids, ascending, -1 for
// unused slots. Eligible: j*l' <= t. Forced (always kept when eligible): j < num_init_blocks, and
// j > t/l' - num_local_blocks.
torch::Tensor nsa_select_blocks(const torch::Tensor& importance, const torch::Tensor& t_pos,
                                const NsaAttentionOptions& o);

// ---- The dense O(T^2) reference. ----

struct NsaReferenceOutput {
  NsaBranches branches;
  torch::Tensor p_cmp;       // (B, T, H, Nc) compressed-attention probabilities
  torch::Tensor importance;  // (B, T, KV, Ns) group-summed selection importance
};
// Same compressed keys/values (the module's MLPs), importance and selection; then dense masked softmax
// attention per branch with boolean (T x T) masks. For tests only: memory is O(B*H*T^2).
NsaReferenceOutput nsa_reference(NsaAttentionImpl& module, const torch::Tensor& q, const torch::Tensor& k,
                                 const torch::Tensor& v, const torch::Tensor& x);

// Test hook: the largest per-chunk intermediate (scores / gathered K or V) created by the fast branches since
// the last reset, in elements.
int64_t nsa_max_chunk_numel();
void nsa_reset_chunk_stats();

// Test hook: whether nsa_selected_attention may run the CUDA kernels (kernels/nsa_select.h) on CUDA tensors of
// fp32/bf16/fp16 with head_dim 64 or 128 and G <= 16 (default true). false forces the chunked LibTorch path, for
// comparisons and timings. The kernel path creates no per-chunk intermediates (nsa_max_chunk_numel stays put).
void nsa_set_slc_kernels_enabled(bool enabled);
bool nsa_slc_kernels_enabled();

// Test hook: whether nsa_window_attention may run through SDPA's fused CUDA kernels (flash / memory-efficient /
// cuDNN, chunked with a band mask) on CUDA tensors (default true); it falls back to the chunked LibTorch Function
// when SDPA would pick its math backend. false forces the LibTorch Function.
void nsa_set_swa_sdpa_enabled(bool enabled);
bool nsa_swa_sdpa_enabled();

// Whether nsa_window_attention runs FlashAttention-2's local (sliding-window) kernels that LibTorch carries
// (at::_flash_attention_forward/_backward with window_size_left = window - 1) on CUDA bf16/fp16 tensors of sm_80+
// with head_dim a multiple of 8 up to 256; ahead of the SDPA path above. Default ON (its GPU test,
// tests/mixers/nsa_gpu_test.cpp WindowSdpaMatchesLibTorchPath, passed on the H200); ABLATE_NSA_SWA_FLASH=0 (read
// once) turns it off. nsa_swa_flash_calls counts its forward calls (tests).
void nsa_set_swa_flash_enabled(bool enabled);
bool nsa_swa_flash_enabled();
int64_t nsa_swa_flash_calls();

// Whether nsa_compressed_attention runs the fused CUDA kernels (kernels/nsa_compress.h: online-softmax forward,
// importance recomputed from the saved lse, FlashAttention-2 style backward) on CUDA tensors of fp32/bf16/fp16 with
// head_dim 64 or 128 and G <= 16, instead of the chunked LibTorch Function. Default on (validated on the H200:
// tests/mixers/nsa_compress_gpu_test.cpp, bench/RESULTS.md) unless the environment has ABLATE_NSA_CMP_FUSED=0, read
// once at the first use of the switch; the LibTorch Function stays the CPU path and the reference. nsa_cmp_fused_calls() counts the forwards that took the kernels (process-wide, never reset).
void nsa_set_cmp_fused_enabled(bool enabled);
bool nsa_cmp_fused_enabled();
int64_t nsa_cmp_fused_calls();

}  // namespace ablate::core
