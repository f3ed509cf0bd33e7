// SSD (Mamba2 scan): chunked algorithm vs the per-step recurrence, hand-computed cases, fp64 finite-difference
// gradients, numerically hostile decays, and shape errors.
#include "core/mixers/ssd.h"

#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <limits>

#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::gradcheck;
using testing::grads_of;
using testing::rel_err;
using testing::weighted_sum;
namespace F = torch::nn::functional;

struct SsdCase {
  int64_t b, t, h, g, p, n, chunk;
  bool init;
};

std::ostream& operator<<(std::ostream& os, const SsdCase& c) {
  return os << "B" << c.b << "_T" << c.t << "_H" << c.h << "_G" << c.g << "_P" << c.p << "_N" << c.n << "_chunk"
            << c.chunk << (c.init ? "_init" : "");
}

// x, dt, A, B, C, initial_state (undefined when !init). dt*|A| ~ 0.02..0.5 per step, so decays matter both inside a
// chunk and across chunks.
std::vector<torch::Tensor> make_inputs(const SsdCase& c, torch::ScalarType dtype = torch::kFloat32, uint64_t seed = 0) {
  torch::manual_seed(seed);
  auto o = torch::TensorOptions().dtype(dtype);
  return {
      torch::randn({c.b, c.t, c.h, c.p}, o),       F::softplus(torch::randn({c.b, c.t, c.h}, o) - 2.5),
      -(0.5 + 3.5 * torch::rand({c.h}, o)),        0.5 * torch::randn({c.b, c.t, c.g, c.n}, o),
      0.5 * torch::randn({c.b, c.t, c.g, c.n}, o), c.init ? torch::randn({c.b, c.h, c.p, c.n}, o) : torch::Tensor()};
}

// Scalar loss over y and the final state, with fixed random weights.
testing::ScalarFn loss_fn(bool chunked, int64_t chunk, const torch::Tensor& wy, const torch::Tensor& ws) {
  return [=](const std::vector<torch::Tensor>& in) {
    auto [y, s] = chunked ? ssd_chunked(in[0], in[1], in[2], in[3], in[4], chunk, in[5])
                          : ssd_sequential(in[0], in[1], in[2], in[3], in[4], in[5]);
    return weighted_sum(y, wy) + weighted_sum(s, ws);
  };
}

class SsdChunkedVsSequential : public ::testing::TestWithParam<SsdCase> {};

TEST_P(SsdChunkedVsSequential, OutputsStatesAndGradientsAgree) {
  const auto c = GetParam();
  const auto in = make_inputs(c);
  auto [y_c, s_c] = ssd_chunked(in[0], in[1], in[2], in[3], in[4], c.chunk, in[5]);
  auto [y_s, s_s] = ssd_sequential(in[0], in[1], in[2], in[3], in[4], in[5]);
  ASSERT_EQ(y_c.sizes(), in[0].sizes());
  ASSERT_EQ(s_c.sizes(), torch::IntArrayRef({c.b, c.h, c.p, c.n}));
  EXPECT_LT(rel_err(y_c, y_s), 1e-4);
  EXPECT_LT(rel_err(s_c, s_s), 1e-4);
  double worst_grad = 0.0;

  const auto wy = torch::randn_like(y_s), ws = torch::randn_like(s_s);
  const auto g_c = grads_of(loss_fn(true, c.chunk, wy, ws), in);
  const auto g_s = grads_of(loss_fn(false, c.chunk, wy, ws), in);
  const char* names[] = {"x", "dt", "A", "B", "C", "initial_state"};
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i].defined()) continue;
    EXPECT_GT(g_s[i].abs().sum().item<double>(), 0.0) << names[i];
    EXPECT_LT(rel_err(g_c[i], g_s[i]), 1e-4) << "grad wrt " << names[i];
    worst_grad = std::max(worst_grad, rel_err(g_c[i], g_s[i]));
  }
  std::cout << "[ error ] " << c << ": rel err y " << rel_err(y_c, y_s) << ", state " << rel_err(s_c, s_s)
            << ", worst grad " << worst_grad << "\n";
}

