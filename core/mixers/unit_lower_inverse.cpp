#include "core/mixers/unit_lower_inverse.h"

#include "kernels/unit_lower_inverse.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::core {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

torch::Tensor inverse_by_solve(const torch::Tensor& A) {
  const auto eye = torch::eye(A.size(-1), A.options()).expand(A.sizes());
  return torch::linalg_solve_triangular(A, eye, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
}

#if ABLATE_WITH_CUDA
torch::Tensor inverse_by_kernel(const torch::Tensor& A) {
  const c10::cuda::CUDAGuard guard(A.device());
  const auto a = A.contiguous();
  auto t = torch::empty_like(a);
  kernels::UnitLowerInverseArgs args;
  args.n = a.size(-1);
  args.batch = args.n == 0 ? 0 : a.numel() / (args.n * args.n);
  args.a = a.data_ptr<float>();
  args.t = t.data_ptr<float>();
  const auto err = kernels::unit_lower_inverse_cuda(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "unit_lower_inverse CUDA kernel: ", cudaGetErrorString(err));
  return t;
}
#endif

struct UnitLowerInverseFn : torch::autograd::Function<UnitLowerInverseFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& A, bool use_kernel) {
    torch::NoGradGuard no_grad;
    torch::Tensor T;
#if ABLATE_WITH_CUDA
    T = use_kernel ? inverse_by_kernel(A) : inverse_by_solve(A);
#else
    (void)use_kernel;
    T = inverse_by_solve(A);
#endif
    ctx->save_for_backward({T});
    return T;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto T = ctx->get_saved_variables()[0];
    const auto Tt = T.transpose(-1, -2);
    // Only the strictly lower part of A was read, so only it gets a gradient.
    auto dA = torch::tril(-torch::matmul(torch::matmul(Tt, grads[0]), Tt), -1);
    return {dA, torch::Tensor()};
  }
};

}  // namespace

bool unit_lower_inverse_kernel_applies(const torch::Tensor& A) {
#if ABLATE_WITH_CUDA
  return A.is_cuda() && A.scalar_type() == torch::kFloat32 && A.dim() >= 2 && A.size(-1) >= 1 &&
         A.size(-1) <= kernels::kUnitLowerInverseMaxN;
#else
  (void)A;
  return false;
#endif
}

torch::Tensor unit_lower_inverse(const torch::Tensor& A, bool use_kernel) {
  TORCH_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2),
              "unit_lower_inverse: A must be a batch of square matrices (..., n, n), got ", A.sizes());
  TORCH_CHECK(A.is_floating_point(), "unit_lower_inverse: A must be floating point, got ", A.scalar_type());
  TORCH_CHECK(!use_kernel || unit_lower_inverse_kernel_applies(A),
              "unit_lower_inverse: the CUDA kernel takes fp32 CUDA tensors with n <= 64 in a CUDA build, got ",
              A.scalar_type(), " on ", A.device(), ", n ", A.size(-1));
  return UnitLowerInverseFn::apply(A, use_kernel);
}

}  // namespace ablate::core
