// RMSNorm kernels: plain-pointer interface shared by the CPU reference and the CUDA kernels.
// y[r, c] = w[c] * x[r, c] * rstd[r],  rstd[r] = 1 / sqrt(mean_c(x[r, c]^2) + eps)
// All buffers are row-major, contiguous, fp32.
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct RMSNormFwdArgs {
  const float* x = nullptr;  // [rows, cols]
  const float* w = nullptr;  // [cols]
  float* y = nullptr;        // [rows, cols]
  float* rstd = nullptr;     // [rows], saved for backward
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 1e-6f;
};

struct RMSNormBwdArgs {
  const float* dy = nullptr;    // [rows, cols]
  const float* x = nullptr;     // [rows, cols]
  const float* w = nullptr;     // [cols]
  const float* rstd = nullptr;  // [rows] from the forward
  float* dx = nullptr;          // [rows, cols]
  float* dw = nullptr;          // [cols], overwritten (not accumulated)
  int64_t rows = 0;
  int64_t cols = 0;
};

// CPU reference: obvious loops, accumulation in double for the row statistics.
void rmsnorm_forward_ref(const RMSNormFwdArgs& a);
void rmsnorm_backward_ref(const RMSNormBwdArgs& a);

#if ABLATE_WITH_CUDA
// CUDA launchers on the given stream; the backward zeroes dw itself and reduces into it.
cudaError_t rmsnorm_forward_cuda(const RMSNormFwdArgs& a, cudaStream_t stream);
cudaError_t rmsnorm_backward_cuda(const RMSNormBwdArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
