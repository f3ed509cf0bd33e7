// Gated delta rule: chunked (WY/UT transform) vs the per-step recurrence, hand-computed cases, fp64
// finite-difference gradients, strong decays, and shape errors.
#include "core/mixers/delta_rule.h"

#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::gradcheck;
using testing::grads_of;
using testing::rel_err;
using testing::weighted_sum;
namespace F = torch::nn::functional;

struct DeltaCase {
  int64_t b, t, h, dk, dv, chunk;
  bool init;
};

std::ostream& operator<<(std::ostream& os, const DeltaCase& c) {
  return os << "B" << c.b << "_T" << c.t << "_H" << c.h << "_K" << c.dk << "_V" << c.dv << "_chunk" << c.chunk
            << (c.init ? "_init" : "");
}

torch::Tensor l2n(const torch::Tensor& x) { return F::normalize(x, F::NormalizeFuncOptions().dim(-1)); }

// q, k (unit norm, as the mixer passes them), v, g (log-decay, mean about -0.1), beta in (0,1), initial state.
std::vector<torch::Tensor> make_inputs(const DeltaCase& c, torch::ScalarType dtype = torch::kFloat32,
                                       uint64_t seed = 0) {
  torch::manual_seed(seed);
  auto o = torch::TensorOptions().dtype(dtype);
  return {l2n(torch::randn({c.b, c.t, c.h, c.dk}, o)),
          l2n(torch::randn({c.b, c.t, c.h, c.dk}, o)),
          torch::randn({c.b, c.t, c.h, c.dv}, o),
          -F::softplus(torch::randn({c.b, c.t, c.h}, o) - 2.0),
          torch::sigmoid(torch::randn({c.b, c.t, c.h}, o)),
          c.init ? torch::randn({c.b, c.h, c.dk, c.dv}, o) : torch::Tensor()};
}

testing::ScalarFn loss_fn(bool chunked, int64_t chunk, const torch::Tensor& wo, const torch::Tensor& ws,
                          double scale = -1.0) {
  return [=](const std::vector<torch::Tensor>& in) {
    auto [o, s] = chunked ? gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], chunk, scale, in[5])
                          : gated_delta_rule_sequential(in[0], in[1], in[2], in[3], in[4], scale, in[5]);
    return weighted_sum(o, wo) + weighted_sum(s, ws);
  };
}

class DeltaChunkedVsSequential : public ::testing::TestWithParam<DeltaCase> {};

TEST_P(DeltaChunkedVsSequential, OutputsStatesAndGradientsAgree) {
  const auto c = GetParam();
  const auto in = make_inputs(c);
  auto [o_c, s_c] = gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], c.chunk, -1.0, in[5]);
  auto [o_s, s_s] = gated_delta_rule_sequential(in[0], in[1], in[2], in[3], in[4], -1.0, in[5]);
  ASSERT_EQ(o_c.sizes(), in[2].sizes());
  ASSERT_EQ(s_c.sizes(), torch::IntArrayRef({c.b, c.h, c.dk, c.dv}));
  EXPECT_LT(rel_err(o_c, o_s), 1e-4);
  EXPECT_LT(rel_err(s_c, s_s), 1e-4);
  double worst_grad = 0.0;

  const auto wo = torch::randn_like(o_s), ws = torch::randn_like(s_s);
  const auto g_c = grads_of(loss_fn(true, c.chunk, wo, ws), in);
  const auto g_s = grads_of(loss_fn(false, c.chunk, wo, ws), in);
  const char* names[] = {"q", "k", "v", "g", "beta", "initial_state"};
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i].defined()) continue;
    EXPECT_GT(g_s[i].abs().sum().item<double>(), 0.0) << names[i];
    EXPECT_LT(rel_err(g_c[i], g_s[i]), 1e-4) << "grad wrt " << names[i];
    worst_grad = std::max(worst_grad, rel_err(g_c[i], g_s[i]));
  }
  std::cout << "[ error ] " << c << ": rel err o " << rel_err(o_c, o_s) << ", state " << rel_err(s_c, s_s)
            << ", worst grad " << worst_grad << "\n";
}

INSTANTIATE_TEST_SUITE_P(Shapes, DeltaChunkedVsSequential,
                         ::testing::Values(DeltaCase{2, 37, 3, 8, 6, 16, false},  // T not a multiple of the chunk
                                           DeltaCase{2, 37, 3, 8, 6, 16, true},   // ... with an initial state
                                           DeltaCase{1, 64, 2, 8, 8, 16, true},   // exact multiple, 4 chunks
                                           DeltaCase{2, 5, 2, 4, 4, 16, false},   // T < chunk
                                           DeltaCase{1, 10, 1, 16, 4, 64, true},  // default chunk 64 > T, K > T
                                           DeltaCase{1, 1, 2, 4, 3, 4, true},     // T = 1 (with a state, so g matters)
                                           DeltaCase{1, 7, 2, 3, 2, 1, true}),    // chunk 1
                         [](const auto& info) {
                           std::ostringstream os;
                           os << info.param;
                           return os.str();
                         });

