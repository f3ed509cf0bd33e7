// CUDA unit lower-triangular inverse (see unit_lower_inverse.h), fp32.
//
// Column j of T depends only on column j itself: T[i, j] = delta_ij - sum_{k < i} A[i, k] T[k, j] (T[k, j] = 0 for
// k < j). So one thread owns one column, keeps it in registers (the loops over rows are unrolled for N = 64) and
// needs no synchronisation after A is staged; the rows of A are read from shared memory as broadcasts (every thread
// of a warp reads the same A[i, k]). A smaller n is padded to 64 with identity rows (zero A), whose columns are
// never written. Work per matrix: 64 * 63 / 2 FMAs per thread; the kernel is bound by reading A and writing T.
#include "kernels/unit_lower_inverse.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace ablate::kernels {
namespace {

constexpr int N = 64;     // padded matrix size
constexpr int PER = 2;    // matrices per block
constexpr int AP = N + 4; // row stride of A in shared memory (float4-aligned)

__global__ void __launch_bounds__(N * PER) unit_lower_inverse_kernel(int64_t batch, int n, const float* __restrict__ a,
                                                                     float* __restrict__ t) {
  __shared__ __align__(16) float sa[PER][N * AP];
  const int j = threadIdx.x, m = threadIdx.y;
  const int64_t b = int64_t(blockIdx.x) * PER + m;
  const int64_t nn = int64_t(n) * n;
  // Stage A (strictly lower part, zero elsewhere and in the padding); each matrix by its own N threads.
  for (int idx = j; idx < N * N; idx += N) {
    const int r = idx / N, c = idx - r * N;
    float v = 0.f;
    if (b < batch && r < n && c < r) v = a[b * nn + int64_t(r) * n + c];
    sa[m][r * AP + c] = v;
  }
  __syncthreads();
  if (b >= batch || j >= n) return;
  const float* A = sa[m];
  float col[N];
#pragma unroll
  for (int i = 0; i < N; ++i) col[i] = i == j ? 1.f : 0.f;
#pragma unroll
  for (int i = 1; i < N; ++i) {
    float acc = col[i];
    const float4* row = reinterpret_cast<const float4*>(A + i * AP);
#pragma unroll
    for (int k4 = 0; k4 < (i + 3) / 4; ++k4) {
      const float4 r = row[k4];  // entries k >= i are zero (strictly lower staging)
      acc -= r.x * col[4 * k4];
      if (4 * k4 + 1 < N) acc -= r.y * col[4 * k4 + 1];
      if (4 * k4 + 2 < N) acc -= r.z * col[4 * k4 + 2];
      if (4 * k4 + 3 < N) acc -= r.w * col[4 * k4 + 3];
    }
    col[i] = acc;
  }
  float* out = t + b * nn + j;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (i < n) out[int64_t(i) * n] = col[i];
}

}  // namespace

cudaError_t unit_lower_inverse_cuda(const UnitLowerInverseArgs& args, cudaStream_t stream) {
  if (args.n < 1 || args.n > kUnitLowerInverseMaxN || args.batch < 0) return cudaErrorInvalidValue;
  if (args.batch == 0) return cudaSuccess;
  const int64_t blocks = (args.batch + PER - 1) / PER;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  unit_lower_inverse_kernel<<<static_cast<unsigned>(blocks), dim3(N, PER), 0, stream>>>(
      args.batch, static_cast<int>(args.n), args.a, args.t);
  return cudaGetLastError();
}

}  // namespace ablate::kernels
