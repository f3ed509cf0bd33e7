// RMSNorm kernels against the LibTorch composite: forward and backward, awkward shapes.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/ops/rmsnorm.h"
#include "kernels/rmsnorm.h"
#include "tests/require_cuda.h"

namespace {

void check_against_composite(std::vector<int64_t> shape, torch::Device dev) {
  torch::manual_seed(shape.back() * 131 + shape.front());
  auto x = torch::randn(shape, torch::dtype(torch::kFloat32).device(dev)) * 3.0;
  auto w = torch::randn({shape.back()}, torch::dtype(torch::kFloat32).device(dev));
  auto x1 = x.clone().requires_grad_(true), w1 = w.clone().requires_grad_(true);
  auto x2 = x.clone().requires_grad_(true), w2 = w.clone().requires_grad_(true);
  auto y1 = ablate::ops::rmsnorm(x1, w1, 1e-6);
  auto y2 = ablate::ops::rmsnorm_composite(x2, w2, 1e-6);
  ASSERT_TRUE(torch::allclose(y1, y2, 1e-5, 1e-5)) << "forward mismatch for shape " << x.sizes();
  auto g = torch::randn_like(y1);
  (y1 * g).sum().backward();
  (y2 * g).sum().backward();
  EXPECT_TRUE(torch::allclose(x1.grad(), x2.grad(), 1e-4, 1e-4)) << "dx mismatch for shape " << x.sizes();
  EXPECT_TRUE(torch::allclose(w1.grad(), w2.grad(), 1e-4, 1e-3)) << "dw mismatch for shape " << x.sizes();
}

TEST(RMSNormKernel, RefMatchesCompositeOnAwkwardShapes) {
  for (auto shape : std::vector<std::vector<int64_t>>{{1, 1}, {3, 7}, {2, 5, 33}, {17, 257}, {4, 3, 1000}, {1, 4096}})
    check_against_composite(shape, torch::kCPU);
}

TEST(RMSNormKernel, RefHandlesNonContiguousInput) {
  auto x = torch::randn({8, 12}).t();  // [12, 8], strided
  auto w = torch::randn({8});
  EXPECT_TRUE(torch::allclose(ablate::ops::rmsnorm(x, w, 1e-6), ablate::ops::rmsnorm_composite(x, w, 1e-6), 1e-5, 1e-5));
}

TEST(RMSNormKernel, RawRefMatchesFormula) {
  // Direct check of the plain-pointer kernel: one row [3, 4], w = 1.
  std::vector<float> x = {3.f, 4.f}, w = {1.f, 2.f}, y(2), rstd(1);
  ablate::kernels::RMSNormFwdArgs a{x.data(), w.data(), y.data(), rstd.data(), 1, 2, 0.f};
  ablate::kernels::rmsnorm_forward_ref(a);
  const float r = 1.f / std::sqrt(12.5f);
  EXPECT_NEAR(rstd[0], r, 1e-6);
  EXPECT_NEAR(y[0], 3.f * r, 1e-6);
  EXPECT_NEAR(y[1], 2.f * 4.f * r, 1e-6);
}

TEST(RMSNormKernel, CudaMatchesComposite) {
  ABLATE_REQUIRE_CUDA();
  for (auto shape : std::vector<std::vector<int64_t>>{{1, 1}, {3, 7}, {2, 5, 33}, {129, 257}, {4, 3, 1000}, {2, 8192}})
    check_against_composite(shape, torch::kCUDA);
}

}  // namespace
