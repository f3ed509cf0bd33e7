#include "core/ops/rmsnorm.h"
#include "core/ops/kernel_dispatch.h"

#include "kernels/rmsnorm.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_cuda(bool is_cuda) {
#if !ABLATE_WITH_CUDA
  TORCH_CHECK(!is_cuda, "rmsnorm: CUDA tensor given, but this build has no CUDA kernels (ABLATE_WITH_CUDA=OFF)");
#else
  (void)is_cuda;
#endif
}

struct RMSNormFn : torch::autograd::Function<RMSNormFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_in, const torch::Tensor& w, double eps) {
    const auto x = x_in.contiguous();
    const int64_t cols = x.size(-1);
    const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
    auto y = torch::empty_like(x);
    auto rstd = torch::empty({rows}, x.options());
    kernels::RMSNormFwdArgs a;
    a.x = x.data_ptr<float>();
    a.w = w.data_ptr<float>();
    a.y = y.data_ptr<float>();
    a.rstd = rstd.data_ptr<float>();
    a.rows = rows;
    a.cols = cols;
    a.eps = static_cast<float>(eps);
    if (x.is_cuda()) {
      check_cuda(true);
#if ABLATE_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      const auto err = kernels::rmsnorm_forward_cuda(a, c10::cuda::getCurrentCUDAStream());
      TORCH_CHECK(err == cudaSuccess, "rmsnorm forward CUDA kernel: ", cudaGetErrorString(err));
#endif
    } else {
      kernels::rmsnorm_forward_ref(a);
    }
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& rstd = saved[2];
    const auto dy = grads[0].contiguous();
    auto dx = torch::empty_like(x);
    auto dw = torch::empty_like(w);
    kernels::RMSNormBwdArgs a;
    a.dy = dy.data_ptr<float>();
    a.x = x.data_ptr<float>();
    a.w = w.data_ptr<float>();
    a.rstd = rstd.data_ptr<float>();
    a.dx = dx.data_ptr<float>();
    a.dw = dw.data_ptr<float>();
    a.cols = x.size(-1);
    a.rows = a.cols == 0 ? 0 : x.numel() / a.cols;
    if (x.is_cuda()) {
      check_cuda(true);
#if ABLATE_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      const auto err = kernels::rmsnorm_backward_cuda(a, c10::cuda::getCurrentCUDAStream());
      TORCH_CHECK(err == cudaSuccess, "rmsnorm backward CUDA kernel: ", cudaGetErrorString(err));
#endif
    } else {
      kernels::rmsnorm_backward_ref(a);
    }
    return {dx, dw, torch::Tensor()};
  }
};

}  // namespace

torch::Tensor rmsnorm_composite(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const auto xf = x.to(torch::kFloat32);
  const auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return w * normed.to(x.scalar_type());
}

torch::Tensor rmsnorm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const bool kernel_ok = x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32 &&
                         x.device() == w.device() && w.dim() == 1 && w.size(0) == x.size(-1) &&
                         (x.is_cpu() || (kHaveCudaKernels && x.is_cuda()));
  if (!kernel_ok) return rmsnorm_composite(x, w, eps);
  return RMSNormFn::apply(x, w.contiguous(), eps);
}

}  // namespace ablate::ops