// K = V = H = 1, two steps, written out from the recurrence: S'=a S; u = b (v - S' k); S = S' + k u; o = S q s.
TEST(DeltaRule, HandComputedScalarCase) {
  const double q1 = 0.3, q2 = -0.8, k1 = 0.9, k2 = 0.6, v1 = 1.5, v2 = -0.4, g1 = -0.2, g2 = -0.7, b1 = 0.6, b2 = 0.3;
  const double s0 = 0.25, scale = 0.5;
  const auto o = torch::TensorOptions().dtype(torch::kFloat64);
  auto seq = [&](double a, double b) { return torch::tensor({a, b}, o).reshape({1, 2, 1}); };
  const auto q = seq(q1, q2).unsqueeze(-1), k = seq(k1, k2).unsqueeze(-1), v = seq(v1, v2).unsqueeze(-1);
  const auto g = seq(g1, g2), beta = seq(b1, b2);
  const auto init = torch::tensor({s0}, o).reshape({1, 1, 1, 1});
  double S = std::exp(g1) * s0;
  S = S + k1 * (b1 * (v1 - S * k1));
  const double o1 = S * q1 * scale;
  S = std::exp(g2) * S;
  S = S + k2 * (b2 * (v2 - S * k2));
  const double o2 = S * q2 * scale;
  for (int64_t chunk : {0, 1, 2, 4}) {  // 0: sequential
    auto [out, st] = chunk == 0 ? gated_delta_rule_sequential(q, k, v, g, beta, scale, init)
                                : gated_delta_rule_chunked(q, k, v, g, beta, chunk, scale, init);
    EXPECT_NEAR(out[0][0][0][0].item<double>(), o1, 1e-12) << "chunk " << chunk;
    EXPECT_NEAR(out[0][1][0][0].item<double>(), o2, 1e-12) << "chunk " << chunk;
    EXPECT_NEAR(st.item<double>(), S, 1e-12) << "chunk " << chunk;
  }
}

// One step in matrix form pins the (B,H,K,V) state layout and the delta-rule update
// S_1 = alpha (I - beta k k^T) S_0 + beta k v^T, o = S_1^T q / sqrt(K) (default scale).
TEST(DeltaRule, OneStepMatchesClosedForm) {
  const DeltaCase c{1, 1, 2, 3, 2, 4, true};
  const auto in = make_inputs(c, torch::kFloat64, 5);
  for (int64_t chunk : {0, 4}) {
    auto [o, s] = chunk == 0 ? gated_delta_rule_sequential(in[0], in[1], in[2], in[3], in[4], -1.0, in[5])
                             : gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], chunk, -1.0, in[5]);
    for (int64_t h = 0; h < c.h; ++h) {
      const auto q = in[0][0][0][h], k = in[1][0][0][h], v = in[2][0][0][h];
      const auto alpha = torch::exp(in[3][0][0][h]), beta = in[4][0][0][h];
      const auto eye = torch::eye(c.dk, torch::kFloat64);
      const auto S1 = alpha * torch::matmul(eye - beta * torch::outer(k, k), in[5][0][h]) + beta * torch::outer(k, v);
      EXPECT_LT(rel_err(s[0][h], S1), 1e-12) << "head " << h << " chunk " << chunk;
      EXPECT_LT(rel_err(o[0][0][h], torch::matmul(S1.t(), q) / std::sqrt(3.0)), 1e-12) << "head " << h;
    }
  }
}

TEST(DeltaRule, ExplicitScaleIsUsed) {
  const DeltaCase c{1, 9, 2, 4, 3, 4, false};
  const auto in = make_inputs(c);
  auto [o_def, s1] = gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], 4);
  auto [o_half, s2] = gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], 4, 0.5);  // = 1/sqrt(4)
  auto [o_one, s3] = gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], 4, 1.0);
  EXPECT_LT(rel_err(o_def, o_half), 1e-7);
  EXPECT_LT(rel_err(o_one, 2.0 * o_half), 1e-6);  // o is linear in q
  EXPECT_LT(rel_err(s3, s1), 1e-7);               // the state does not depend on q
}

