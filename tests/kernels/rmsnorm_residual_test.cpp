// Fused residual add + RMSNorm: the CPU reference (through ops::rmsnorm_residual) against the LibTorch composite
// written from the formula, forward (h and y) and backward (x, residual, w), fp32, awkward shapes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/ops/rmsnorm_residual.h"
#include "kernels/rmsnorm_residual.h"

namespace {

double max_err(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// use_h: the returned h also feeds the loss (as the residual stream does), so dh_in is nonzero.
void check(const std::vector<int64_t>& shape, bool use_h) {
  const int64_t d = shape.back();
  auto x = (torch::randn(shape) * 2.0).requires_grad_(true);
  auto r = torch::randn(shape).requires_grad_(true);
  auto w = (torch::rand({d}) + 0.5).requires_grad_(true);
  auto x2 = x.detach().clone().requires_grad_(true), r2 = r.detach().clone().requires_grad_(true),
       w2 = w.detach().clone().requires_grad_(true);
  auto [h1, y1] = ablate::ops::rmsnorm_residual(x, r, w, 1e-6);
  auto [h2, y2] = ablate::ops::rmsnorm_residual_composite(x2, r2, w2, 1e-6);
  EXPECT_LT(max_err(h1, h2), 1e-6) << "h " << x.sizes();
  EXPECT_LT(max_err(y1, y2), 1e-5) << "y " << x.sizes();
  auto gy = torch::randn_like(y1), gh = torch::randn_like(h1);
  auto l1 = (y1 * gy).sum(), l2 = (y2 * gy).sum();
  if (use_h) {
    l1 = l1 + (h1 * gh).sum();
    l2 = l2 + (h2 * gh).sum();
  }
  l1.backward();
  l2.backward();
  EXPECT_LT(max_err(x.grad(), x2.grad()), 1e-4) << "dx " << x.sizes();
  EXPECT_LT(max_err(r.grad(), r2.grad()), 1e-4) << "dresidual " << x.sizes();
  EXPECT_LT(max_err(w.grad(), w2.grad()), 1e-4 * std::sqrt(double(x.numel() / d))) << "dw " << x.sizes();
}

TEST(RMSNormResidualRef, MatchesCompositeOnAwkwardShapes) {
  torch::manual_seed(1);
  for (auto s : std::vector<std::vector<int64_t>>{{1, 1}, {3, 97}, {2, 5, 33}, {17, 257}, {4, 3, 1000}, {2, 4096}}) {
    check(s, /*use_h=*/true);
    check(s, /*use_h=*/false);
  }
}

TEST(RMSNormResidualRef, OnlyHUsed) {
  // y unused: the residual stream's gradient passes straight to x and residual; w gets none.
  auto x = torch::randn({4, 16}).requires_grad_(true), r = torch::randn({4, 16}).requires_grad_(true);
  auto w = torch::rand({16}).requires_grad_(true);
  auto [h, y] = ablate::ops::rmsnorm_residual(x, r, w, 1e-6);
  auto g = torch::randn_like(h);
  (h * g).sum().backward();
  EXPECT_LT(max_err(x.grad(), g), 1e-7);
  EXPECT_LT(max_err(r.grad(), g), 1e-7);
  EXPECT_TRUE(!w.grad().defined() || w.grad().abs().max().item<float>() == 0.f);
}

TEST(RMSNormResidualRef, RawForwardByHand) {
  // One row: x = [1, 2], residual = [2, 2] -> h = [3, 4], rstd = 1 / sqrt(12.5), y = w * h * rstd.
  std::vector<float> x = {1.f, 2.f}, res = {2.f, 2.f}, w = {1.f, 2.f}, h(2), y(2), rstd(1);
  ablate::kernels::RMSNormResidualFwdArgs a;
  a.x = x.data();
  a.residual = res.data();
  a.w = w.data();
  a.h = h.data();
  a.y = y.data();
  a.rstd = rstd.data();
  a.rows = 1;
  a.cols = 2;
  a.eps = 0.f;
  ablate::kernels::rmsnorm_residual_forward_ref(a);
  const float rs = 1.f / std::sqrt(12.5f);
  EXPECT_FLOAT_EQ(h[0], 3.f);
  EXPECT_FLOAT_EQ(h[1], 4.f);
  EXPECT_NEAR(rstd[0], rs, 1e-7);
  EXPECT_NEAR(y[0], 3.f * rs, 1e-6);
  EXPECT_NEAR(y[1], 2.f * 4.f * rs, 1e-6);
}

TEST(RMSNormResidualRef, RejectsBadShapes) {
  EXPECT_THROW(ablate::ops::rmsnorm_residual(torch::randn({2, 4}), torch::randn({2, 5}), torch::ones({4}), 1e-6),
               c10::Error);
  EXPECT_THROW(ablate::ops::rmsnorm_residual(torch::randn({2, 4}), torch::randn({2, 4}), torch::ones({5}), 1e-6),
               c10::Error);
}

}  // namespace