INSTANTIATE_TEST_SUITE_P(Shapes, SsdChunkedVsSequential,
                         ::testing::Values(SsdCase{2, 37, 4, 2, 8, 6, 16, false},  // T not a multiple of the chunk
                                           SsdCase{2, 37, 4, 2, 8, 6, 16, true},   // ... with an initial state
                                           SsdCase{1, 64, 4, 1, 4, 4, 16, true},   // exact multiple, 4 chunks
                                           SsdCase{2, 5, 3, 3, 4, 4, 16, true},    // T < chunk, one head/group
                                           SsdCase{1, 1, 2, 1, 2, 2, 4, true},     // T = 1 (with a state, so A matters)
                                           SsdCase{1, 7, 2, 1, 3, 2, 1, true}),    // chunk 1
                         [](const auto& info) {
                           std::ostringstream os;
                           os << info.param;
                           return os.str();
                         });

// Pins the recurrence's conventions with scalars (H = P = N = 1): y_t reads S_t (after this step's input),
// and the decay of step t uses dt_t.
TEST(Ssd, HandComputedScalarCase) {
  const double x1 = 0.7, x2 = -1.3, d1 = 0.4, d2 = 0.9, a = -1.5, b1 = 0.8, b2 = -0.6, c1 = 1.1, c2 = 0.5;
  const auto o = torch::TensorOptions().dtype(torch::kFloat64);
  const auto x = torch::tensor({x1, x2}, o).reshape({1, 2, 1, 1});
  const auto dt = torch::tensor({d1, d2}, o).reshape({1, 2, 1});
  const auto A = torch::tensor({a}, o);
  const auto B = torch::tensor({b1, b2}, o).reshape({1, 2, 1, 1});
  const auto C = torch::tensor({c1, c2}, o).reshape({1, 2, 1, 1});
  const double s1 = d1 * b1 * x1;
  const double s2 = std::exp(d2 * a) * s1 + d2 * b2 * x2;
  const double y1 = c1 * s1, y2 = c2 * s2;
  for (int64_t chunk : {0, 1, 2, 4}) {  // 0: sequential
    auto [y, s] = chunk == 0 ? ssd_sequential(x, dt, A, B, C) : ssd_chunked(x, dt, A, B, C, chunk);
    EXPECT_NEAR(y[0][0][0][0].item<double>(), y1, 1e-12) << "chunk " << chunk;
    EXPECT_NEAR(y[0][1][0][0].item<double>(), y2, 1e-12) << "chunk " << chunk;
    EXPECT_NEAR(s.item<double>(), s2, 1e-12) << "chunk " << chunk;
  }
}

// Pins the state layout (B,H,P,N) and the head -> group mapping (head h reads group h / (H/G)) after one step:
// S = dt x B^T, y_h = dt_h x_h (B_g · C_g).
TEST(Ssd, StateLayoutAndGroupMapping) {
  const SsdCase c{1, 1, 4, 2, 3, 5, 4, false};
  const auto in = make_inputs(c, torch::kFloat64, 3);
  for (int64_t chunk : {0, 4}) {
    auto [y, s] = chunk == 0 ? ssd_sequential(in[0], in[1], in[2], in[3], in[4])
                             : ssd_chunked(in[0], in[1], in[2], in[3], in[4], chunk);
    for (int64_t h = 0; h < c.h; ++h) {
      const int64_t g = h / (c.h / c.g);
      const auto xb = in[0][0][0][h] * in[1][0][0][h];                   // (P)
      const auto want_s = torch::outer(xb, in[3][0][0][g]);              // (P,N)
      const auto want_y = xb * (in[3][0][0][g] * in[4][0][0][g]).sum();  // (P)
      EXPECT_LT(rel_err(s[0][h], want_s), 1e-12) << "head " << h << " chunk " << chunk;
      EXPECT_LT(rel_err(y[0][0][h], want_y), 1e-12) << "head " << h << " chunk " << chunk;
    }
  }
}

TEST(Ssd, SegmentSumIsExactAndMaskedAboveTheDiagonal) {
  const auto ss = segment_sum(torch::tensor({1.0, 2.0, 3.0, 4.0}, torch::kFloat64));
  const double inf = std::numeric_limits<double>::infinity();
  const auto want = torch::tensor(
      {{0.0, -inf, -inf, -inf}, {2.0, 0.0, -inf, -inf}, {5.0, 3.0, 0.0, -inf}, {9.0, 7.0, 4.0, 0.0}}, torch::kFloat64);
  EXPECT_TRUE(torch::equal(ss, want)) << ss;
}

