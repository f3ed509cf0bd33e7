#include "core/mixers/short_conv.h"

#include <ATen/autocast_mode.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>

#include "core/ops/kernel_dispatch.h"
#include "kernels/causal_conv1d.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::core {
namespace {

namespace F = torch::nn::functional;

// Checks the shapes of causal_conv1d's arguments; returns the kernel width W.
int64_t check_conv_args(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be (B,T,C), got ", x.sizes());
  const int64_t C = x.size(2);
  const bool w_ok =
      (weight.dim() == 2 && weight.size(0) == C) || (weight.dim() == 3 && weight.size(0) == C && weight.size(1) == 1);
  TORCH_CHECK(w_ok, "causal_conv1d: weight must be (C,W) or (C,1,W) with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == C), "causal_conv1d: bias must be (", C, "), got ",
              bias.sizes());
  return weight.size(-1);
}

std::atomic<int64_t> g_fused_calls{0};

// The fused kernels: on unless ABLATE_CONV_FUSED=0 (read once) or short_conv_set_fused_enabled(false).
std::atomic<bool>& fused_switch() {
  static std::atomic<bool> on{ops::env_switch_default("ABLATE_CONV_FUSED")};
  return on;
}

#if ABLATE_WITH_CUDA
// The dtype conv1d computes in for x: under autocast on x's device, autocast casts every floating input but fp64 to
// the autocast dtype; otherwise x's own.
torch::ScalarType conv_input_dtype(const torch::Tensor& x) {
  const auto dt = x.scalar_type();
  const auto dev = x.device().type();
  if (at::autocast::is_autocast_enabled(dev) && at::isFloatingType(dt) && dt != torch::kDouble)
    return at::autocast::get_autocast_dtype(dev);
  return dt;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "causal_conv1d: fused ", what, " CUDA kernel: ", cudaGetErrorString(err));
}

kernels::CausalConv1dShape kernel_shape(const torch::Tensor& x, int64_t W, bool silu) {
  kernels::CausalConv1dShape s;
  s.B = x.size(0);
  s.T = x.size(1);
  s.C = x.size(2);
  s.W = W;
  s.dtype = ops::kernel_dtype(x.scalar_type());
  s.silu = silu;
  return s;
}

// y = [silu](causal conv) on the fused kernels. Saves x (contiguous), the fp32 (C, W) weight and the fp32 bias; the
// backward recomputes the conv from them. The weight and bias gradients are summed from the kernel's per-range fp32
// partials and come back in the parameters' dtype and shape.
struct CausalConv1dFn : torch::autograd::Function<CausalConv1dFn> {
  // bias as an optional: an undefined Tensor argument breaks Function::apply (it records a device for every Tensor
  // input), an empty optional is simply not an input of the graph.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& bias_arg, bool silu) {
    const torch::Tensor bias = bias_arg.value_or(torch::Tensor());
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t C = x.size(2), W = weight.size(-1);
    const auto xc = x.contiguous();
    const auto w32 = weight.reshape({C, W}).to(torch::kFloat).contiguous();
    const auto b32 = bias.defined() ? bias.to(torch::kFloat).contiguous() : torch::Tensor();
    auto y = torch::empty(xc.sizes(), xc.options());
    kernels::CausalConv1dFwdArgs a;
    a.s = kernel_shape(xc, W, silu);
    a.x = xc.data_ptr();
    a.w = w32.data_ptr<float>();
    a.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
    a.y = y.data_ptr();
    check_launch(kernels::causal_conv1d_fwd_cuda(a, c10::cuda::getCurrentCUDAStream()), "forward");
    g_fused_calls.fetch_add(1);
    ctx->save_for_backward({xc, w32, b32});
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["w_sizes"] = weight.sizes().vec();
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(weight.scalar_type());
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(bias.defined() ? bias.scalar_type() : torch::kFloat);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const auto &xc = saved[0], &w32 = saved[1], &b32 = saved[2];
    const c10::cuda::CUDAGuard guard(xc.device());
    const int64_t B = xc.size(0), T = xc.size(1), C = xc.size(2), W = w32.size(1);
    const auto dy = grads[0].to(xc.scalar_type()).contiguous();
    auto dx = torch::empty(xc.sizes(), xc.options());
    auto dwb = torch::empty({kernels::causal_conv1d_num_ranges(B, T), C, W + 1}, xc.options().dtype(torch::kFloat));
    kernels::CausalConv1dBwdArgs a;
    a.s = kernel_shape(xc, W, ctx->saved_data["silu"].toBool());
    a.x = xc.data_ptr();
    a.w = w32.data_ptr<float>();
    a.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
    a.dy = dy.data_ptr();
    a.dx = dx.data_ptr();
    a.dwb = dwb.data_ptr<float>();
    check_launch(kernels::causal_conv1d_bwd_cuda(a, c10::cuda::getCurrentCUDAStream()), "backward");
    // Fixed per-range partials summed in a fixed order: deterministic, unlike atomics.
    const auto sums = dwb.sum(0);  // (C, W + 1); zeros when T = 0
    const auto w_dtype = static_cast<torch::ScalarType>(ctx->saved_data["w_dtype"].toInt());
    const auto dw = sums.narrow(1, 0, W).reshape(ctx->saved_data["w_sizes"].toIntVector()).to(w_dtype);
    torch::Tensor db;
    if (b32.defined()) db = sums.select(1, W).to(static_cast<torch::ScalarType>(ctx->saved_data["b_dtype"].toInt()));
    return {dx, dw, db, torch::Tensor()};
  }
};
#endif  // ABLATE_WITH_CUDA

}  // namespace

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  const int64_t W = check_conv_args(x, weight, bias);
  const int64_t C = x.size(2);
  const auto w = weight.dim() == 2 ? weight.unsqueeze(1) : weight;
  // Left padding only: output t covers inputs t-W+1 .. t.
  const auto xt = F::pad(x.transpose(1, 2), F::PadFuncOptions({W - 1, 0}));
  const std::vector<int64_t> stride{1}, padding{0}, dilation{1};
  const auto b = bias.defined() ? bias.to(x.scalar_type()) : bias;
  return torch::conv1d(xt, w.to(x.scalar_type()), b, stride, padding, dilation, /*groups=*/C).transpose(1, 2);
}

