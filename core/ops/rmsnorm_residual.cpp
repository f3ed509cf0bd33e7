#include "core/ops/rmsnorm_residual.h"
#include "core/ops/kernel_dispatch.h"

#include "kernels/rmsnorm_residual.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool is_f32_or_bf16(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
}

bool kernel_ok(const torch::Tensor& x, const torch::Tensor& residual, const torch::Tensor& w) {
  if (residual.scalar_type() != x.scalar_type()) return false;
  if (x.is_cpu()) return x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32;
  return kHaveCudaKernels && x.is_cuda() && is_f32_or_bf16(x) && is_f32_or_bf16(w) &&
         x.size(-1) <= kernels::kRMSNormResidualMaxCols;
}

struct RMSNormResidualFn : torch::autograd::Function<RMSNormResidualFn> {
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& x_in, const torch::Tensor& r_in,
                               const torch::Tensor& w_in, double eps) {
    const auto x = x_in.contiguous(), residual = r_in.contiguous(), w = w_in.contiguous();
    const int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
    const auto y_dtype = (x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16)
                             ? torch::kBFloat16
                             : torch::kFloat32;
    auto h = torch::empty_like(x);
    auto y = torch::empty(x.sizes(), x.options().dtype(y_dtype));
    auto rstd = torch::empty({rows}, x.options().dtype(torch::kFloat32));
    kernels::RMSNormResidualFwdArgs a;
    a.x = x.data_ptr();
    a.residual = residual.data_ptr();
    a.w = w.data_ptr();
    a.h = h.data_ptr();
    a.y = y.data_ptr();
    a.rstd = rstd.data_ptr<float>();
    a.rows = rows;
    a.cols = cols;
    a.eps = static_cast<float>(eps);
    a.bf16 = x.scalar_type() == torch::kBFloat16;
    a.w_bf16 = w.scalar_type() == torch::kBFloat16;
    if (x.is_cuda()) {
#if ABLATE_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      const auto err = kernels::rmsnorm_residual_forward_cuda(a, c10::cuda::getCurrentCUDAStream());
      TORCH_CHECK(err == cudaSuccess, "rmsnorm_residual forward CUDA kernel: ", cudaGetErrorString(err));
#endif
    } else {
      kernels::rmsnorm_residual_forward_ref(a);
    }
    ctx->set_materialize_grads(false);  // an unused h or y gives an undefined gradient: skip it, don't read zeros
    ctx->save_for_backward({h, w, rstd});
    return {h, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& h = saved[0];
    const auto& w = saved[1];
    const auto& rstd = saved[2];
    const auto dh_in = grads[0].defined() ? grads[0].contiguous() : torch::Tensor();
    if (!grads[1].defined()) {  // y unused: only the residual path carries gradient
      return {dh_in, dh_in, torch::Tensor(), torch::Tensor()};
    }
    const auto dy = grads[1].contiguous();
    const int64_t cols = h.size(-1), rows = cols == 0 ? 0 : h.numel() / cols;
    auto dx = torch::empty_like(h);
    auto dw = torch::empty({cols}, h.options().dtype(torch::kFloat32));
    kernels::RMSNormResidualBwdArgs a;
    a.dy = dy.data_ptr();
    a.dh = dh_in.defined() ? dh_in.data_ptr() : nullptr;
    a.h = h.data_ptr();
    a.w = w.data_ptr();
    a.rstd = rstd.data_ptr<float>();
    a.dx = dx.data_ptr();
    a.dw = dw.data_ptr<float>();
    a.rows = rows;
    a.cols = cols;
    a.bf16 = h.scalar_type() == torch::kBFloat16;
    a.w_bf16 = w.scalar_type() == torch::kBFloat16;
    if (h.is_cuda()) {
#if ABLATE_WITH_CUDA
      const c10::cuda::CUDAGuard guard(h.device());
      auto ws = torch::empty({kernels::rmsnorm_residual_bwd_workspace_floats(rows, cols)},
                             h.options().dtype(torch::kFloat32));
      a.workspace = ws.data_ptr<float>();
      const auto err = kernels::rmsnorm_residual_backward_cuda(a, c10::cuda::getCurrentCUDAStream());
      TORCH_CHECK(err == cudaSuccess, "rmsnorm_residual backward CUDA kernel: ", cudaGetErrorString(err));
#endif
    } else {
      kernels::rmsnorm_residual_backward_ref(a);
    }
    return {dx, dx, dw.to(w.scalar_type()), torch::Tensor()};
  }
};

}  // namespace

std::pair<torch::Tensor, torch::Tensor> rmsnorm_residual_composite(const torch::Tensor& x, const torch::Tensor& residual,
                                                                   const torch::Tensor& w, double eps) {
  const auto h = x + residual;
  const auto hf = h.to(torch::kFloat32);
  const auto normed = hf * torch::rsqrt(hf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return {h, w * normed.to(h.scalar_type())};
}

std::pair<torch::Tensor, torch::Tensor> rmsnorm_residual(const torch::Tensor& x, const torch::Tensor& residual,
                                                         const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.sizes() == residual.sizes(),
              "rmsnorm_residual: expected x and residual of one shape [..., d], got ", x.sizes(), " and ",
              residual.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "rmsnorm_residual: expected weight [", x.size(-1), "], got ",
              w.sizes());
  TORCH_CHECK(x.device() == residual.device() && x.device() == w.device(),
              "rmsnorm_residual: expected x, residual and weight on one device, got ", x.device(), ", ",
              residual.device(), ", ", w.device());
  if (!kernel_ok(x, residual, w)) return rmsnorm_residual_composite(x, residual, w, eps);
  auto out = RMSNormResidualFn::apply(x, residual, w, eps);
  return {out[0], out[1]};
}

}  // namespace ablate::ops
