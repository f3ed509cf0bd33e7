#include "core/mixers/mamba2.h"
#include "core/mixers/param_init.h"

#include <cmath>

#include "core/mixers/ssd.h"

namespace ablate::core {

namespace F = torch::nn::functional;

torch::Tensor init_dt_bias(int64_t n, double dt_min, double dt_max, double floor) {
  auto dt = torch::exp(torch::rand({n}, torch::kFloat64) * (std::log(dt_max) - std::log(dt_min)) + std::log(dt_min))
                .clamp_min(floor);
  return (dt + torch::log(-torch::expm1(-dt))).to(torch::kFloat32);
}

Mamba2MixerImpl::Mamba2MixerImpl(const Mamba2MixerOptions& options_) : options(options_) { reset(); }

int64_t Mamba2MixerImpl::expected_num_parameters(const Mamba2MixerOptions& o) {
  const int64_t d = o.d_model(), di = o.expand() * d, nh = di / o.headdim();
  const int64_t gn = o.ngroups() * o.d_state(), k = o.d_conv();
  return d * (2 * di + 2 * gn + nh)  // in_proj
         + (di + 2 * gn) * (k + 1)   // conv1d weight + bias
         + 3 * nh                    // dt_bias, A_log, D
         + di                        // norm weight
         + di * d;                   // out_proj
}

void Mamba2MixerImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.d_model() > 0 && o.expand() > 0 && o.d_state() > 0 && o.d_conv() > 0 && o.chunk_size() > 0,
              "Mamba2Mixer: d_model, expand, d_state, d_conv and chunk_size must be positive");
  TORCH_CHECK(o.headdim() > 0 && d_inner() % o.headdim() == 0, "Mamba2Mixer: d_inner (", d_inner(),
              ") must be a multiple of headdim (", o.headdim(), ")");
  TORCH_CHECK(o.ngroups() > 0 && nheads() % o.ngroups() == 0, "Mamba2Mixer: nheads (", nheads(),
              ") must be a multiple of ngroups (", o.ngroups(), ")");
  TORCH_CHECK(0 < o.A_init_min() && o.A_init_min() <= o.A_init_max(), "Mamba2Mixer: need 0 < A_init_min <= A_init_max");
  TORCH_CHECK(0 < o.dt_min() && o.dt_min() <= o.dt_max(), "Mamba2Mixer: need 0 < dt_min <= dt_max");
  const int64_t di = d_inner(), nh = nheads(), gn = o.ngroups() * o.d_state();

  // PyTorch's default Linear init (kaiming-uniform) unless the model defers it: it re-initialises Linears later
  // (N(0, 0.02), core/mixers/param_init.h).
  in_proj = register_module("in_proj", make_linear(o.d_model(), 2 * di + 2 * gn + nh));
  conv1d = register_module("conv1d", ShortConv(ShortConvOptions(di + 2 * gn, o.d_conv()).bias(true).silu(true)));
  dt_bias = register_parameter("dt_bias", init_dt_bias(nh, o.dt_min(), o.dt_max(), o.dt_init_floor()));
  A_log = register_parameter("A_log", torch::log(torch::empty({nh}).uniform_(o.A_init_min(), o.A_init_max())));
  D = register_parameter("D", torch::ones({nh}));
  norm_weight = register_parameter("norm_weight", torch::ones({di}));
  out_proj = register_module("out_proj", make_linear(di, o.d_model()));
}

torch::Tensor Mamba2MixerImpl::forward(const torch::Tensor& u) {
  const auto& o = options;
  TORCH_CHECK(u.dim() == 3 && u.size(2) == o.d_model(), "Mamba2Mixer: input must be (B,T,", o.d_model(), "), got ",
              u.sizes());
  const int64_t Bn = u.size(0), T = u.size(1), di = d_inner(), nh = nheads(), P = o.headdim();
  const int64_t G = o.ngroups(), N = o.d_state();
  const auto zxbcdt = in_proj->forward(u);
  const auto z = zxbcdt.narrow(-1, 0, di);
  const auto xBC = conv1d->forward(zxbcdt.narrow(-1, di, di + 2 * G * N));
  const auto dt_raw = zxbcdt.narrow(-1, 2 * di + 2 * G * N, nh);

  const auto x = xBC.narrow(-1, 0, di).reshape({Bn, T, nh, P});
  const auto B = xBC.narrow(-1, di, G * N).reshape({Bn, T, G, N});
  const auto C = xBC.narrow(-1, di + G * N, G * N).reshape({Bn, T, G, N});
  // dt, A and the scan in fp32 (mamba_ssm does the same inside its kernels, even for a bf16 model).
  const auto dt = F::softplus(dt_raw.to(torch::kFloat32) + dt_bias.to(torch::kFloat32));
  const auto A = -torch::exp(A_log.to(torch::kFloat32));
  const auto xf = x.to(torch::kFloat32);
  torch::Tensor y;
  if (o.use_chunked()) {
    y = std::get<0>(ssd_chunked(xf, dt, A, B, C, o.chunk_size()));
  } else {
    y = std::get<0>(ssd_sequential(xf, dt, A, B, C));
  }
  y = (y + xf * D.to(torch::kFloat32).unsqueeze(-1)).reshape({Bn, T, di});

  // Gated RMSNorm, norm_before_gate = false: RMSNorm(y * SiLU(z)) * w over the whole d_inner (one group).
  const auto gated = y * torch::silu(z.to(torch::kFloat32));
  const auto normed =
      gated * torch::rsqrt(gated.pow(2).mean(-1, /*keepdim=*/true) + o.norm_eps()) * norm_weight.to(torch::kFloat32);
  return out_proj->forward(normed.to(u.scalar_type()));
}

}  // namespace ablate::core
