// RoPE: the CPU reference (through ops::rope) against the LibTorch composite written from the formula, forward and
// backward, fp32, awkward shapes, both layouts, strided views, GQA q/k in one call.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/ops/rope.h"
#include "kernels/rope.h"

namespace {

using ablate::ops::RopeLayout;

// core/model.cpp rope_tables: built in fp64, cast to fp32.
std::pair<torch::Tensor, torch::Tensor> tables(int64_t T, int64_t hd, double theta = 10000.0) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto inv_freq = torch::pow(theta, -torch::arange(0, hd, 2, opts) / double(hd));
  auto ang = torch::outer(torch::arange(T, opts), inv_freq);
  auto emb = torch::cat({ang, ang}, -1);
  return {emb.cos().to(torch::kFloat32), emb.sin().to(torch::kFloat32)};
}

double max_err(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// x: a 4-D view in `layout`; checks forward and backward of ops::rope (ref) against ops::rope_composite.
void check(const torch::Tensor& x, RopeLayout layout, int64_t extra_table_rows = 0) {
  const int64_t T = x.size(layout == RopeLayout::kBHTD ? 2 : 1), hd = x.size(3);
  auto [cos, sin] = tables(T + extra_table_rows, hd);
  auto x2 = x.detach().clone().requires_grad_(true);
  // Keep x's strides for the kernel path: rotate the original view, not a contiguous clone.
  auto xv = x.detach().requires_grad_(true);
  auto y1 = ablate::ops::rope(xv, cos, sin, layout);
  auto y2 = ablate::ops::rope_composite(x2, cos, sin, layout);
  ASSERT_EQ(y1.sizes(), y2.sizes());
  EXPECT_LT(max_err(y1, y2), 1e-5) << "forward, shape " << x.sizes() << " strides " << x.strides();
  auto g = torch::randn(y1.sizes());
  (y1 * g).sum().backward();
  (y2 * g).sum().backward();
  EXPECT_LT(max_err(xv.grad(), x2.grad()), 1e-5) << "backward, shape " << x.sizes();
}

TEST(RopeRef, MatchesCompositeOnAwkwardShapes) {
  torch::manual_seed(1);
  for (auto s : std::vector<std::vector<int64_t>>{{1, 1, 1, 2}, {1, 1, 1, 64}, {1, 3, 97, 64}, {2, 5, 33, 128},
                                                  {1, 2, 7, 6}, {3, 1, 13, 10}}) {
    check(torch::randn(s) * 2.0, RopeLayout::kBHTD);
    check(torch::randn(s) * 2.0, RopeLayout::kBTHD, /*extra_table_rows=*/5);
  }
}

TEST(RopeRef, StridedViewsKeepTheirLayout) {
  torch::manual_seed(2);
  // The model's q: [B, T, H, hd] memory seen as [B, H, T, hd].
  auto mem = torch::randn({2, 19, 4, 64});
  check(mem.transpose(1, 2), RopeLayout::kBHTD);
  // A slice of a fused projection (row stride larger than H * hd) and a view with a non-contiguous last dim.
  auto fused = torch::randn({2, 11, 3, 2 * 128});
  check(fused.narrow(3, 0, 128), RopeLayout::kBTHD);
  auto t = torch::randn({2, 3, 64, 9}).transpose(2, 3);  // hd stride != 1: the op makes it contiguous
  check(t, RopeLayout::kBHTD);
  auto y = ablate::ops::rope(mem.transpose(1, 2), tables(19, 64).first, tables(19, 64).second);
  EXPECT_EQ(y.strides(), mem.transpose(1, 2).strides()) << "output is [B, T, H, hd] in memory";
  // A contiguous [B, H, T, hd] input still gives a position-major output.
  auto yc = ablate::ops::rope(mem.transpose(1, 2).contiguous(), tables(19, 64).first, tables(19, 64).second);
  EXPECT_EQ(yc.strides(), mem.transpose(1, 2).strides());
  EXPECT_LT(max_err(yc, y), 1e-6);
}

TEST(RopeRef, QkInOneCallWithGqa) {
  torch::manual_seed(3);
  auto q = torch::randn({2, 8, 33, 64}).requires_grad_(true);
  auto k = torch::randn({2, 2, 33, 64}).requires_grad_(true);
  auto [cos, sin] = tables(40, 64);
  auto [qo, ko] = ablate::ops::rope_qk(q, k, cos, sin);
  auto q2 = q.detach().clone().requires_grad_(true), k2 = k.detach().clone().requires_grad_(true);
  auto qr = ablate::ops::rope_composite(q2, cos, sin), kr = ablate::ops::rope_composite(k2, cos, sin);
  EXPECT_LT(max_err(qo, qr), 1e-5);
  EXPECT_LT(max_err(ko, kr), 1e-5);
  auto gq = torch::randn_like(qo), gk = torch::randn_like(ko);
  ((qo * gq).sum() + (ko * gk).sum()).backward();
  ((qr * gq).sum() + (kr * gk).sum()).backward();
  EXPECT_LT(max_err(q.grad(), q2.grad()), 1e-5);
  EXPECT_LT(max_err(k.grad(), k2.grad()), 1e-5);
}

TEST(RopeRef, BackwardIsTheAdjointOfForward) {
  // <R x, g> == <x, R^T g> for the raw reference: checks the backward formula independently of autograd.
  torch::manual_seed(4);
  const int64_t T = 23, H = 3, hd = 128;
  auto [cos, sin] = tables(T, hd, 500000.0);
  auto x = torch::randn({1, T, H, hd}), g = torch::randn({1, T, H, hd});
  auto y = torch::full_like(x, std::nanf("")), dx = torch::full_like(x, std::nanf(""));
  ablate::kernels::RopeArgs a;
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.table_rows = T;
  a.head_dim = hd;
  a.t[0].n[0] = 1;
  a.t[0].n[1] = T;
  a.t[0].n[2] = H;
  a.t[0].xs[0] = a.t[0].ys[0] = T * H * hd;
  a.t[0].xs[1] = a.t[0].ys[1] = H * hd;
  a.t[0].xs[2] = a.t[0].ys[2] = hd;
  a.t[0].pos_dim = 1;
  a.t[0].x = x.data_ptr<float>();
  a.t[0].y = y.data_ptr<float>();
  ablate::kernels::rope_forward_ref(a);
  a.t[0].x = g.data_ptr<float>();
  a.t[0].y = dx.data_ptr<float>();
  ablate::kernels::rope_backward_ref(a);
  ASSERT_TRUE(torch::isfinite(y).all().item<bool>() && torch::isfinite(dx).all().item<bool>());
  const double lhs = (y.to(torch::kFloat64) * g.to(torch::kFloat64)).sum().item<double>();
  const double rhs = (x.to(torch::kFloat64) * dx.to(torch::kFloat64)).sum().item<double>();
  EXPECT_NEAR(lhs, rhs, 1e-5 * (1.0 + std::abs(lhs)));
  // Rotation preserves each pair's norm.
  EXPECT_NEAR(y.pow(2).sum().item<double>(), x.pow(2).sum().item<double>(), 1e-4 * x.pow(2).sum().item<double>());
}

TEST(RopeRef, OtherDtypesUseTheComposite) {
  auto x = torch::randn({1, 2, 5, 8}, torch::kFloat64);
  auto [cos, sin] = tables(5, 8);
  EXPECT_LT(max_err(ablate::ops::rope(x, cos, sin), ablate::ops::rope_composite(x, cos, sin)), 1e-6);
}

TEST(RopeRef, RejectsBadShapes) {
  auto [cos, sin] = tables(4, 8);
  EXPECT_THROW(ablate::ops::rope(torch::randn({1, 2, 5, 8}), cos, sin), c10::Error);  // table too short
  EXPECT_THROW(ablate::ops::rope(torch::randn({2, 5, 8}), cos, sin), c10::Error);     // not 4-D
  EXPECT_THROW(ablate::ops::rope(torch::randn({1, 2, 4, 6}), cos, sin), c10::Error);  // hd mismatch
}

}  // namespace
