// SwiGLU activation as a LibTorch autograd op backed by kernels/swiglu (CPU reference or CUDA kernels).
#pragma once
#include <torch/torch.h>

namespace ablate::ops {

// silu(gate) * up for the model's two projections (W_gate x, W_up x): same shape [..., I], same dtype and device.
// fp32 (CPU or CUDA) and bf16 (CUDA) use the kernels; other dtypes use swiglu_composite.
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

// The same from one fused projection gu = [..., 2I] (gate = gu[..., :I], up = gu[..., I:]); out is [..., I] and the
// gradient is one [..., 2I] tensor.
torch::Tensor swiglu_fused(const torch::Tensor& gate_up);

// The LibTorch composite (F::silu(gate) * up, as core/model.cpp's MLP). Reference for the tests.
torch::Tensor swiglu_composite(const torch::Tensor& gate, const torch::Tensor& up);

}  // namespace ablate::ops
