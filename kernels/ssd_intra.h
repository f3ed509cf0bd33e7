// The intra-chunk term of Mamba2's chunked SSD scan (core/mixers/ssd.cpp, ssd_chunked step 1) without per-head
// L x L tensors in memory: plain-pointer interface for the C++ reference and the fused CUDA kernels.
//
// Contract. T = nc * L (the caller pads time), H heads in G groups (head h reads group g = h / (H / G)). Per batch b,
// chunk c and head h, with l, s the positions inside the chunk and cs the chunk-local cumulative log-decays:
//   Lmat[l, s] = exp(cs[l] - cs[s]) for s < l,  1 for s = l,  0 for s > l    (the diagonal is the constant 1)
//   M[l, s]    = CB[l, s] * Lmat[l, s]                                      (CB = C Bᵀ of the chunk, per group)
//   y[l]       = sum_s M[l, s] xd[s]                                        (xd: the dt-discretised input, P wide)
// Backward, given dy:
//   dxd[s]     = sum_l M[l, s] dy[l]
//   Gh[l, s]   = (dy[l] . xd[s]) * Lmat[l, s]
//   dCB[l, s]  = sum over the heads h of the group of Gh[l, s]
//   W[l, s]    = Gh[l, s] * CB[l, s] for s < l (0 on and above the diagonal, which gets no gradient)
//   dcs[l]     = sum_s W[l, s] - sum_l' W[l', l]
// M is rounded to the element type before its products (as the LibTorch path rounds CB ∘ Lmat to the GEMM dtype);
// every sum and product accumulates in fp32.
//
// Layouts (contiguous, row-major): cb (B, G, nc, L, L) and xd, dy (B, T, H, P) in the element type (fp32, bf16 or
// fp16); cs (B, H, nc, L) fp32; y, dxd (B, T, H, P) fp32 (written); dcb (B, G, nc, L, L) fp32 (written where s <= l
// only: the caller zeroes it); dcs (B, H, nc, L) fp32 (accumulated: the caller zeroes it).
//
// STATUS: passed tests/mixers/ssd_intra_gpu_test.cpp on the H200 (2026-11-29, session 7); core/mixers/ssd.cpp takes
// them by default on CUDA (ABLATE_SSD_FUSED=0 or ssd_set_fused_enabled(false) turns them off). Design notes at the top
// of kernels/ssd_intra_cuda.cu; measurements in bench/RESULTS.md (K3, session 7).
#pragma once
#include <cstdint>

#include "kernels/nsa_select.h"  // NsaDtype: fp32 / bf16 / fp16

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct SsdIntraShape {
  int64_t B = 0, nc = 0, L = 0, H = 0, G = 0, P = 0;
  NsaDtype dtype = NsaDtype::kF32;
};

struct SsdIntraFwdArgs {
  SsdIntraShape s;
  const void* cb = nullptr;
  const void* xd = nullptr;
  const float* cs = nullptr;
  float* y = nullptr;
};

struct SsdIntraBwdArgs {
  SsdIntraShape s;
  const void* cb = nullptr;
  const void* xd = nullptr;
  const float* cs = nullptr;
  const void* dy = nullptr;
  float* dxd = nullptr;
  float* dcb = nullptr;  // zeroed by the caller (entries above the diagonal are not written)
  float* dcs = nullptr;  // zeroed by the caller (accumulated)
};

// Plain C++ loops over fp32 data (dtype must be kF32): the oracle of the kernels, same math, different summation order.
void ssd_intra_forward_ref(const SsdIntraFwdArgs& a);
void ssd_intra_backward_ref(const SsdIntraBwdArgs& a);

// What the kernels take: chunk length a multiple of 64, head dim 64 or 128, whole groups, and a grid within CUDA's
// limits (chunks and batch x heads at most 65535 each).
inline bool ssd_intra_cuda_supports(const SsdIntraShape& s) {
  return s.B > 0 && s.nc > 0 && s.nc <= 65535 && s.H > 0 && s.G > 0 && s.H % s.G == 0 && s.B * s.H <= 65535 &&
         s.L > 0 && s.L % 64 == 0 && (s.P == 64 || s.P == 128);
}

#if ABLATE_WITH_CUDA
// cudaErrorInvalidValue for a shape ssd_intra_cuda_supports refuses (or bf16/fp16 on a device older than sm_80),
// else the launch status. All work goes to `stream`.
cudaError_t ssd_intra_forward_cuda(const SsdIntraFwdArgs& a, cudaStream_t stream);
// Writes dxd and dcb and adds into dcs (two kernels).
cudaError_t ssd_intra_backward_cuda(const SsdIntraBwdArgs& a, cudaStream_t stream);
// Whether the current device can run the kernels for this dtype (bf16/fp16 need sm_80+ tensor cores).
bool ssd_intra_cuda_device_ok(NsaDtype dtype);
#endif

}  // namespace ablate::kernels
