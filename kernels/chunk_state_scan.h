// The sequential part of the chunked gated delta rule (core/mixers/chunk_state_scan.h): a scan over the chunks of
// one (batch, head) that carries a K x V state. Plain-pointer interface for the C++ reference and the CUDA kernels.
//
// Both directions are one recurrence over a state Z (K x V) with, per chunk c (L rows):
//   Zout_c = Z                                  (the state entering the chunk, before the update)
//   X_c    = P1_c + s1 * M1_c Z                 (L x V;  M1_c is L x K)
//   Z      = decay_c Z + s2 * M2_c^T X_c + P2_c (M2_c is L x K; P2 optional)
// and Zfinal = Z after the last step.
//   forward : c = 0 .. C-1,  Z0 = S0,         M1 = W,    s1 = -1, P1 = Ut, M2 = Kend, s2 = +1, no P2
//             -> Zout = S_in, X = U, Zfinal = S_final
//   backward: c = C-1 .. 0,  Z0 = dS_final,   M1 = Kend, s1 = +1, P1 = dU, M2 = W,    s2 = -1, P2 = dS_in
//             -> Zout = dS_{c+1} (the gradient of the state leaving chunk c), X = dU~_c (= dUt_c), Zfinal = dS0
// Columns of V are independent (every product multiplies Z from the left), which is what the CUDA kernel tiles.
//
// Layout: contiguous fp32, bh = batch * heads flattened:
//   m1, m2 (bh, C, L, K); p1, x (bh, C, L, V); p2, zout (bh, C, K, V); decay (bh, C); z0, zfinal (bh, K, V).
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct ChunkScanArgs {
  int64_t bh = 0, chunks = 0, chunk_len = 0, dk = 0, dv = 0;
  const float* m1 = nullptr;
  const float* m2 = nullptr;
  const float* p1 = nullptr;
  const float* p2 = nullptr;  // may be null (no additive term)
  const float* decay = nullptr;
  const float* z0 = nullptr;
  float* zout = nullptr;
  float* x = nullptr;
  float* zfinal = nullptr;
  float s1 = -1.f, s2 = 1.f;
  bool reverse = false;  // walk the chunks from C-1 down to 0
  // CUDA launch shape, 0 = chosen from the sizes (benchmarks override it): V-tile 16, 32 or 64; threads 256 or 512.
  int tile_v = 0, threads = 0;
};

// Plain C++ loops (fp32 data, fp64-free: the same fp32 math as the kernel, in a different summation order).
void chunk_state_scan_ref(const ChunkScanArgs& a);

#if ABLATE_WITH_CUDA
// Whether the CUDA kernel handles these sizes on the current device (shared memory holds two L x K fp32 tiles).
bool chunk_state_scan_cuda_supported(int64_t chunk_len, int64_t dk);
// One thread block per (bh, V-tile) walks the chunks; cudaErrorInvalidValue when not supported.
cudaError_t chunk_state_scan_cuda(const ChunkScanArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
