// Fused linear + cross-entropy as a LibTorch autograd op backed by kernels/cross_entropy (the Liger approach).
#pragma once
#include <torch/torch.h>

namespace ablate::ops {

// mean over non-ignored rows of CE(hidden @ weight^T, targets), divided by max(1, count) like core/model.cpp's
// chunked_linear_cross_entropy. hidden [N, d], weight [V, d], targets [N] (int64; ignore_index rows are skipped).
// The [N, V] logits never exist: per chunk of rows the logits come from one matmul, the cross-entropy kernel
// turns them in place into d(loss)/d(logits), and the chunk's hidden/weight gradients are accumulated at once
// (weight gradient in fp32). The matmul dtype is the autocast dtype when autocast is on for the device, else
// hidden's dtype. Kernels: fp32 on CPU/CUDA, bf16 on CUDA; other dtypes use linear_cross_entropy_composite.
// chunk_rows <= 0 picks min(4096, 2^30 / V) rows (linear_cross_entropy_chunk_rows). Returns an fp32 scalar.
// A target outside [0, V) other than ignore_index makes the loss NaN (checked on the device, no host sync).
// The gradients are computed in the forward (scaled by 1/count) and only rescaled by the upstream gradient.
torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                   const torch::Tensor& targets, int64_t chunk_rows = 0, int64_t ignore_index = -100);

// Full-logits LibTorch composite (matmul, fp32 cross_entropy with reduction sum, divided by max(1, count)).
torch::Tensor linear_cross_entropy_composite(const torch::Tensor& hidden, const torch::Tensor& weight,
                                             const torch::Tensor& targets, int64_t ignore_index = -100);

// The default chunk_rows for a vocabulary of V.
int64_t linear_cross_entropy_chunk_rows(int64_t V);

}  // namespace ablate::ops
