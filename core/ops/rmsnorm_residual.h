// Fused residual add + RMSNorm as a LibTorch autograd op backed by kernels/rmsnorm_residual.
#pragma once
#include <utility>

#include <torch/torch.h>

namespace ablate::ops {

// Returns {h, y}: h = x + residual (the new residual stream), y = w * cast(h_f32 * rsqrt(mean(h_f32^2) + eps))
// (HF-Llama order). Gradients flow to x, residual (both get dh) and w. Kernels for fp32 (CPU/CUDA) and bf16
// (CUDA) activations with an fp32 or same-dtype weight; anything else uses rmsnorm_residual_composite.
std::pair<torch::Tensor, torch::Tensor> rmsnorm_residual(const torch::Tensor& x, const torch::Tensor& residual,
                                                         const torch::Tensor& w, double eps);

// The LibTorch composite from the formula (reference for the tests).
std::pair<torch::Tensor, torch::Tensor> rmsnorm_residual_composite(const torch::Tensor& x, const torch::Tensor& residual,
                                                                   const torch::Tensor& w, double eps);

}  // namespace ablate::ops
