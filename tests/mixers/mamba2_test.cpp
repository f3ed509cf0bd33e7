// Mamba2Mixer: parameter count vs seed-spec §1.5, initialisation, wiring against an independent composition,
// chunked vs sequential path, causality, bf16.
#include "core/mixers/mamba2.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/mixers/ssd.h"
#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::rel_err;
namespace F = torch::nn::functional;

int64_t count_parameters(const torch::nn::Module& m) {
  int64_t n = 0;
  for (const auto& p : m.parameters()) n += p.numel();
  return n;
}

// A small mixer that exercises groups, several chunks and a partial last chunk.
Mamba2MixerOptions small_options() {
  return Mamba2MixerOptions(32).d_state(8).headdim(8).ngroups(2).chunk_size(16);  // di 64, 8 heads, 2 groups
}

// Random (non-default) values for the parameters that are initialised to constants, so wiring mistakes show.
void randomise(Mamba2MixerImpl& m) {
  torch::NoGradGuard ng;
  m.D.uniform_(0.5, 1.5);
  m.norm_weight.uniform_(0.5, 1.5);
}

TEST(Mamba2Mixer, ParameterCountMatchesSeedSpecRecipe) {
  // seed-spec §1.5: d·(2·di + 2·N + nh) + (di + 2N)·(k + 1) + 3·nh + di + di·d, with di = 2d, N = 128,
  // nh = di/64, k = 4 — at d = 1024: 4,489,216 + 11,520 + 96 + 2,048 + 2,097,152.
  Mamba2Mixer m1024(Mamba2MixerOptions(1024));
  EXPECT_EQ(count_parameters(*m1024), 6'600'032);
  EXPECT_EQ(Mamba2MixerImpl::expected_num_parameters(m1024->options), 6'600'032);
  Mamba2Mixer m2048(Mamba2MixerOptions(2048));
  EXPECT_EQ(count_parameters(*m2048), 25'847'232);
  // With groups the B/C widths become G·N: d=32, di=64, nh=8, G·N=16 →
  // 32·(128+32+8) + (64+32)·5 + 24 + 64 + 64·32 = 5376 + 480 + 24 + 64 + 2048.
  Mamba2Mixer small(small_options());
  EXPECT_EQ(count_parameters(*small), 7'992);
  EXPECT_EQ(Mamba2MixerImpl::expected_num_parameters(small_options()), 7'992);
}

TEST(Mamba2Mixer, ParameterNamesAndShapes) {
  Mamba2Mixer m(small_options());
  const auto p = m->named_parameters();
  EXPECT_EQ(p.size(), 8u);
  EXPECT_EQ(p["in_proj.weight"].sizes(), torch::IntArrayRef({2 * 64 + 2 * 16 + 8, 32}));
  EXPECT_EQ(p["conv1d.weight"].sizes(), torch::IntArrayRef({64 + 32, 1, 4}));
  EXPECT_EQ(p["conv1d.bias"].sizes(), torch::IntArrayRef({64 + 32}));
  EXPECT_EQ(p["dt_bias"].sizes(), torch::IntArrayRef({8}));
  EXPECT_EQ(p["A_log"].sizes(), torch::IntArrayRef({8}));
  EXPECT_EQ(p["D"].sizes(), torch::IntArrayRef({8}));
  EXPECT_EQ(p["norm_weight"].sizes(), torch::IntArrayRef({64}));
  EXPECT_EQ(p["out_proj.weight"].sizes(), torch::IntArrayRef({32, 64}));
}

// seed-spec §4.2: A = exp(A_log) ~ U(1,16); softplus(dt_bias) ~ logU[1e-3, 0.1]; D = 1; norm weight = 1;
// conv weights and bias ~ U(-1/2, 1/2) (PyTorch Conv1d default with fan_in = 4).
TEST(Mamba2Mixer, InitialisationFollowsMambaSsm) {
  torch::manual_seed(1);
  Mamba2Mixer m(Mamba2MixerOptions(1024));  // 32 heads
  const auto A = torch::exp(m->A_log.detach());
  EXPECT_GE(A.min().item<double>(), 1.0 - 1e-5);
  EXPECT_LE(A.max().item<double>(), 16.0 + 1e-4);
  EXPECT_GT(A.max().item<double>() - A.min().item<double>(), 5.0);  // spread, not a constant
  const auto dt = F::softplus(m->dt_bias.detach());
  EXPECT_GE(dt.min().item<double>(), 1e-3 * (1 - 1e-4));
  EXPECT_LE(dt.max().item<double>(), 0.1 * (1 + 1e-4));
  // log-uniform: the median of log(dt) sits near the middle of [log 1e-3, log 0.1] = log 1e-2.
  EXPECT_NEAR(std::log(dt.median().item<double>()), std::log(1e-2), 1.0);
  EXPECT_TRUE(torch::equal(m->D.detach(), torch::ones({32})));
  EXPECT_TRUE(torch::equal(m->norm_weight.detach(), torch::ones({2048})));
  EXPECT_LE(m->conv1d->weight.detach().abs().max().item<double>(), 0.5);
  EXPECT_LE(m->conv1d->bias.detach().abs().max().item<double>(), 0.5);
  EXPECT_GT(m->conv1d->weight.detach().abs().max().item<double>(), 0.45);
}

// An independent composition of seed-spec §4.2 in fp64 (conv done the mamba_ssm way: symmetric padding k-1,
// then keep the first T outputs), using the already-verified ssd_sequential for the scan.
torch::Tensor reference_forward(Mamba2MixerImpl& m, const torch::Tensor& u_in) {
  const auto dd = [](const torch::Tensor& t) { return t.detach().to(torch::kFloat64); };
  const auto& o = m.options;
  const int64_t Bn = u_in.size(0), T = u_in.size(1), di = m.d_inner(), nh = m.nheads(), P = o.headdim();
  const int64_t gn = o.ngroups() * o.d_state(), k = o.d_conv();
  const auto u = dd(u_in);
  const auto zxbcdt = torch::matmul(u, dd(m.in_proj->weight).t());
  const auto z = zxbcdt.narrow(-1, 0, di);
  auto xBC = zxbcdt.narrow(-1, di, di + 2 * gn).transpose(1, 2);
  xBC = F::conv1d(xBC, dd(m.conv1d->weight),
                  F::Conv1dFuncOptions().bias(dd(m.conv1d->bias)).padding(k - 1).groups(di + 2 * gn));
  xBC = torch::silu(xBC.narrow(-1, 0, T).transpose(1, 2));
  const auto dt = F::softplus(zxbcdt.narrow(-1, 2 * di + 2 * gn, nh) + dd(m.dt_bias));
  const auto x = xBC.narrow(-1, 0, di).reshape({Bn, T, nh, P});
  const auto B = xBC.narrow(-1, di, gn).reshape({Bn, T, o.ngroups(), o.d_state()});
  const auto C = xBC.narrow(-1, di + gn, gn).reshape({Bn, T, o.ngroups(), o.d_state()});
  auto y = std::get<0>(ssd_sequential(x, dt, -torch::exp(dd(m.A_log)), B, C));
  y = (y + x * dd(m.D).unsqueeze(-1)).reshape({Bn, T, di});
  const auto gated = y * torch::silu(z);
  const auto normed = gated / torch::sqrt(gated.pow(2).mean(-1, true) + 1e-5) * dd(m.norm_weight);
  return torch::matmul(normed, dd(m.out_proj->weight).t());
}

TEST(Mamba2Mixer, MatchesIndependentComposition) {
  torch::manual_seed(2);
  Mamba2Mixer m(small_options());
  randomise(*m);
  const auto u = torch::randn({2, 37, 32});
  torch::NoGradGuard ng;
  const auto ref = reference_forward(*m, u);
  EXPECT_LT(rel_err(m->forward(u), ref), 1e-5);
  m->options.use_chunked(false);
  EXPECT_LT(rel_err(m->forward(u), ref), 1e-5);
}

TEST(Mamba2Mixer, ChunkedAndSequentialPathsAgreeWithGradients) {
  torch::manual_seed(3);
  Mamba2Mixer m(small_options());
  randomise(*m);
  const auto u = torch::randn({2, 37, 32});
  const auto w = torch::randn({2, 37, 32});
  auto run = [&](bool chunked) {
    m->options.use_chunked(chunked);
    m->zero_grad();
    auto x = u.clone().requires_grad_(true);
    auto y = m->forward(x);
    (y * w).sum().backward();
    std::vector<torch::Tensor> gs{y.detach(), x.grad().clone()};
    for (const auto& p : m->parameters()) gs.push_back(p.grad().clone());
    return gs;
  };
  const auto a = run(true), b = run(false);
  const auto names = m->named_parameters().keys();
  double worst = 0.0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, rel_err(a[i], b[i]));
  std::cout << "[ error ] chunked vs sequential: output " << rel_err(a[0], b[0]) << ", worst grad/output " << worst
            << "\n";
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string what = i == 0 ? "output" : i == 1 ? "grad input" : "grad " + names[i - 2];
    EXPECT_GT(b[i].abs().sum().item<double>(), 0.0) << what;
    EXPECT_LT(rel_err(a[i], b[i]), 1e-4) << what;
  }
}

