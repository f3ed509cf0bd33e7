#include "core/mixers/gated_deltanet.h"

#include <cmath>

#include "core/mixers/delta_rule.h"
#include "core/mixers/mamba2.h"  // init_dt_bias
#include "core/mixers/param_init.h"

namespace ablate::core {

namespace F = torch::nn::functional;

namespace {

// fla's l2norm: x / sqrt(sum(x^2) + eps) over the head dim.
torch::Tensor l2_normalize(const torch::Tensor& x, double eps) {
  return x * torch::rsqrt(x.pow(2).sum(-1, /*keepdim=*/true) + eps);
}
}  // namespace

GatedDeltaNetMixerImpl::GatedDeltaNetMixerImpl(const GatedDeltaNetMixerOptions& options_) : options(options_) {
  reset();
}

int64_t GatedDeltaNetMixerImpl::num_heads() const {
  return options.num_heads() > 0 ? options.num_heads() : options.d_model() / options.head_dim();
}

int64_t GatedDeltaNetMixerImpl::expected_num_parameters(const GatedDeltaNetMixerOptions& o) {
  const int64_t d = o.d_model();
  const int64_t h = o.num_heads() > 0 ? o.num_heads() : d / o.head_dim();
  const int64_t dk = h * o.head_dim(), hv = o.head_dim() * o.expand_v(), dv = h * hv;
  return 2 * d * dk                                                  // q_proj, k_proj
         + 2 * d * dv                                                // v_proj, g_proj (output gate)
         + 2 * d * h                                                 // a_proj (decay), b_proj (beta)
         + 2 * h                                                     // A_log, dt_bias
         + (o.use_short_conv() ? o.conv_size() * (2 * dk + dv) : 0)  // q/k/v depthwise conv weights, no bias
         + hv                                                        // output RMSNorm weight, shared by the heads
         + dv * d;                                                   // o_proj
}

void GatedDeltaNetMixerImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.d_model() > 0 && o.head_dim() > 0 && o.expand_v() > 0 && o.chunk_size() > 0 && o.conv_size() > 0,
              "GatedDeltaNetMixer: d_model, head_dim, expand_v, conv_size and chunk_size must be positive");
  TORCH_CHECK(o.num_heads() > 0 || o.d_model() % o.head_dim() == 0, "GatedDeltaNetMixer: d_model (", o.d_model(),
              ") must be a multiple of head_dim (", o.head_dim(), ") when num_heads is derived");
  TORCH_CHECK(o.A_init_max() > 0 && 0 < o.dt_min() && o.dt_min() <= o.dt_max(),
              "GatedDeltaNetMixer: bad A/dt initialisation ranges");
  const int64_t d = o.d_model(), h = num_heads(), dk = key_dim(), dv = value_dim();

  q_proj = register_module("q_proj", make_linear(d, dk));
  k_proj = register_module("k_proj", make_linear(d, dk));
  v_proj = register_module("v_proj", make_linear(d, dv));
  a_proj = register_module("a_proj", make_linear(d, h));
  b_proj = register_module("b_proj", make_linear(d, h));
  g_proj = register_module("g_proj", make_linear(d, dv));
  o_proj = register_module("o_proj", make_linear(dv, d));
  if (o.use_short_conv()) {
    q_conv1d = register_module("q_conv1d", ShortConv(ShortConvOptions(dk, o.conv_size()).bias(false).silu(true)));
    k_conv1d = register_module("k_conv1d", ShortConv(ShortConvOptions(dk, o.conv_size()).bias(false).silu(true)));
    v_conv1d = register_module("v_conv1d", ShortConv(ShortConvOptions(dv, o.conv_size()).bias(false).silu(true)));
  }
  // A ~ U(0, 16) as in fla; U(0, ·) can return exactly 0, so clamp before the log (A = 1e-6 means "no decay").
  A_log = register_parameter("A_log", torch::log(torch::empty({h}).uniform_(0.0, o.A_init_max()).clamp_min(1e-6)));
  dt_bias = register_parameter("dt_bias", init_dt_bias(h, o.dt_min(), o.dt_max(), o.dt_init_floor()));
  o_norm_weight = register_parameter("o_norm_weight", torch::ones({head_v_dim()}));
}

torch::Tensor GatedDeltaNetMixerImpl::forward(const torch::Tensor& x) {
  const auto& o = options;
  TORCH_CHECK(x.dim() == 3 && x.size(2) == o.d_model(), "GatedDeltaNetMixer: input must be (B,T,", o.d_model(),
              "), got ", x.sizes());
  const int64_t Bn = x.size(0), T = x.size(1), h = num_heads(), K = o.head_dim(), Vh = head_v_dim();

  torch::Tensor q, k, v;
  if (o.use_short_conv()) {
    q = q_conv1d->forward(q_proj->forward(x));
    k = k_conv1d->forward(k_proj->forward(x));
    v = v_conv1d->forward(v_proj->forward(x));
  } else {  // fla applies the SiLU directly when there is no short conv
    q = torch::silu(q_proj->forward(x));
    k = torch::silu(k_proj->forward(x));
    v = torch::silu(v_proj->forward(x));
  }
  // Everything past the projections in fp32 (fla's kernels upcast internally too).
  q = l2_normalize(q.to(torch::kFloat32).reshape({Bn, T, h, K}), 1e-6);
  k = l2_normalize(k.to(torch::kFloat32).reshape({Bn, T, h, K}), 1e-6);
  v = v.to(torch::kFloat32).reshape({Bn, T, h, Vh});
  const auto beta = torch::sigmoid(b_proj->forward(x).to(torch::kFloat32));
  const auto g = -torch::exp(A_log.to(torch::kFloat32)) *
                 F::softplus(a_proj->forward(x).to(torch::kFloat32) + dt_bias.to(torch::kFloat32));

  const double scale = 1.0 / std::sqrt(static_cast<double>(K));
  auto out = o.use_chunked() ? std::get<0>(gated_delta_rule_chunked(q, k, v, g, beta, o.chunk_size(), scale))
                             : std::get<0>(gated_delta_rule_sequential(q, k, v, g, beta, scale));

  // FusedRMSNormGated (swish): per-head RMSNorm over head_v_dim, times w, times SiLU(gate).
  const auto gate = g_proj->forward(x).to(torch::kFloat32).reshape({Bn, T, h, Vh});
  out = out * torch::rsqrt(out.pow(2).mean(-1, /*keepdim=*/true) + o.norm_eps()) * o_norm_weight.to(torch::kFloat32) *
        torch::silu(gate);
  return o_proj->forward(out.reshape({Bn, T, h * Vh}).to(x.scalar_type()));
}

}  // namespace ablate::core
