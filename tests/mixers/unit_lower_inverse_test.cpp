// The unit lower-triangular inverse (core/mixers/unit_lower_inverse.h) on CPU: the C++ kernel reference
// (kernels/unit_lower_inverse_ref.cpp) and the op's forward against (I + A) T = I, its hand-written backward against
// autograd through torch::linalg_solve_triangular and against finite differences (fp64), and argument errors.
// The CUDA kernel is tested in tests/kernels/chunk_state_scan_gpu_test.cpp (UnitLowerInverseGpu).
#include "core/mixers/unit_lower_inverse.h"

#include <gtest/gtest.h>

#include "kernels/unit_lower_inverse.h"
#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::gradcheck;
using testing::grads_of;
using testing::rel_err;
using testing::weighted_sum;

// Entries of the size the delta rule produces (beta k_i . k_j decayed, |.| < 1 for unit-norm keys), plus a diagonal
// and an upper part that must be ignored.
torch::Tensor make_a(int64_t batch, int64_t n, torch::ScalarType dt, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn({batch, n, n}, torch::TensorOptions().dtype(dt)) / std::sqrt(double(n));
}

torch::Tensor identity_residual(const torch::Tensor& A, const torch::Tensor& T) {
  const auto n = A.size(-1);
  const auto I = torch::eye(n, A.options());
  return (torch::matmul(torch::tril(A, -1) + I, T) - I).abs().max();
}

TEST(UnitLowerInverse, KernelReferenceSolvesTheSystem) {
  for (const int64_t n : {1, 2, 7, 64, 100}) {
    const auto A = make_a(3, n, torch::kFloat32, 10 + n);
    auto T = torch::full_like(A, 7.f);  // every element must be written
    kernels::UnitLowerInverseArgs args;
    args.batch = 3;
    args.n = n;
    args.a = A.data_ptr<float>();
    args.t = T.data_ptr<float>();
    kernels::unit_lower_inverse_ref(args);
    EXPECT_LT(identity_residual(A, T).item<double>(), 1e-5) << "n " << n;
    EXPECT_EQ(torch::triu(T, 1).abs().max().item<double>(), 0.0) << "n " << n;
    EXPECT_TRUE(torch::diagonal(T, 0, -2, -1).eq(1).all().item<bool>()) << "n " << n;
    const auto T64 = unit_lower_inverse(A.to(torch::kFloat64), false);
    EXPECT_LT(rel_err(T.to(torch::kFloat64), T64), 1e-6) << "n " << n;
  }
}

TEST(UnitLowerInverse, OpForwardIgnoresDiagonalAndUpperPart) {
  const auto A = make_a(4, 9, torch::kFloat64, 3);
  const auto T = unit_lower_inverse(A, false);
  EXPECT_LT(identity_residual(A, T).item<double>(), 1e-12);
  EXPECT_LT(rel_err(unit_lower_inverse(torch::tril(A, -1), false), T), 1e-15);
}

// The hand-written backward against autograd through the solve, with A batched in two leading dimensions.
TEST(UnitLowerInverse, BackwardMatchesAutogradThroughSolve) {
  const auto A = make_a(6, 16, torch::kFloat64, 4).reshape({2, 3, 16, 16});
  const auto w = torch::randn({2, 3, 16, 16}, A.options());
  const auto ours = grads_of([&](const std::vector<torch::Tensor>& in) { return weighted_sum(unit_lower_inverse(in[0], false), w); },
                             {A});
  const auto ref = grads_of(
      [&](const std::vector<torch::Tensor>& in) {
        const auto eye = torch::eye(16, in[0].options()).expand(in[0].sizes());
        return weighted_sum(torch::linalg_solve_triangular(torch::tril(in[0], -1), eye, false, true, true), w);
      },
      {A});
  EXPECT_LT(rel_err(ours[0], ref[0]), 1e-12);
  EXPECT_EQ(torch::triu(ours[0]).abs().max().item<double>(), 0.0);  // diagonal and upper part get no gradient
}

TEST(UnitLowerInverse, GradcheckFp64) {
  const auto A = make_a(2, 5, torch::kFloat64, 5);
  const auto w = torch::randn({2, 5, 5}, A.options());
  const auto rep =
      gradcheck([&](const std::vector<torch::Tensor>& in) { return weighted_sum(unit_lower_inverse(in[0], false), w); },
                {A});
  EXPECT_TRUE(rep.ok) << rep.first_failure;
  EXPECT_LT(rep.max_abs_err, 1e-6);
}

TEST(UnitLowerInverse, BadArgumentsAreRejected) {
  EXPECT_THROW(unit_lower_inverse(torch::zeros({3, 4}), false), c10::Error);  // not square
  EXPECT_THROW(unit_lower_inverse(torch::zeros({4}), false), c10::Error);
  EXPECT_THROW(unit_lower_inverse(torch::zeros({2, 2}, torch::kInt64), false), c10::Error);
  EXPECT_FALSE(unit_lower_inverse_kernel_applies(torch::zeros({2, 4, 4})));  // CPU tensor
  EXPECT_THROW(unit_lower_inverse(torch::zeros({2, 4, 4}), true), c10::Error);
}

}  // namespace
}  // namespace ablate::core
