#include "core/ops/swiglu.h"
#include "core/ops/kernel_dispatch.h"

#include "kernels/swiglu.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::ops {
namespace {

namespace F = torch::nn::functional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool kernel_ok(const torch::Tensor& x) { return kernel_takes(x.scalar_type(), x.device()); }

// [rows, cols] view with contiguous columns (a view where the strides allow it, e.g. a half of a fused tensor).
torch::Tensor rows_view(const torch::Tensor& x) {
  auto v = x.reshape({-1, x.size(-1)});
  return v.stride(1) == 1 ? v : v.contiguous();
}

void launch_fwd(kernels::SwiGLUFwdArgs& a, const torch::Tensor& like) {
  a.bf16 = like.scalar_type() == torch::kBFloat16;
  if (like.is_cuda()) {
#if ABLATE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(like.device());
    const auto err = kernels::swiglu_forward_cuda(a, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "swiglu forward CUDA kernel: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "swiglu: CUDA tensor given, but this build has no CUDA kernels (ABLATE_WITH_CUDA=OFF)");
#endif
  } else {
    kernels::swiglu_forward_ref(a);
  }
}

void launch_bwd(kernels::SwiGLUBwdArgs& a, const torch::Tensor& like) {
  a.bf16 = like.scalar_type() == torch::kBFloat16;
  if (like.is_cuda()) {
#if ABLATE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(like.device());
    const auto err = kernels::swiglu_backward_cuda(a, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "swiglu backward CUDA kernel: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "swiglu: CUDA tensor given, but this build has no CUDA kernels (ABLATE_WITH_CUDA=OFF)");
#endif
  } else {
    kernels::swiglu_backward_ref(a);
  }
}

// out [rows, cols] (contiguous) from 2-D gate/up views.
torch::Tensor forward_2d(const torch::Tensor& g, const torch::Tensor& u) {
  auto out = torch::empty({g.size(0), g.size(1)}, g.options());
  kernels::SwiGLUFwdArgs a;
  a.gate = g.data_ptr();
  a.up = u.data_ptr();
  a.out = out.data_ptr();
  a.rows = g.size(0);
  a.cols = g.size(1);
  a.gate_stride = g.stride(0);
  a.up_stride = u.stride(0);
  a.out_stride = out.stride(0);
  launch_fwd(a, g);
  return out;
}

// Writes dgate/dup into the given 2-D views.
void backward_2d(const torch::Tensor& dy, const torch::Tensor& g, const torch::Tensor& u, torch::Tensor& dg,
                 torch::Tensor& du) {
  kernels::SwiGLUBwdArgs a;
  a.dout = dy.data_ptr();
  a.gate = g.data_ptr();
  a.up = u.data_ptr();
  a.dgate = dg.data_ptr();
  a.dup = du.data_ptr();
  a.rows = g.size(0);
  a.cols = g.size(1);
  a.dout_stride = dy.stride(0);
  a.gate_stride = g.stride(0);
  a.up_stride = u.stride(0);
  a.dgate_stride = dg.stride(0);
  a.dup_stride = du.stride(0);
  launch_bwd(a, g);
}

std::vector<int64_t> with_last(torch::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s.back() = last;
  return s;
}

struct SwiGLUFn : torch::autograd::Function<SwiGLUFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& gate, const torch::Tensor& up) {
    const auto g = rows_view(gate), u = rows_view(up);
    ctx->save_for_backward({g, u});
    ctx->saved_data["shape"] = gate.sizes().vec();
    return forward_2d(g, u).view(gate.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& g = saved[0];
    const auto& u = saved[1];
    const auto dy = rows_view(grads[0]);
    auto dg = torch::empty({g.size(0), g.size(1)}, g.options());
    auto du = torch::empty({g.size(0), g.size(1)}, g.options());
    backward_2d(dy, g, u, dg, du);
    const auto shape = ctx->saved_data["shape"].toIntVector();
    return {dg.view(shape), du.view(shape)};
  }
};

struct SwiGLUFusedFn : torch::autograd::Function<SwiGLUFusedFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& gate_up) {
    const auto gu = gate_up.reshape({-1, gate_up.size(-1)}).contiguous();
    const int64_t I = gu.size(1) / 2;
    ctx->save_for_backward({gu});
    ctx->saved_data["shape"] = gate_up.sizes().vec();
    return forward_2d(gu.narrow(1, 0, I), gu.narrow(1, I, I)).view(with_last(gate_up.sizes(), I));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto gu = ctx->get_saved_variables()[0];
    const int64_t I = gu.size(1) / 2;
    const auto dy = rows_view(grads[0]);
    auto dgu = torch::empty_like(gu);  // dgate and dup written straight into its two halves
    auto dg = dgu.narrow(1, 0, I), du = dgu.narrow(1, I, I);
    backward_2d(dy, gu.narrow(1, 0, I), gu.narrow(1, I, I), dg, du);
    return {dgu.view(ctx->saved_data["shape"].toIntVector())};
  }
};

}  // namespace

torch::Tensor swiglu_composite(const torch::Tensor& gate, const torch::Tensor& up) { return F::silu(gate) * up; }

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu: expected gate and up of one shape, got ", gate.sizes(), " and ",
              up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && gate.device() == up.device(),
              "swiglu: expected gate and up of one dtype and device, got ", gate.scalar_type(), "/", gate.device(),
              " and ", up.scalar_type(), "/", up.device());
  TORCH_CHECK(gate.dim() >= 1, "swiglu: expected at least 1-D inputs, got a scalar");
  if (!kernel_ok(gate) || gate.numel() == 0) return swiglu_composite(gate, up);
  return SwiGLUFn::apply(gate, up);
}

torch::Tensor swiglu_fused(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "swiglu_fused: expected [..., 2I] with an even last dim, got ", gate_up.sizes());
  if (!kernel_ok(gate_up) || gate_up.numel() == 0) {
    const int64_t I = gate_up.size(-1) / 2;
    return swiglu_composite(gate_up.narrow(-1, 0, I), gate_up.narrow(-1, I, I));
  }
  return SwiGLUFusedFn::apply(gate_up);
}

}  // namespace ablate::ops
