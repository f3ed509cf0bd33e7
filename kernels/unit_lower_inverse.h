// The inverse of a batch of unit lower-triangular matrices, T = (I + A)^{-1} with A strictly lower triangular: the
// UT transform of the chunked gated delta rule (core/mixers/delta_rule.cpp), where it replaces a batched triangular
// solve (cuBLAS trsm: 2.4 ms per call at 32K x 16 heads on the H200, about a sixth of the forward) by this inverse
// and one GEMM. Plain-pointer interface for the C++ reference and the CUDA kernel.
//
// Only the strictly lower part of each input matrix is read (its diagonal is taken as one, its upper part ignored),
// as in a unitriangular solve. T is unit lower triangular; its upper part is written as zeros.
// Layout: contiguous fp32 (batch, n, n), row-major.
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct UnitLowerInverseArgs {
  int64_t batch = 0, n = 0;
  const float* a = nullptr;
  float* t = nullptr;  // may not alias a
};

// Forward substitution row by row, fp32: T[i, j] = delta_ij - sum_{j <= k < i} A[i, k] T[k, j].
void unit_lower_inverse_ref(const UnitLowerInverseArgs& args);

#if ABLATE_WITH_CUDA
// The CUDA kernel takes n <= 64 (one thread per column of T, the column in registers).
constexpr int64_t kUnitLowerInverseMaxN = 64;
// One thread block per two matrices; cudaErrorInvalidValue for n outside 1..64.
cudaError_t unit_lower_inverse_cuda(const UnitLowerInverseArgs& args, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
