// RoPE as a LibTorch autograd op backed by kernels/rope (CPU reference or CUDA kernels).
#pragma once
#include <utility>

#include <torch/torch.h>

namespace ablate::ops {

// Where the position dimension sits in a 4-D q/k tensor.
enum class RopeLayout {
  kBHTD,  // [B, H, T, hd]: T at dim 2, the core/model.cpp apply_rope convention (cos/sin broadcast over B, H)
  kBTHD,  // [B, T, H, hd]: T at dim 1 (what the projections produce before the transpose; NSA's input)
};

// NeoX-style RoPE with the fp32 tables of core/model.cpp rope_tables: cos/sin [>= T, hd], row p = position p.
// x may be any strided view whose last dim is contiguous (e.g. the model's transposed q). The output (and the
// gradient) is laid out [B, T, H, hd] in memory whatever x's strides: position-major, so one table row serves
// all heads, and for kBHTD exactly the model's transposed-projection layout. fp32 (CPU or CUDA) and bf16 (CUDA)
// use the kernels; anything else uses rope_composite.
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                   RopeLayout layout = RopeLayout::kBHTD);

// q and k (their head counts may differ, GQA) rotated in one launch.
std::pair<torch::Tensor, torch::Tensor> rope_qk(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos,
                                                const torch::Tensor& sin, RopeLayout layout = RopeLayout::kBHTD);

// The LibTorch composite, written from the formula exactly as core/model.cpp apply_rope (tables cast to x's dtype,
// x * cos + rotate_half(x) * sin). Reference for the tests and the fallback for other dtypes.
torch::Tensor rope_composite(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             RopeLayout layout = RopeLayout::kBHTD);

}  // namespace ablate::ops