// fp64 autograd gradients of the chunked op (and of the reference) against central finite differences.
TEST(Ssd, GradcheckFp64) {
  for (const auto& c : {SsdCase{1, 7, 2, 1, 3, 2, 3, true}, SsdCase{2, 5, 4, 2, 2, 3, 8, false}}) {
    const auto in = make_inputs(c, torch::kFloat64, 11);
    auto [y, s] = ssd_sequential(in[0], in[1], in[2], in[3], in[4], in[5]);
    const auto wy = torch::randn_like(y), ws = torch::randn_like(s);
    for (bool chunked : {true, false}) {
      const auto rep = gradcheck(loss_fn(chunked, c.chunk, wy, ws), in);
      EXPECT_TRUE(rep.ok) << c << (chunked ? " chunked: " : " sequential: ") << rep.first_failure;
      EXPECT_LT(rep.max_abs_err, 1e-6) << c;
      std::cout << "[ error ] gradcheck " << c << (chunked ? " chunked" : " sequential")
                << ": max |autograd - finite diff| " << rep.max_abs_err << "\n";
    }
  }
}

// Decays of up to exp(-300) per step: cumsums reach -5000 inside a chunk. A formulation that exponentiates
// cumsums separately (exp(cs_l) * exp(-cs_s)) overflows to inf*0 = NaN here; the segment sum must not.
TEST(Ssd, StrongDecaysStayFiniteAndExact) {
  const SsdCase c{1, 40, 2, 1, 4, 4, 16, true};
  auto in = make_inputs(c);
  in[1] = 1.0 + 4.0 * torch::rand({c.b, c.t, c.h});  // dt in [1, 5]
  in[2] = -torch::tensor({20.0f, 60.0f});
  auto [y_c, s_c] = ssd_chunked(in[0], in[1], in[2], in[3], in[4], c.chunk, in[5]);
  auto [y_s, s_s] = ssd_sequential(in[0], in[1], in[2], in[3], in[4], in[5]);
  ASSERT_TRUE(torch::isfinite(y_c).all().item<bool>());
  EXPECT_LT(rel_err(y_c, y_s), 1e-4);
  EXPECT_LT(rel_err(s_c, s_s), 1e-4);
  const auto wy = torch::randn_like(y_s), ws = torch::randn_like(s_s);
  const auto g_c = grads_of(loss_fn(true, c.chunk, wy, ws), in);
  const auto g_s = grads_of(loss_fn(false, c.chunk, wy, ws), in);
  for (size_t i = 0; i < in.size(); ++i) {
    ASSERT_TRUE(torch::isfinite(g_c[i]).all().item<bool>()) << "grad " << i;
    EXPECT_LT(rel_err(g_c[i], g_s[i]), 1e-4) << "grad " << i;
  }
}

// bf16 inputs: GEMM operands in bf16 with fp32 accumulation (half_gemms.h), decays and elementwise math in fp32 —
// what training does under autocast and what mamba_ssm's kernels do. Within bf16-level error of the fp64 recurrence,
// and measurably different from the all-fp32 run (which would mean the GEMMs silently ran in fp32).
TEST(Ssd, Bf16InputsUseBf16Gemms) {
  const SsdCase c{2, 37, 4, 2, 8, 6, 16, true};
  auto in = make_inputs(c, torch::kBFloat16);
  std::vector<torch::Tensor> in32, in64;
  for (const auto& t : in) in32.push_back(t.to(torch::kFloat32));
  for (const auto& t : in) in64.push_back(t.to(torch::kFloat64));
  auto [y16, s16] = ssd_chunked(in[0], in[1], in[2], in[3], in[4], c.chunk, in[5]);
  auto [y32, s32] = ssd_chunked(in32[0], in32[1], in32[2], in32[3], in32[4], c.chunk, in32[5]);
  auto [y64, s64] = ssd_sequential(in64[0], in64[1], in64[2], in64[3], in64[4], in64[5]);
  EXPECT_EQ(y16.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(s16.scalar_type(), torch::kFloat32);
  EXPECT_LT(rel_err(y16, y64), 1e-2);
  EXPECT_LT(rel_err(s16, s64), 1e-2);
  EXPECT_GT(rel_err(s16, s32), 1e-5) << "bf16 inputs ran their GEMMs in fp32";
  EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU)) << "the call left autocast on";
}

