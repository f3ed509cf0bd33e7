// SwiGLU: the CPU reference (through ops::swiglu / swiglu_fused) against F::silu(gate) * up, forward and backward,
// fp32, awkward shapes, strided halves of a fused projection.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/ops/swiglu.h"
#include "kernels/swiglu.h"

namespace {

// max |a - b| / (1 + |b|): absolute near zero, relative for the large outputs of |gate| up to ~16.
double max_err(const torch::Tensor& a, const torch::Tensor& b) {
  const auto bd = b.to(torch::kFloat64);
  return ((a.to(torch::kFloat64) - bd).abs() / (1.0 + bd.abs())).max().item<double>();
}

const std::vector<std::vector<int64_t>> kShapes = {{1, 1}, {3, 97}, {2, 5, 33}, {17, 256}, {4, 3, 1000}, {1, 4096}};

TEST(SwiGLURef, SeparateGateUpMatchComposite) {
  torch::manual_seed(1);
  for (const auto& s : kShapes) {
    auto g = (torch::randn(s) * 4.0).requires_grad_(true), u = torch::randn(s).requires_grad_(true);
    auto g2 = g.detach().clone().requires_grad_(true), u2 = u.detach().clone().requires_grad_(true);
    auto y1 = ablate::ops::swiglu(g, u);
    auto y2 = ablate::ops::swiglu_composite(g2, u2);
    EXPECT_LT(max_err(y1, y2), 1e-5) << "forward " << g.sizes();
    auto dy = torch::randn_like(y1);
    (y1 * dy).sum().backward();
    (y2 * dy).sum().backward();
    EXPECT_LT(max_err(g.grad(), g2.grad()), 1e-5) << "dgate " << g.sizes();
    EXPECT_LT(max_err(u.grad(), u2.grad()), 1e-5) << "dup " << g.sizes();
  }
}

TEST(SwiGLURef, FusedProjectionMatchesComposite) {
  torch::manual_seed(2);
  for (const auto& s0 : kShapes) {
    auto s = s0;
    s.back() *= 2;
    const int64_t I = s0.back();
    auto gu = (torch::randn(s) * 4.0).requires_grad_(true);
    auto gu2 = gu.detach().clone().requires_grad_(true);
    auto y1 = ablate::ops::swiglu_fused(gu);
    auto y2 = ablate::ops::swiglu_composite(gu2.narrow(-1, 0, I), gu2.narrow(-1, I, I));
    ASSERT_EQ(y1.sizes(), y2.sizes());
    EXPECT_LT(max_err(y1, y2), 1e-5) << "forward " << gu.sizes();
    auto dy = torch::randn_like(y1);
    (y1 * dy).sum().backward();
    (y2 * dy).sum().backward();
    EXPECT_LT(max_err(gu.grad(), gu2.grad()), 1e-5) << "dgate_up " << gu.sizes();
  }
}

TEST(SwiGLURef, StridedHalvesAndExtremeGates) {
  // gate/up as views into one [rows, 2I] buffer (row stride 2I), and gates far in both tails of the sigmoid.
  torch::manual_seed(3);
  auto buf = torch::randn({9, 2 * 40}) * 30.0;
  auto g = buf.narrow(1, 0, 40), u = buf.narrow(1, 40, 40);
  EXPECT_LT(max_err(ablate::ops::swiglu(g, u), ablate::ops::swiglu_composite(g, u)), 1e-4);
  auto gg = torch::tensor({-200.f, -88.f, -20.f, 0.f, 20.f, 88.f, 200.f});
  auto uu = torch::ones_like(gg);
  auto y = ablate::ops::swiglu(gg, uu);
  EXPECT_TRUE(torch::isfinite(y).all().item<bool>());
  EXPECT_LT(max_err(y, ablate::ops::swiglu_composite(gg, uu)), 1e-4);
}

TEST(SwiGLURef, RawBackwardMatchesFiniteDifference) {
  // Central differences in double on the reference forward, independent of autograd.
  torch::manual_seed(4);
  const int64_t rows = 3, cols = 5;
  auto g = torch::randn({rows, cols}) * 2.0, u = torch::randn({rows, cols}), dy = torch::randn({rows, cols});
  auto dg = torch::full({rows, cols}, std::nanf("")), du = torch::full({rows, cols}, std::nanf(""));
  ablate::kernels::SwiGLUBwdArgs b{dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                   rows, cols, cols, cols, cols, cols, cols, false};
  ablate::kernels::swiglu_backward_ref(b);
  auto f = [](double gv, double uv) { return gv / (1.0 + std::exp(-gv)) * uv; };
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double gv = g.data_ptr<float>()[i], uv = u.data_ptr<float>()[i], d = dy.data_ptr<float>()[i], h = 1e-6;
    EXPECT_NEAR(dg.data_ptr<float>()[i], d * (f(gv + h, uv) - f(gv - h, uv)) / (2 * h), 1e-4);
    EXPECT_NEAR(du.data_ptr<float>()[i], d * (f(gv, uv + h) - f(gv, uv - h)) / (2 * h), 1e-4);
  }
}

TEST(SwiGLURef, RejectsMismatchedShapes) {
  EXPECT_THROW(ablate::ops::swiglu(torch::randn({2, 3}), torch::randn({2, 4})), c10::Error);
  EXPECT_THROW(ablate::ops::swiglu_fused(torch::randn({2, 3})), c10::Error);
}

}  // namespace
