// The Gated DeltaNet mixer (flash-linear-attention's fla.layers.GatedDeltaNet as configured by nsa_optim,
// seed-spec §5): mode "chunk", use_gate, short convs without bias, num_v_heads = num_heads, no negative eigenvalues.
//
//   q, k = SiLU(conv(W_q x)), SiLU(conv(W_k x))      d -> dk = H*head_dim, then L2-normalised per head (eps 1e-6)
//   v    = SiLU(conv(W_v x))                         d -> dv = H*head_v_dim, head_v_dim = head_dim*expand_v
//   beta = sigmoid(W_b x);  g = -exp(A_log) * softplus(W_a x + dt_bias)            (one scalar per head)
//   o    = gated_delta_rule(q, k, v, g, beta, scale = 1/sqrt(head_dim))            (core/mixers/delta_rule.h)
//   out  = o_proj(RMSNorm_head(o) * w  ⊙  SiLU(W_g x))   norm per head over head_v_dim, eps norm_eps, w shared
//
// Parameter names follow fla (q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, o_proj, q_conv1d, k_conv1d,
// v_conv1d, A_log, dt_bias, o_norm_weight). "o_proj" matters: the hybrid init (seed-spec §6.4) scales it.
#pragma once
#include <torch/torch.h>

#include "core/mixers/short_conv.h"

namespace ablate::core {

struct GatedDeltaNetMixerOptions {
  explicit GatedDeltaNetMixerOptions(int64_t d_model) : d_model_(d_model) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, head_dim) = 64;
  TORCH_ARG(int64_t, num_heads) = 0;  // 0: d_model / head_dim (what nsa_optim passes)
  TORCH_ARG(int64_t, expand_v) = 2;
  TORCH_ARG(int64_t, conv_size) = 4;
  TORCH_ARG(bool, use_short_conv) = true;
  TORCH_ARG(double, norm_eps) = 1e-6;
  TORCH_ARG(int64_t, chunk_size) = 64;
  TORCH_ARG(bool, use_chunked) = true;  // false: the per-step reference recurrence (tests)
  // Initialisation ranges (fla defaults).
  TORCH_ARG(double, A_init_max) = 16.0;  // A ~ U(0, A_init_max)
  TORCH_ARG(double, dt_min) = 1e-3;
  TORCH_ARG(double, dt_max) = 0.1;
  TORCH_ARG(double, dt_init_floor) = 1e-4;
};

class GatedDeltaNetMixerImpl : public torch::nn::Cloneable<GatedDeltaNetMixerImpl> {
 public:
  explicit GatedDeltaNetMixerImpl(const GatedDeltaNetMixerOptions& options);
  void reset() override;
  // x (B,T,d_model) -> (B,T,d_model), in x's dtype; the recurrence and the norms run in fp32 for bf16/fp16 inputs.
  torch::Tensor forward(const torch::Tensor& x);

  int64_t num_heads() const;
  int64_t key_dim() const { return num_heads() * options.head_dim(); }
  int64_t head_v_dim() const { return options.head_dim() * options.expand_v(); }
  int64_t value_dim() const { return num_heads() * head_v_dim(); }
  // Exactly the parameters this layer registers; with short convs it is seed-spec §1.5's recipe
  // 2·d·dk + 2·d·dv + 2·d·h + 2h + W·(2dk + dv) + hv + dv·d (W = conv_size = 4 there).
  static int64_t expected_num_parameters(const GatedDeltaNetMixerOptions& o);

  GatedDeltaNetMixerOptions options;
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr};
  torch::nn::Linear a_proj{nullptr}, b_proj{nullptr}, g_proj{nullptr}, o_proj{nullptr};
  ShortConv q_conv1d{nullptr}, k_conv1d{nullptr}, v_conv1d{nullptr};  // null when use_short_conv is false
  torch::Tensor A_log;          // (H), log U(0, A_init_max), guarded away from log 0
  torch::Tensor dt_bias;        // (H), inverse-softplus of dt ~ logU[dt_min, dt_max], floored
  torch::Tensor o_norm_weight;  // (head_v_dim), ones; shared by all heads
};
TORCH_MODULE(GatedDeltaNetMixer);

}  // namespace ablate::core