TEST(Mamba2Mixer, IsCausal) {
  torch::manual_seed(4);
  Mamba2Mixer m(small_options());
  const int64_t t0 = 20;
  const auto u = torch::randn({2, 37, 32});
  auto u2 = u.clone();
  u2.narrow(1, t0 + 1, 37 - t0 - 1).add_(torch::randn({2, 37 - t0 - 1, 32}));
  torch::NoGradGuard ng;
  for (bool chunked : {true, false}) {
    m->options.use_chunked(chunked);
    const auto y = m->forward(u), y2 = m->forward(u2);
    EXPECT_LT(testing::max_abs(y.narrow(1, 0, t0 + 1) - y2.narrow(1, 0, t0 + 1)), 1e-6) << chunked;
    EXPECT_GT(testing::max_abs(y.narrow(1, t0 + 1, 1) - y2.narrow(1, t0 + 1, 1)), 1e-3) << chunked;
  }
}

// bf16 parameters and inputs: finite, bf16 out, and close to the fp32 mixer with the same (bf16-rounded) values.
TEST(Mamba2Mixer, Bf16Works) {
  torch::manual_seed(5);
  Mamba2Mixer m32(small_options());
  randomise(*m32);
  m32->to(torch::kBFloat16);
  m32->to(torch::kFloat32);  // parameters now exactly representable in bf16
  auto m16 = std::dynamic_pointer_cast<Mamba2MixerImpl>(m32->clone());
  m16->to(torch::kBFloat16);
  const auto u = torch::randn({2, 37, 32}).to(torch::kBFloat16);
  torch::NoGradGuard ng;
  const auto y16 = m16->forward(u);
  const auto y32 = m32->forward(u.to(torch::kFloat32));
  EXPECT_EQ(y16.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::isfinite(y16).all().item<bool>());
  const double err = rel_err(y16, y32);
  EXPECT_LT(err, 2e-2) << err;
  std::cout << "[ bf16 ] Mamba2Mixer rel err vs fp32: " << err << "\n";
}

TEST(Mamba2Mixer, BadConfigurationsAndInputsAreRejected) {
  EXPECT_THROW(Mamba2Mixer(Mamba2MixerOptions(32).headdim(48)), c10::Error);            // di 64 % 48
  EXPECT_THROW(Mamba2Mixer(Mamba2MixerOptions(32).headdim(8).ngroups(3)), c10::Error);  // 8 heads % 3
  Mamba2Mixer m(small_options());
  EXPECT_THROW(m->forward(torch::randn({2, 5, 31})), c10::Error);
  EXPECT_THROW(m->forward(torch::randn({5, 32})), c10::Error);
}

}  // namespace
}  // namespace ablate::core
