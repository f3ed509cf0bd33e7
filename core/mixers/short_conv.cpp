#include "core/mixers/short_conv.h"

#include <cmath>

namespace ablate::core {

namespace F = torch::nn::functional;

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be (B,T,C), got ", x.sizes());
  const int64_t C = x.size(2);
  const auto w = weight.dim() == 2 ? weight.unsqueeze(1) : weight;
  TORCH_CHECK(w.dim() == 3 && w.size(0) == C && w.size(1) == 1,
              "causal_conv1d: weight must be (C,W) or (C,1,W) with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == C), "causal_conv1d: bias must be (", C, "), got ",
              bias.sizes());
  const int64_t W = w.size(2);
  // Left padding only: output t covers inputs t-W+1 .. t.
  const auto xt = F::pad(x.transpose(1, 2), F::PadFuncOptions({W - 1, 0}));
  const std::vector<int64_t> stride{1}, padding{0}, dilation{1};
  const auto b = bias.defined() ? bias.to(x.scalar_type()) : bias;
  return torch::conv1d(xt, w.to(x.scalar_type()), b, stride, padding, dilation, /*groups=*/C).transpose(1, 2);
}

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
  auto y = causal_conv1d(x, weight, bias);
  return options.silu() ? torch::silu(y) : y;
}

}  // namespace ablate::core
