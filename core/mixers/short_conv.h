// Causal depthwise short convolution (the "ShortConvolution" of Mamba2 and Gated DeltaNet).
#pragma once
#include <torch/torch.h>

namespace ablate::core {

// y[b,t,c] = bias[c] + sum_{j<W} weight[c,j] * x[b, t-(W-1)+j, c], with x = 0 for t < 0: a depthwise conv1d
// over time with W-1 zeros of left padding, so y_t sees only x_{<=t}.
// x (B,T,C); weight (C,W) or (C,1,W) (PyTorch's Conv1d layout); bias (C) or undefined. Returns (B,T,C).
torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias = torch::Tensor());

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
  torch::Tensor forward(const torch::Tensor& x);  // (B,T,C) -> (B,T,C)

  ShortConvOptions options;
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(ShortConv);

}  // namespace ablate::core
