// Fused residual add + RMSNorm kernels (HF-Llama order), plain-pointer interface (CPU reference and CUDA kernels).
//   h    = x + residual                                  (rounded to the activation dtype: it is returned)
//   rstd = 1 / sqrt(mean(h_f32^2) + eps)                 (statistics of the rounded h, in fp32)
//   n    = cast_act(h_f32 * rstd)                        (normalize in fp32, cast to the input dtype)
//   y    = w * n                                         (in fp32, rounded to y's dtype)
// Backward, given dy and dh_in (the gradient reaching h from its other use, the residual stream; may be null):
//   g = dy * w;  dn = rstd * (g - nf * mean(g * nf)) with nf = h_f32 * rstd (the cast is passed straight through)
//   dx = dresidual = dh_in + dn;   dw = sum_rows(dy * n)
// Rows are contiguous [rows, cols]; activations (x, residual, h, dx, dh_in) share one dtype, w has its own, and
// y is bf16 only when both are (fp32 weight times bf16 activation gives fp32, as in LibTorch type promotion).
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct RMSNormResidualFwdArgs {
  const void* x = nullptr;         // [rows, cols] activation dtype
  const void* residual = nullptr;  // [rows, cols] activation dtype
  const void* w = nullptr;         // [cols] weight dtype
  void* h = nullptr;               // [rows, cols] activation dtype: x + residual
  void* y = nullptr;               // [rows, cols] y dtype (see above)
  float* rstd = nullptr;           // [rows], saved for backward
  int64_t rows = 0, cols = 0;
  float eps = 1e-6f;
  bool bf16 = false;    // activations bfloat16 (else float32)
  bool w_bf16 = false;  // weight bfloat16 (else float32)
};

struct RMSNormResidualBwdArgs {
  const void* dy = nullptr;    // [rows, cols] y dtype
  const void* dh = nullptr;    // [rows, cols] activation dtype, or nullptr (no other use of h)
  const void* h = nullptr;     // [rows, cols] activation dtype, from the forward
  const void* w = nullptr;     // [cols] weight dtype
  const float* rstd = nullptr;  // [rows] from the forward
  void* dx = nullptr;          // [rows, cols] activation dtype: the gradient of both x and residual
  float* dw = nullptr;         // [cols] fp32, overwritten
  float* workspace = nullptr;  // CUDA only: rmsnorm_residual_bwd_workspace_floats(rows, cols) floats
  int64_t rows = 0, cols = 0;
  bool bf16 = false;
  bool w_bf16 = false;
  // CUDA kernel choice, for tests and benchmarks: 0 = the default, 1 = dw in shared memory and pass 2 re-reads
  // its inputs (any cols), 2 = row slice in registers, 3 = registers + next row prefetched (2 and 3 need
  // cols <= 1024 * (16 / activation element size) and a 16-byte-aligned vector path; wider rows use 1).
  int variant = 0;
};

// Largest cols the CUDA kernels take (one row is staged in shared memory as fp32).
constexpr int64_t kRMSNormResidualMaxCols = 32768;
// The CUDA backward's grid cap: at most this many blocks (the grid is what fits on the GPU at once), each
// leaving one row of dw partial sums.
constexpr int64_t kRMSNormResidualBwdMaxBlocks = 2048;
// fp32 scratch the CUDA backward needs for its per-block dw partial sums.
int64_t rmsnorm_residual_bwd_workspace_floats(int64_t rows, int64_t cols);

// CPU reference (fp32 only: bf16 and w_bf16 must be false). Accumulates the statistics in double.
void rmsnorm_residual_forward_ref(const RMSNormResidualFwdArgs& a);
void rmsnorm_residual_backward_ref(const RMSNormResidualBwdArgs& a);

#if ABLATE_WITH_CUDA
// cudaErrorInvalidValue for cols > kRMSNormResidualMaxCols or a missing workspace.
cudaError_t rmsnorm_residual_forward_cuda(const RMSNormResidualFwdArgs& a, cudaStream_t stream);
cudaError_t rmsnorm_residual_backward_cuda(const RMSNormResidualBwdArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
