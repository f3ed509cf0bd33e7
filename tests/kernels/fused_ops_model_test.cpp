// The fused ops against the composites core/model.cpp runs today: ops::rope vs apply_rope with rope_tables (model's
// [B, H, T, hd] view of a [B, T, H, hd] buffer), ops::linear_cross_entropy vs chunked_linear_cross_entropy.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/model.h"
#include "core/ops/cross_entropy.h"
#include "core/ops/rope.h"

namespace {

double max_err(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

TEST(FusedOpsVsModel, RopeMatchesApplyRope) {
  torch::manual_seed(1);
  const int64_t B = 2, T = 37, H = 4, hd = 64;
  auto [cos, sin] = ablate::rope_tables(T, hd, 10000.0, torch::kCPU);
  auto mem = torch::randn({B, T, H, hd});
  auto q1 = mem.transpose(1, 2).detach().requires_grad_(true);
  auto q2 = mem.clone().transpose(1, 2).detach().requires_grad_(true);
  auto y1 = ablate::ops::rope(q1, cos, sin);
  auto y2 = ablate::apply_rope(q2, cos, sin);
  EXPECT_LT(max_err(y1, y2), 1e-6);
  auto g = torch::randn_like(y2);
  (y1 * g).sum().backward();
  (y2 * g).sum().backward();
  EXPECT_LT(max_err(q1.grad(), q2.grad()), 1e-6);
}

TEST(FusedOpsVsModel, LinearCrossEntropyMatchesChunkedModelVersion) {
  torch::manual_seed(2);
  const int64_t N = 45, d = 24, V = 301;
  auto h = torch::randn({N, d}).requires_grad_(true), w = (torch::randn({V, d}) * 0.3).requires_grad_(true);
  auto t = torch::randint(0, V, {N}, torch::kLong);
  t.masked_fill_(torch::rand({N}) < 0.25, -100);
  auto h2 = h.detach().clone().requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  auto l1 = ablate::ops::linear_cross_entropy(h, w, t, 8);
  auto l2 = ablate::chunked_linear_cross_entropy(h2, w2, t, 16);
  EXPECT_NEAR(l1.item<double>(), l2.item<double>(), 1e-5);
  l1.backward();
  l2.backward();
  EXPECT_LT(max_err(h.grad(), h2.grad()), 1e-6);
  EXPECT_LT(max_err(w.grad(), w2.grad()), 1e-6);
}

}  // namespace
