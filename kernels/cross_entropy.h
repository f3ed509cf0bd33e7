// Cross-entropy over a chunk of logits, with the gradient written in place (the Liger fused-linear-CE step).
// For each row r with target t = targets[r] over vocab V:
//   lse[r]  = log(sum_j exp(logits[r, j]))             (online max/sum in fp32, one read of the row)
//   loss[r] = lse[r] - logits[r, t]                     (0 when t == ignore_index; NaN when t is out of [0, V))
//   if write_grad: logits[r, j] <- (softmax_j - [j == t]) * grad_scale   (0 for the whole row when ignored)
// grad_scale is read from device memory (CUDA) / host memory (reference), e.g. 1 / count of valid targets, so the
// caller never synchronizes. logits may be fp32 or bf16 (row stride ld elements); everything else is fp32/int64.
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct CrossEntropyArgs {
  void* logits = nullptr;             // [rows, ld] (first vocab columns used); overwritten with the gradient
  const int64_t* targets = nullptr;   // [rows]
  float* loss = nullptr;              // [rows] per-row loss (unscaled)
  float* lse = nullptr;               // [rows] optional
  const float* grad_scale = nullptr;  // scalar; required when write_grad
  int64_t rows = 0, vocab = 0, ld = 0;
  int64_t ignore_index = -100;
  bool bf16 = false;  // logits bfloat16 (else float32)
  bool write_grad = true;
};

// CPU reference (fp32 logits only), accumulating in double.
void cross_entropy_ref(const CrossEntropyArgs& a);

#if ABLATE_WITH_CUDA
// One block per row; cudaErrorInvalidValue when write_grad is set without grad_scale.
cudaError_t cross_entropy_cuda(const CrossEntropyArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
