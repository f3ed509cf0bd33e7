// Dense causal attention as the Transformer blocks call it (core/model.cpp) and K1 of bench/mixers times it.
#pragma once
#include <torch/torch.h>

namespace ablate::core {

// softmax(q k^T / sqrt(d) + causal mask) v through at::scaled_dot_product_attention. q (B, H, T, d); k, v
// (B, KV, T, d) with H a multiple of KV: query head j reads KV head j / (H / KV) (repeat-interleave mapping).
// GQA without copies (enable_gqa) where the fused CUDA backends take it — bf16/fp16 on CUDA (flash, cuDNN) and
// the CPU kernels; fp32 on CUDA expands K/V first, because only the memory-efficient kernel serves fp32 and it
// refuses enable_gqa (the math fallback would materialise T x T scores). Measured on the H200 (bench/RESULTS.md,
// K1): enable_gqa 0.152 vs 0.195 ms forward at T 4K, 16/8 heads; equal at 32K and beyond.
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

}  // namespace ablate::core