TEST(DeltaRule, GradcheckFp64) {
  for (const auto& c : {DeltaCase{1, 7, 2, 3, 2, 3, true}, DeltaCase{2, 5, 1, 2, 3, 8, false}}) {
    const auto in = make_inputs(c, torch::kFloat64, 13);
    auto [o, s] = gated_delta_rule_sequential(in[0], in[1], in[2], in[3], in[4], -1.0, in[5]);
    const auto wo = torch::randn_like(o), ws = torch::randn_like(s);
    for (bool chunked : {true, false}) {
      const auto rep = gradcheck(loss_fn(chunked, c.chunk, wo, ws), in);
      EXPECT_TRUE(rep.ok) << c << (chunked ? " chunked: " : " sequential: ") << rep.first_failure;
      EXPECT_LT(rep.max_abs_err, 1e-6) << c;
      std::cout << "[ error ] gradcheck " << c << (chunked ? " chunked" : " sequential")
                << ": max |autograd - finite diff| " << rep.max_abs_err << "\n";
    }
  }
}

// Log-decays down to -200 per step (cumsums near -6000 in a chunk): exp of cumsum differences taken the other way
// round overflows; the segment-sum mask must keep everything finite and exact.
TEST(DeltaRule, StrongDecaysStayFiniteAndExact) {
  const DeltaCase c{1, 40, 2, 8, 4, 16, true};
  auto in = make_inputs(c);
  in[3] = -200.0 * torch::rand({c.b, c.t, c.h});
  auto [o_c, s_c] = gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], c.chunk, -1.0, in[5]);
  auto [o_s, s_s] = gated_delta_rule_sequential(in[0], in[1], in[2], in[3], in[4], -1.0, in[5]);
  ASSERT_TRUE(torch::isfinite(o_c).all().item<bool>());
  EXPECT_LT(rel_err(o_c, o_s), 1e-4);
  EXPECT_LT(rel_err(s_c, s_s), 1e-4);
  const auto wo = torch::randn_like(o_s), ws = torch::randn_like(s_s);
  const auto g_c = grads_of(loss_fn(true, c.chunk, wo, ws), in);
  const auto g_s = grads_of(loss_fn(false, c.chunk, wo, ws), in);
  for (size_t i = 0; i < in.size(); ++i) {
    ASSERT_TRUE(torch::isfinite(g_c[i]).all().item<bool>()) << "grad " << i;
    EXPECT_LT(rel_err(g_c[i], g_s[i]), 1e-4) << "grad " << i;
  }
}

// bf16 inputs: GEMM operands in bf16 with fp32 accumulation (half_gemms.h), decays, solve and state scan in fp32 —
// what training does under autocast and what fla's kernels do. Within bf16-level error of the fp64 recurrence, and
// measurably different from the all-fp32 run (which would mean the GEMMs silently ran in fp32).
TEST(DeltaRule, Bf16InputsUseBf16Gemms) {
  const DeltaCase c{2, 37, 3, 8, 6, 16, true};
  auto in = make_inputs(c, torch::kBFloat16);
  std::vector<torch::Tensor> in32, in64;
  for (const auto& t : in) in32.push_back(t.to(torch::kFloat32));
  for (const auto& t : in) in64.push_back(t.to(torch::kFloat64));
  auto [o16, s16] = gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], c.chunk, -1.0, in[5]);
  auto [o32, s32] = gated_delta_rule_chunked(in32[0], in32[1], in32[2], in32[3], in32[4], c.chunk, -1.0, in32[5]);
  auto [o64, s64] = gated_delta_rule_sequential(in64[0], in64[1], in64[2], in64[3], in64[4], -1.0, in64[5]);
  EXPECT_EQ(o16.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(s16.scalar_type(), torch::kFloat32);
  EXPECT_LT(rel_err(o16, o64), 1e-2);
  EXPECT_LT(rel_err(s16, s64), 1e-2);
  EXPECT_GT(rel_err(s16, s32), 1e-5) << "bf16 inputs ran their GEMMs in fp32";
  EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU)) << "the call left autocast on";
}

TEST(DeltaRule, BadShapesAreRejected) {
  const DeltaCase c{1, 8, 2, 4, 3, 4, true};
  const auto in = make_inputs(c);
  auto call = [&](int which, const torch::Tensor& t) {
    auto a = in;
    a[which] = t;
    return gated_delta_rule_chunked(a[0], a[1], a[2], a[3], a[4], 4, -1.0, a[5]);
  };
  EXPECT_THROW(call(0, in[0].select(0, 0)), c10::Error);     // q not 4-D
  EXPECT_THROW(call(1, in[1].narrow(3, 0, 3)), c10::Error);  // k head dim != q's
  EXPECT_THROW(call(2, in[2].narrow(1, 0, 7)), c10::Error);  // v length
  EXPECT_THROW(call(3, in[3].unsqueeze(-1)), c10::Error);    // g not (B,T,H)
  EXPECT_THROW(call(4, in[4].narrow(2, 0, 1)), c10::Error);  // beta heads
  EXPECT_THROW(call(5, in[5].transpose(2, 3)), c10::Error);  // state (B,H,V,K)
  EXPECT_THROW(gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], 0), c10::Error);
}

}  // namespace
}  // namespace ablate::core