bool causal_conv1d_kernel_applies(const torch::Tensor& x, int64_t kernel_width) {
#if ABLATE_WITH_CUDA
  if (!x.defined() || !x.is_cuda() || x.dim() != 3) return false;
  if (kernel_width < 1 || kernel_width > kernels::kCausalConv1dMaxWidth) return false;
  const auto dt = conv_input_dtype(x);
  if (dt != torch::kFloat && dt != torch::kBFloat16 && dt != torch::kHalf) return false;
  // The kernels' grid: ranges on grid.x, blocks of 128 channels on grid.y.
  return kernels::causal_conv1d_num_ranges(x.size(0), x.size(1)) <= std::numeric_limits<int32_t>::max() &&
         x.size(2) <= int64_t(65535) * 128;
#else
  (void)x;
  (void)kernel_width;
  return false;
#endif
}

torch::Tensor causal_conv1d_silu(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                 bool silu, bool use_kernel) {
  if (!use_kernel) {
    const auto y = causal_conv1d(x, weight, bias);
    return silu ? torch::silu(y) : y;
  }
  const int64_t W = check_conv_args(x, weight, bias);
  TORCH_CHECK(causal_conv1d_kernel_applies(x, W),
              "causal_conv1d_silu: the fused kernel takes fp32/bf16/fp16 (B,T,C) CUDA tensors with kernel width 1..",
              kernels::kCausalConv1dMaxWidth, " in a CUDA build, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device(), ", width ", W);
  TORCH_CHECK(weight.device() == x.device() && (!bias.defined() || bias.device() == x.device()),
              "causal_conv1d_silu: weight and bias must be on x's device ", x.device());
  TORCH_CHECK(weight.is_floating_point() && (!bias.defined() || bias.is_floating_point()),
              "causal_conv1d_silu: weight and bias must be floating point");
#if ABLATE_WITH_CUDA
  // Under autocast x is cast as conv1d's autocast rule casts it (through autograd, as there). The weight is not: the
  // kernel reads it in fp32, where the composite under autocast rounds it to the autocast dtype first (slightly more
  // accurate here; the difference is within that dtype's rounding).
  const auto dt = conv_input_dtype(x);
  const auto xk = dt == x.scalar_type() ? x : x.to(dt);
  return CausalConv1dFn::apply(xk, weight, bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt, silu);
#else
  return torch::Tensor();  // unreachable: causal_conv1d_kernel_applies is false without CUDA
#endif
}

void short_conv_set_fused_enabled(bool enabled) { fused_switch().store(enabled); }
bool short_conv_fused_enabled() { return fused_switch().load(); }
int64_t short_conv_fused_calls() { return g_fused_calls.load(); }

ShortConvImpl::ShortConvImpl(const ShortConvOptions& options_) : options(options_) { reset(); }

void ShortConvImpl::reset() {
  TORCH_CHECK(options.channels() > 0 && options.kernel_size() > 0, "ShortConv: channels (", options.channels(),
              ") and kernel_size (", options.kernel_size(), ") must be positive");
  const double bound = 1.0 / std::sqrt(static_cast<double>(options.kernel_size()));
  weight = register_parameter("weight", torch::empty({options.channels(), 1, options.kernel_size()}));
  torch::NoGradGuard no_grad;
  weight.uniform_(-bound, bound);
  if (options.bias()) {
    bias = register_parameter("bias", torch::empty({options.channels()}));
    bias.uniform_(-bound, bound);
  } else {
    bias = torch::Tensor();
  }
}

torch::Tensor ShortConvImpl::forward(const torch::Tensor& x) {
  const bool fused = fused_switch().load() && causal_conv1d_kernel_applies(x, options.kernel_size());
  return causal_conv1d_silu(x, weight, bias, options.silu(), fused);
}

}  // namespace ablate::core
