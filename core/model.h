// Decoder-only language models of every family of the study, built from a block pattern (core/config.h ModelDims):
// A = attention (dense causal SDPA with GQA, or Native Sparse Attention), M = Mamba2 (SSD), D = Gated DeltaNet.
// Each block: pre-norm RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU -> residual. RoPE (NeoX rotate_half) in
// the attention blocks, no biases outside the mixers, final norm, untied head, linear + CE loss that never holds
// the full logits. ModelDims::fused_kernels / fused_loss pick the hand-written kernels of core/ops (default) or
// the LibTorch composites.
#pragma once
#include <torch/torch.h>

#include "core/config.h"
#include "core/mixers/gated_deltanet.h"
#include "core/mixers/mamba2.h"
#include "core/mixers/nsa.h"

namespace ablate {

// RoPE tables [T, hd] (angles concatenated with themselves), fp32.
std::pair<torch::Tensor, torch::Tensor> rope_tables(int64_t T, int64_t head_dim, double theta, torch::Device dev);
// x: [B, H, T, hd]; cos/sin: [T, hd]. x*cos + rotate_half(x)*sin with rotate_half([a, b]) = [-b, a].
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

// Mean CE of (hidden @ weight^T) against targets, ignoring targets == -100, computed chunk_rows rows at a
// time. The gradients are computed during the forward chunk by chunk (as Liger does), so the [N, V] logits
// never exist in full; memory is O(N*d + V*d + chunk_rows*V). hidden: [N, d], weight: [V, d], targets: [N].
torch::Tensor chunked_linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                           const torch::Tensor& targets, int64_t chunk_rows = 0);

// Attention mixer: q/k/v/o projections and RoPE, then dense causal SDPA (GQA without copying K/V) or NSA.
struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(const ModelDims& m);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
  int64_t n_heads, n_kv_heads, head_dim;
  bool fused;  // RoPE kernel (core/ops/rope.h) instead of apply_rope
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  core::NsaAttention nsa{nullptr};  // set when attn_type == "nsa": replaces SDPA on the projected q, k, v
};
TORCH_MODULE(Attention);

struct MLPImpl : torch::nn::Module {
  explicit MLPImpl(const ModelDims& m);
  torch::Tensor forward(const torch::Tensor& x);
  bool fused;  // SwiGLU kernel instead of silu(gate) * up
  torch::nn::Linear gate{nullptr}, up{nullptr}, down{nullptr};
};
TORCH_MODULE(MLP);

// One layer of type 'A', 'M' or 'D'; exactly one of attn / mamba / deltanet is set.
struct BlockImpl : torch::nn::Module {
  BlockImpl(const ModelDims& m, char type);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
  char type;
  bool fused;                  // RMSNorm and residual + RMSNorm kernels instead of the composites
  torch::Tensor norm1, norm2;  // RMSNorm weights
  Attention attn{nullptr};
  core::Mamba2Mixer mamba{nullptr};
  core::GatedDeltaNetMixer deltanet{nullptr};
  MLP mlp{nullptr};
};
TORCH_MODULE(Block);

struct LanguageModelImpl : torch::nn::Module {
  LanguageModelImpl(const ModelDims& m, double rope_theta);
  // ids: [B, T] int64 -> final-normed hidden states [B, T, d].
  torch::Tensor hidden_states(const torch::Tensor& ids);
  // Full logits [B, T, padded_vocab]; for tests and small inputs only.
  torch::Tensor logits(const torch::Tensor& ids);
  // Mean next-token CE: targets[b, t] is the label for position t (already shifted by the caller), -100 = ignore.
  torch::Tensor loss(const torch::Tensor& ids, const torch::Tensor& targets);
  // Parameter groups for AdamW: matrices get weight decay; 1-D tensors (norms, biases, SSM scalars) and the
  // embedding do not.
  std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> decay_groups();
  // Per-block activation checkpointing (core/checkpointing.h) while training with gradients.
  void set_gradient_checkpointing(bool on) { gradient_checkpointing = on; }
  // Seed init: every Linear N(0, 0.02) with zero bias, embedding N(0, 0.02) (2.7); hybrids additionally scale
  // attention o / GDN o_proj / MLP down to 0.02/sqrt(2n) and the head to 0.02/sqrt(n) (6.4). Mixer-specific
  // tensors (convs, A_log, dt_bias, D, norms, NSA position embeddings) keep their own initialisation.
  void init_weights();

  ModelDims dims;
  double rope_theta;
  bool gradient_checkpointing = false;
  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::Tensor final_norm;
  torch::nn::Linear head{nullptr};

 private:
  torch::Tensor cos_, sin_;  // RoPE cache, not part of the state dict; rebuilt when T grows or the device changes
};
TORCH_MODULE(LanguageModel);

// The engine's first (dense-only) name for the model, kept for existing callers.
using Transformer = LanguageModel;
using TransformerImpl = LanguageModelImpl;

constexpr double kNormEps = 1e-6;

}  // namespace ablate
