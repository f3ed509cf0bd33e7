// Causal depthwise short convolution (the "ShortConvolution" of Mamba2 and Gated DeltaNet).
#pragma once
#include <torch/torch.h>

namespace ablate::core {

// y[b,t,c] = bias[c] + sum_{j<W} weight[c,j] * x[b, t-(W-1)+j, c], with x = 0 for t < 0: a depthwise conv1d
// over time with W-1 zeros of left padding, so y_t sees only x_{<=t}.
// x (B,T,C); weight (C,W) or (C,1,W) (PyTorch's Conv1d layout); bias (C) or undefined. Returns (B,T,C).
torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias = torch::Tensor());

// Whether the fused CUDA kernels (kernels/causal_conv1d.h) take x (B,T,C) with a kernel of width W: a CUDA build, x
// on a CUDA device, x's dtype (after autocast's cast for convolutions, when autocast is on) fp32, bf16 or fp16, and
// 1 <= W <= 8.
bool causal_conv1d_kernel_applies(const torch::Tensor& x, int64_t kernel_width);

// y = silu(causal_conv1d(x, weight, bias)) when silu, else causal_conv1d(x, weight, bias); arguments as there.
// use_kernel = false: the LibTorch composite (transpose, pad, conv1d with groups = C, transpose back, silu), any
// device and dtype. use_kernel = true: the fused CUDA kernels as one autograd op (an error where
// causal_conv1d_kernel_applies is false), which reads and writes (B,T,C) directly, returns a contiguous y in x's dtype
// (the autocast dtype under autocast, as conv1d's), computes in fp32 with the weight and bias in fp32, saves x and
// recomputes the conv in the backward. Not twice differentiable.
torch::Tensor causal_conv1d_silu(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                 bool silu, bool use_kernel);

// ShortConv takes the fused kernels wherever causal_conv1d_kernel_applies, unless ABLATE_CONV_FUSED=0 (read once)
// or short_conv_set_fused_enabled(false); short_conv_fused_calls() counts the forward calls that took them.
void short_conv_set_fused_enabled(bool enabled);
bool short_conv_fused_enabled();
int64_t short_conv_fused_calls();

struct ShortConvOptions {
  ShortConvOptions(int64_t channels, int64_t kernel_size) : channels_(channels), kernel_size_(kernel_size) {}
  TORCH_ARG(int64_t, channels);
  TORCH_ARG(int64_t, kernel_size);
  TORCH_ARG(bool, bias) = false;
  TORCH_ARG(bool, silu) = true;  // apply SiLU after the conv (both Mamba2 and GDN do)
};

// Parameters "weight" (C,1,W) and optionally "bias" (C), initialised like torch.nn.Conv1d: kaiming-uniform with
// a = sqrt(5), i.e. U(-1/sqrt(W), 1/sqrt(W)) for both (fan_in = W for a depthwise conv).
class ShortConvImpl : public torch::nn::Cloneable<ShortConvImpl> {
 public:
  explicit ShortConvImpl(const ShortConvOptions& options);
  void reset() override;
  // (B,T,C) -> (B,T,C): causal_conv1d_silu(x, weight, bias, options.silu(), use_kernel) with the fused kernels
  // when they apply and the switch above is on.
  torch::Tensor forward(const torch::Tensor& x);

  ShortConvOptions options;
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(ShortConv);

}  // namespace ablate::core
