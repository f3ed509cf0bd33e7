// Dense decoder-only Transformer: pre-norm RMSNorm, RoPE (NeoX rotate_half), GQA via SDPA, SwiGLU,
// no biases, untied head, N(0, 0.02) init. Plus the chunked linear + cross-entropy loss.
#pragma once
#include <torch/torch.h>

#include "core/config.h"

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

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const ModelDims& m);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
  int64_t n_heads, n_kv_heads, head_dim;
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
};
TORCH_MODULE(Attention);

struct MLPImpl : torch::nn::Module {
  MLPImpl(const ModelDims& m);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear gate{nullptr}, up{nullptr}, down{nullptr};
};
TORCH_MODULE(MLP);

struct BlockImpl : torch::nn::Module {
  BlockImpl(const ModelDims& m);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
  torch::Tensor norm1, norm2;  // RMSNorm weights
  Attention attn{nullptr};
  MLP mlp{nullptr};
};
TORCH_MODULE(Block);

struct TransformerImpl : torch::nn::Module {
  TransformerImpl(const ModelDims& m, double rope_theta);
  // ids: [B, T] int64 -> final-normed hidden states [B, T, d].
  torch::Tensor hidden_states(const torch::Tensor& ids);
  // Full logits [B, T, padded_vocab]; for tests and small inputs only.
  torch::Tensor logits(const torch::Tensor& ids);
  // Mean next-token CE: targets[b, t] is the label for position t (already shifted by the caller), -100 = ignore.
  torch::Tensor loss(const torch::Tensor& ids, const torch::Tensor& targets);
  // Parameter groups for AdamW: matrices get weight decay; norms (1-D) and the embedding do not.
  std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> decay_groups();

  ModelDims dims;
  double rope_theta;
  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::Tensor final_norm;
  torch::nn::Linear head{nullptr};

 private:
  torch::Tensor cos_, sin_;  // RoPE cache, not part of the state dict; rebuilt when T grows or the device changes
};
TORCH_MODULE(Transformer);

constexpr double kNormEps = 1e-6;

}  // namespace ablate
