// CUDA block-wise quantization (kernels/quant.h).
// Layout: one thread block per quantization block, one element per thread (blockDim = block rounded up to
// a warp multiple; block <= 1024). The qmap (<= 256 floats) is staged in shared memory; the absmax is a
// warp-shuffle + shared-memory reduction; the nearest code is the same branchless binary search as the
// CPU reference (quant_nearest_code), so codes match the reference bit for bit given the same inputs.
// 4-bit: even/odd neighbours exchange their nibble with one __shfl_down_sync and the even lane writes the
// byte. A partial last block is handled by masking.
#include "kernels/quant.h"
#include "kernels/cuda_common.cuh"

#include <cuda_runtime.h>

namespace ablate::kernels {
namespace {

using cuda_common::block_max;

__global__ void quant_encode_kernel(QuantEncodeArgs a) {
  __shared__ float qmap[256];
  __shared__ float red[32];
  const int nq = 1 << a.bits;
  for (int k = threadIdx.x; k < nq; k += blockDim.x) qmap[k] = a.qmap[k];
  const int64_t i = int64_t(blockIdx.x) * a.block + threadIdx.x;
  const bool valid = threadIdx.x < a.block && i < a.n;
  const float x = valid ? a.x[i] : 0.f;
  const float amax = block_max(fabsf(x), red);  // also syncs the qmap load
  const float s = fmaxf(amax, 1e-12f);
  if (threadIdx.x == 0) a.scale[blockIdx.x] = s;
  const uint32_t c = valid ? quant_nearest_code(__fdiv_rn(x, s), qmap, a.bits) : 0u;
  if (a.bits == 8) {
    if (valid) a.codes[i] = static_cast<uint8_t>(c);
  } else {
    const uint32_t odd = __shfl_down_sync(0xffffffffu, c, 1);
    if (valid && (threadIdx.x & 1) == 0) a.codes[i >> 1] = static_cast<uint8_t>((c << 4) | odd);
  }
}

__global__ void quant_decode_kernel(QuantDecodeArgs a) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.n) return;
  a.y[i] = __fmul_rn(a.qmap[quant_code_at(a.codes, i, a.bits)], a.scale[i / a.block]);
}

}  // namespace

cudaError_t quant_encode_cuda(const QuantEncodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  if (a.block <= 0 || a.block > 1024 || (a.bits == 4 && (a.block & 1))) return cudaErrorInvalidValue;
  const int threads = static_cast<int>((a.block + 31) / 32 * 32);
  const int64_t nblocks = (a.n + a.block - 1) / a.block;
  quant_encode_kernel<<<static_cast<unsigned>(nblocks), threads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t quant_decode_cuda(const QuantDecodeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  const int threads = 256;
  quant_decode_kernel<<<static_cast<unsigned>((a.n + threads - 1) / threads), threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace ablate::kernels
