// GatedDeltaNetMixer: parameter count vs seed-spec §1.5, initialisation, wiring against an independent
// composition, chunked vs sequential path, causality, bf16.
#include "core/mixers/gated_deltanet.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/mixers/delta_rule.h"
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

// d 32, head_dim 8 -> 4 heads, dk 32, dv 64 (head_v_dim 16); chunk 16 so T = 37 spans 3 chunks.
GatedDeltaNetMixerOptions small_options() { return GatedDeltaNetMixerOptions(32).head_dim(8).chunk_size(16); }

void randomise(GatedDeltaNetMixerImpl& m) {
  torch::NoGradGuard ng;
  m.o_norm_weight.uniform_(0.5, 1.5);
}

TEST(GatedDeltaNetMixer, ParameterCountMatchesSeedSpecRecipe) {
  // seed-spec §1.5: 2·d·dk + 2·d·dv + 2·d·h + 2h + 4·(2dk + dv) + hv + dv·d with h = d/64, dk = d, dv = 2d,
  // hv = 128 (head_v_dim). Terms: q_proj + k_proj; v_proj + g_proj (output gate); a_proj + b_proj; A_log +
  // dt_bias; q/k/v short-conv weights (kernel 4, no bias); the output RMSNorm weight (one (head_v_dim) vector
  // shared by all heads, as fla's FusedRMSNormGated(head_v_dim)); o_proj. At d = 1024:
  // 2,097,152 + 4,194,304 + 32,768 + 32 + 16,384 + 128 + 2,097,152 = 8,437,920.
  GatedDeltaNetMixer m1024(GatedDeltaNetMixerOptions(1024));
  EXPECT_EQ(count_parameters(*m1024), 8'437'920);
  EXPECT_EQ(GatedDeltaNetMixerImpl::expected_num_parameters(m1024->options), 8'437'920);
  GatedDeltaNetMixer m2048(GatedDeltaNetMixerOptions(2048));
  EXPECT_EQ(count_parameters(*m2048), 33'718'464);
  // Small layer, and the same without short convs (4·(2·32 + 64) = 512 fewer).
  // 2·32·32 + 2·32·64 + 2·32·4 + 8 + 512 + 16 + 64·32 = 2048 + 4096 + 256 + 8 + 512 + 16 + 2048.
  GatedDeltaNetMixer small(small_options());
  EXPECT_EQ(count_parameters(*small), 8'984);
  GatedDeltaNetMixer no_conv(small_options().use_short_conv(false));
  EXPECT_EQ(count_parameters(*no_conv), 8'984 - 512);
  EXPECT_EQ(GatedDeltaNetMixerImpl::expected_num_parameters(small_options().use_short_conv(false)), 8'984 - 512);
}

TEST(GatedDeltaNetMixer, ParameterNamesAndShapes) {
  GatedDeltaNetMixer m(small_options());
  const auto p = m->named_parameters();
  EXPECT_EQ(p.size(), 13u);
  EXPECT_EQ(p["q_proj.weight"].sizes(), torch::IntArrayRef({32, 32}));
  EXPECT_EQ(p["k_proj.weight"].sizes(), torch::IntArrayRef({32, 32}));
  EXPECT_EQ(p["v_proj.weight"].sizes(), torch::IntArrayRef({64, 32}));
  EXPECT_EQ(p["g_proj.weight"].sizes(), torch::IntArrayRef({64, 32}));
  EXPECT_EQ(p["a_proj.weight"].sizes(), torch::IntArrayRef({4, 32}));
  EXPECT_EQ(p["b_proj.weight"].sizes(), torch::IntArrayRef({4, 32}));
  EXPECT_EQ(p["o_proj.weight"].sizes(), torch::IntArrayRef({32, 64}));
  EXPECT_EQ(p["q_conv1d.weight"].sizes(), torch::IntArrayRef({32, 1, 4}));
  EXPECT_EQ(p["k_conv1d.weight"].sizes(), torch::IntArrayRef({32, 1, 4}));
  EXPECT_EQ(p["v_conv1d.weight"].sizes(), torch::IntArrayRef({64, 1, 4}));
  EXPECT_EQ(p["A_log"].sizes(), torch::IntArrayRef({4}));
  EXPECT_EQ(p["dt_bias"].sizes(), torch::IntArrayRef({4}));
  EXPECT_EQ(p["o_norm_weight"].sizes(), torch::IntArrayRef({16}));
}

// seed-spec §5: A = exp(A_log) ~ U(0,16) (finite log), softplus(dt_bias) ~ logU[1e-3, 0.1], norm weight = 1.
TEST(GatedDeltaNetMixer, InitialisationFollowsFla) {
  torch::manual_seed(1);
  GatedDeltaNetMixer m(GatedDeltaNetMixerOptions(64).head_dim(8).num_heads(64));  // 64 heads, small projections
  const auto A = torch::exp(m->A_log.detach());
  EXPECT_TRUE(torch::isfinite(m->A_log.detach()).all().item<bool>());
  EXPECT_GT(A.min().item<double>(), 0.0);
  EXPECT_LT(A.min().item<double>(), 2.0);  // U(0,16), not U(1,16) as in Mamba2 (P(min of 64 >= 2) ~ 2e-4)
  EXPECT_LE(A.max().item<double>(), 16.0 + 1e-4);
  const auto dt = F::softplus(m->dt_bias.detach());
  EXPECT_GE(dt.min().item<double>(), 1e-3 * (1 - 1e-4));
  EXPECT_LE(dt.max().item<double>(), 0.1 * (1 + 1e-4));
  EXPECT_NEAR(std::log(dt.median().item<double>()), std::log(1e-2), 1.0);
  EXPECT_TRUE(torch::equal(m->o_norm_weight.detach(), torch::ones({16})));
  EXPECT_FALSE(m->q_conv1d->bias.defined());
}

// An independent composition of seed-spec §5 in fp64 (convs via F::conv1d with symmetric padding, cropped),
// using the already-verified gated_delta_rule_sequential for the recurrence.
torch::Tensor reference_forward(GatedDeltaNetMixerImpl& m, const torch::Tensor& x_in) {
  const auto dd = [](const torch::Tensor& t) { return t.detach().to(torch::kFloat64); };
  const auto& o = m.options;
  const int64_t Bn = x_in.size(0), T = x_in.size(1), h = m.num_heads(), K = o.head_dim(), Vh = m.head_v_dim();
  const auto x = dd(x_in);
  auto lin = [&](torch::nn::Linear& l) { return torch::matmul(x, dd(l->weight).t()); };
  auto conv = [&](const torch::Tensor& t, ShortConv& c) {
    const int64_t ch = t.size(-1), k = c->options.kernel_size();
    auto y = F::conv1d(t.transpose(1, 2), dd(c->weight), F::Conv1dFuncOptions().padding(k - 1).groups(ch));
    return torch::silu(y.narrow(-1, 0, T).transpose(1, 2));
  };
  auto l2 = [](const torch::Tensor& t) { return t / torch::sqrt(t.pow(2).sum(-1, true) + 1e-6); };
  const auto q = l2(conv(lin(m.q_proj), m.q_conv1d).reshape({Bn, T, h, K}));
  const auto k = l2(conv(lin(m.k_proj), m.k_conv1d).reshape({Bn, T, h, K}));
  const auto v = conv(lin(m.v_proj), m.v_conv1d).reshape({Bn, T, h, Vh});
  const auto beta = torch::sigmoid(lin(m.b_proj));
  const auto g = -torch::exp(dd(m.A_log)) * F::softplus(lin(m.a_proj) + dd(m.dt_bias));
  auto out = std::get<0>(gated_delta_rule_sequential(q, k, v, g, beta, 1.0 / std::sqrt(double(K))));
  const auto gate = lin(m.g_proj).reshape({Bn, T, h, Vh});
  out = out / torch::sqrt(out.pow(2).mean(-1, true) + 1e-6) * dd(m.o_norm_weight) * torch::silu(gate);
  return torch::matmul(out.reshape({Bn, T, h * Vh}), dd(m.o_proj->weight).t());
}

TEST(GatedDeltaNetMixer, MatchesIndependentComposition) {
  torch::manual_seed(2);
  GatedDeltaNetMixer m(small_options());
  randomise(*m);
  const auto x = torch::randn({2, 37, 32});
  torch::NoGradGuard ng;
  const auto ref = reference_forward(*m, x);
  EXPECT_LT(rel_err(m->forward(x), ref), 1e-5);
  m->options.use_chunked(false);
  EXPECT_LT(rel_err(m->forward(x), ref), 1e-5);
}

TEST(GatedDeltaNetMixer, ChunkedAndSequentialPathsAgreeWithGradients) {
  torch::manual_seed(3);
  for (bool short_conv : {true, false}) {
    GatedDeltaNetMixer m(small_options().use_short_conv(short_conv));
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
      EXPECT_LT(rel_err(a[i], b[i]), 1e-4) << what << " short_conv " << short_conv;
    }
  }
}

TEST(GatedDeltaNetMixer, IsCausal) {
  torch::manual_seed(4);
  GatedDeltaNetMixer m(small_options());
  const int64_t t0 = 20;
  const auto x = torch::randn({2, 37, 32});
  auto x2 = x.clone();
  x2.narrow(1, t0 + 1, 37 - t0 - 1).add_(torch::randn({2, 37 - t0 - 1, 32}));
  torch::NoGradGuard ng;
  for (bool chunked : {true, false}) {
    m->options.use_chunked(chunked);
    const auto y = m->forward(x), y2 = m->forward(x2);
    EXPECT_LT(testing::max_abs(y.narrow(1, 0, t0 + 1) - y2.narrow(1, 0, t0 + 1)), 1e-6) << chunked;
    EXPECT_GT(testing::max_abs(y.narrow(1, t0 + 1, 1) - y2.narrow(1, t0 + 1, 1)), 1e-3) << chunked;
  }
}

TEST(GatedDeltaNetMixer, Bf16Works) {
  torch::manual_seed(5);
  GatedDeltaNetMixer m32(small_options());
  randomise(*m32);
  m32->to(torch::kBFloat16);
  m32->to(torch::kFloat32);  // parameters now exactly representable in bf16
  auto m16 = std::dynamic_pointer_cast<GatedDeltaNetMixerImpl>(m32->clone());
  m16->to(torch::kBFloat16);
  const auto x = torch::randn({2, 37, 32}).to(torch::kBFloat16);
  torch::NoGradGuard ng;
  const auto y16 = m16->forward(x);
  const auto y32 = m32->forward(x.to(torch::kFloat32));
  EXPECT_EQ(y16.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::isfinite(y16).all().item<bool>());
  const double err = rel_err(y16, y32);
  EXPECT_LT(err, 2e-2) << err;
  std::cout << "[ bf16 ] GatedDeltaNetMixer rel err vs fp32: " << err << "\n";
}

TEST(GatedDeltaNetMixer, BadConfigurationsAndInputsAreRejected) {
  EXPECT_THROW(GatedDeltaNetMixer(GatedDeltaNetMixerOptions(100)), c10::Error);  // 100 % 64
  GatedDeltaNetMixer m(small_options());
  EXPECT_THROW(m->forward(torch::randn({2, 5, 31})), c10::Error);
  EXPECT_THROW(m->forward(torch::randn({5, 32})), c10::Error);
}

}  // namespace
}  // namespace ablate::core