// Under bf16 autocast (as in training) the chunked scan's GEMMs run in bf16 — inside the intra-chunk autograd
// function too, whose backward runs without autocast and must pick the same dtypes itself — while decays and
// elementwise products stay fp32. Output and every gradient must stay within bf16-level error of the fp64
// recurrence, and must differ from the fp32 run (else autocast was not in effect and this test proves nothing).
TEST(Ssd, UnderBf16AutocastStaysCloseToTheFp64Recurrence) {
  const SsdCase c{2, 70, 4, 2, 8, 16, 16, true};
  const auto in = make_inputs(c);
  std::vector<torch::Tensor> in64;
  for (const auto& t : in) in64.push_back(t.to(torch::kFloat64));
  const auto wy = torch::randn({c.b, c.t, c.h, c.p}), ws = torch::randn({c.b, c.h, c.p, c.n});
  const auto ref = grads_of(loss_fn(false, c.chunk, wy.to(torch::kFloat64), ws.to(torch::kFloat64)), in64);
  const auto fp32 = grads_of(loss_fn(true, c.chunk, wy, ws), in);
  at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCPU, true);
  std::vector<torch::Tensor> bf16;
  try {
    bf16 = grads_of(loss_fn(true, c.chunk, wy, ws), in);
  } catch (...) {
    at::autocast::set_autocast_enabled(at::kCPU, false);
    throw;
  }
  at::autocast::set_autocast_enabled(at::kCPU, false);
  at::autocast::clear_cache();
  const char* names[] = {"x", "dt", "A", "B", "C", "initial_state"};
  for (size_t i = 0; i < in.size(); ++i) {
    ASSERT_EQ(bf16[i].scalar_type(), in[i].scalar_type()) << names[i];
    const double e = rel_err(bf16[i], ref[i]);
    std::cout << "[ error ] grad " << names[i] << ": autocast bf16 vs fp64 " << e << ", vs fp32 run "
              << rel_err(bf16[i], fp32[i]) << ", fp32 vs fp64 " << rel_err(fp32[i], ref[i]) << "\n";
    EXPECT_LT(e, 2e-2) << "grad " << names[i];  // bf16 GEMMs: a few 2^-8 roundings per term
    EXPECT_GT(rel_err(bf16[i], fp32[i]), 1e-5) << "grad " << names[i] << ": autocast had no effect";
    EXPECT_LT(rel_err(fp32[i], ref[i]), 1e-4) << "grad " << names[i];
  }
}

TEST(Ssd, BadShapesAreRejected) {
  const SsdCase c{1, 8, 4, 2, 3, 5, 4, true};
  const auto in = make_inputs(c);
  EXPECT_THROW(ssd_chunked(in[0].select(0, 0), in[1], in[2], in[3], in[4], 4), c10::Error);     // x not 4-D
  EXPECT_THROW(ssd_chunked(in[0], in[1].narrow(1, 0, 7), in[2], in[3], in[4], 4), c10::Error);  // dt length
  EXPECT_THROW(ssd_chunked(in[0], in[1], in[2].narrow(0, 0, 3), in[3], in[4], 4), c10::Error);  // A heads
  EXPECT_THROW(ssd_chunked(in[0], in[1], in[2], in[3].narrow(2, 0, 1).repeat({1, 1, 3, 1}),
                           in[4].narrow(2, 0, 1).repeat({1, 1, 3, 1}), 4),
               c10::Error);                                                                     // H % G != 0
  EXPECT_THROW(ssd_chunked(in[0], in[1], in[2], in[3], in[4].narrow(3, 0, 4), 4), c10::Error);  // C != B shape
  EXPECT_THROW(ssd_chunked(in[0], in[1], in[2], in[3], in[4], 0), c10::Error);                  // chunk 0
  EXPECT_THROW(ssd_sequential(in[0], in[1], in[2], in[3], in[4], in[5].transpose(2, 3)), c10::Error);
}

}  // namespace
}  // namespace ablate::core
