// SwiGLU activation kernels: out = silu(gate) * up, plain-pointer interface (CPU reference and CUDA kernels).
//   forward   out = g * s * u,                       s = sigmoid(g)
//   backward  dgate = dout * u * s * (1 + g * (1 - s)),   dup = dout * g * s   (1 - s computed as sigmoid(-g))
// Each operand is [rows, cols] with its own row stride (elements; the columns are contiguous), so the model's
// separate W_gate x / W_up x tensors (stride cols) and a fused [rows, 2 * cols] projection (gate = first half,
// up = second half, stride 2 * cols) use the same kernels; so does writing dgate/dup into one fused gradient.
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct SwiGLUFwdArgs {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* out = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t gate_stride = 0, up_stride = 0, out_stride = 0;  // row strides in elements
  bool bf16 = false;  // every operand bfloat16 (else float32); math in fp32
};

struct SwiGLUBwdArgs {
  const void* dout = nullptr;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* dgate = nullptr;
  void* dup = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t dout_stride = 0, gate_stride = 0, up_stride = 0, dgate_stride = 0, dup_stride = 0;
  bool bf16 = false;
};

// CPU reference (fp32 only: bf16 must be false).
void swiglu_forward_ref(const SwiGLUFwdArgs& a);
void swiglu_backward_ref(const SwiGLUBwdArgs& a);

#if ABLATE_WITH_CUDA
cudaError_t swiglu_forward_cuda(const SwiGLUFwdArgs& a, cudaStream_t stream);
cudaError_t swiglu_backward_cuda(const SwiGLUBwdArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
