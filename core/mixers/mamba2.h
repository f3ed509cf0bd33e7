// The Mamba2 mixer (mamba_ssm.Mamba2 at commit 35e927b, as configured by nsa_optim; seed-spec §4.2).
//
//   [z | xBC | dt] = in_proj(u)                        d -> 2*di + 2*G*N + nh, no bias
//   xBC = SiLU(causal_depthwise_conv(xBC) + bias)      kernel d_conv, channels di + 2*G*N
//   [x | B | C] = xBC;  dt = softplus(dt + dt_bias);  A = -exp(A_log)
//   y = SSD(x, dt, A, B, C) + D * x                    (core/mixers/ssd.h)
//   out = out_proj(RMSNorm(y * SiLU(z)) * w)           norm_before_gate = false, one group, eps 1e-5; no bias
//
// Parameter names follow mamba_ssm (in_proj, conv1d, dt_bias, A_log, D, norm_weight, out_proj). Note that
// "out_proj" deliberately does not contain "o_proj": the hybrid init (seed-spec §6.4) scales only "o_proj" and
// "down_proj", and the Mamba mixer's output projection keeps N(0, 0.02) there.
#pragma once
#include <torch/torch.h>

#include "core/mixers/short_conv.h"

namespace ablate::core {

struct Mamba2MixerOptions {
  explicit Mamba2MixerOptions(int64_t d_model) : d_model_(d_model) {}
  TORCH_ARG(int64_t, d_model);
  TORCH_ARG(int64_t, d_state) = 128;
  TORCH_ARG(int64_t, d_conv) = 4;
  TORCH_ARG(int64_t, expand) = 2;
  TORCH_ARG(int64_t, headdim) = 64;
  TORCH_ARG(int64_t, ngroups) = 1;
  TORCH_ARG(int64_t, chunk_size) = 256;
  TORCH_ARG(bool, use_chunked) = true;  // false: the per-step reference recurrence (tests)
  TORCH_ARG(double, norm_eps) = 1e-5;
  // Initialisation ranges (mamba_ssm defaults).
  TORCH_ARG(double, A_init_min) = 1.0;
  TORCH_ARG(double, A_init_max) = 16.0;
  TORCH_ARG(double, dt_min) = 1e-3;
  TORCH_ARG(double, dt_max) = 0.1;
  TORCH_ARG(double, dt_init_floor) = 1e-4;
};

class Mamba2MixerImpl : public torch::nn::Cloneable<Mamba2MixerImpl> {
 public:
  explicit Mamba2MixerImpl(const Mamba2MixerOptions& options);
  void reset() override;
  // u (B,T,d_model) -> (B,T,d_model), in u's dtype; the scan and the norm run in fp32 for bf16/fp16 inputs.
  torch::Tensor forward(const torch::Tensor& u);

  int64_t d_inner() const { return options.expand() * options.d_model(); }
  int64_t nheads() const { return d_inner() / options.headdim(); }
  // Exactly the parameters this layer registers (seed-spec §1.5 recipe generalised to ngroups G):
  // d*(2di + 2GN + nh) + (di + 2GN)*(k + 1) + 3*nh + di + di*d.
  static int64_t expected_num_parameters(const Mamba2MixerOptions& o);

  Mamba2MixerOptions options;
  torch::nn::Linear in_proj{nullptr};
  ShortConv conv1d{nullptr};
  torch::Tensor dt_bias;      // (nh), inverse-softplus of dt ~ logU[dt_min, dt_max], floored
  torch::Tensor A_log;        // (nh), log U[A_init_min, A_init_max]
  torch::Tensor D;            // (nh), ones
  torch::Tensor norm_weight;  // (di), ones
  torch::nn::Linear out_proj{nullptr};
};
TORCH_MODULE(Mamba2Mixer);

// dt ~ exp(U(log dt_min, log dt_max)) floored at `floor`, returned as softplus^{-1}(dt) = dt + log(-expm1(-dt)),
// the dt_bias initialisation shared by Mamba2 and Gated DeltaNet.
torch::Tensor init_dt_bias(int64_t n, double dt_min, double dt_max, double floor);

}  // namespace ablate::core
