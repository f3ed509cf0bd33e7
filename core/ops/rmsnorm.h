// RMSNorm as a LibTorch autograd op backed by kernels/rmsnorm (CPU reference or CUDA kernels).
#pragma once
#include <torch/torch.h>

namespace ablate::ops {

// y = w * x * rsqrt(mean(x^2, -1) + eps) over the last dimension.
// fp32 CPU/CUDA tensors use the hand-written kernels; other dtypes use the LibTorch composite (fp32 stats).
torch::Tensor rmsnorm(const torch::Tensor& x, const torch::Tensor& w, double eps);

// The LibTorch composite (HF-Llama order: stats in fp32, cast back, then times w). Reference for the tests.
torch::Tensor rmsnorm_composite(const torch::Tensor& x, const torch::Tensor& w, double eps);

}  // namespace ablate::ops
