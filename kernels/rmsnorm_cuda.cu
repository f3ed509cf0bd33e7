// CUDA RMSNorm: one block per row for the forward and the dx part of the backward; dw is reduced
// per column with a grid-stride over rows into a [row_blocks, cols] partial buffer, then summed.
#include "kernels/rmsnorm.h"

#include <cuda_runtime.h>

namespace ablate::kernels {
namespace {

constexpr int kThreads = 256;

__device__ float block_sum(float v, float* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < nwarps) ? shm[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) shm[0] = v;
  __syncthreads();
  const float total = shm[0];
  __syncthreads();  // shm is reused by the caller's next reduction
  return total;
}

__global__ void fwd_kernel(RMSNormFwdArgs a) {
  __shared__ float shm[32];
  const int64_t r = blockIdx.x;
  const float* x = a.x + r * a.cols;
  float* y = a.y + r * a.cols;
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) ss += x[c] * x[c];
  ss = block_sum(ss, shm);
  const float rstd = rsqrtf(ss / float(a.cols) + a.eps);
  if (threadIdx.x == 0 && a.rstd) a.rstd[r] = rstd;
  for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) y[c] = a.w[c] * (x[c] * rstd);
}

__global__ void bwd_dx_kernel(RMSNormBwdArgs a) {
  __shared__ float shm[32];
  const int64_t r = blockIdx.x;
  const float* x = a.x + r * a.cols;
  const float* dy = a.dy + r * a.cols;
  float* dx = a.dx + r * a.cols;
  const float rstd = a.rstd[r];
  float dot = 0.f;
  for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) dot += dy[c] * a.w[c] * x[c] * rstd;
  const float m = block_sum(dot, shm) / float(a.cols);
  for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
    const float xhat = x[c] * rstd;
    dx[c] = rstd * (dy[c] * a.w[c] - xhat * m);
  }
}

// Each (column, row-block) thread sums dy*xhat over its rows; then atomics into dw (zeroed first).
__global__ void bwd_dw_kernel(RMSNormBwdArgs a, int64_t rows_per_block) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.cols) return;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < a.rows ? r0 + rows_per_block : a.rows;
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) acc += a.dy[r * a.cols + c] * a.x[r * a.cols + c] * a.rstd[r];
  atomicAdd(a.dw + c, acc);
}

}  // namespace

cudaError_t rmsnorm_forward_cuda(const RMSNormFwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  fwd_kernel<<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t rmsnorm_backward_cuda(const RMSNormBwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  bwd_dx_kernel<<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  if (!a.dw) return cudaSuccess;
  if (cudaError_t e = cudaMemsetAsync(a.dw, 0, sizeof(float) * a.cols, stream); e != cudaSuccess) return e;
  const int64_t rows_per_block = 64;
  dim3 grid(static_cast<unsigned>((a.cols + kThreads - 1) / kThreads),
            static_cast<unsigned>((a.rows + rows_per_block - 1) / rows_per_block));
  bwd_dw_kernel<<<grid, kThreads, 0, stream>>>(a, rows_per_block);
  return cudaGetLastError();
}

}  // namespace ablate::kernels
