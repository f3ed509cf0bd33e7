// The sequential part of the chunked gated delta rule (gated_delta_rule_chunked in delta_rule.h) as one autograd op.
//
// Per (batch, head), over chunks c = 0 .. C-1 of L steps, with S_0 = S0:
//   U_c     = Ut_c - W_c S_c                    (L x V)
//   S_{c+1} = decay_c S_c + Kend_c^T U_c        (K x V)
// Returns (S_in (B,H,C,K,V): S_c, the state entering chunk c;  U (B,H,C,L,V);  S_final = S_C (B,H,K,V)).
// Inputs: Ut (B,H,C,L,V), W and Kend (B,H,C,L,K), decay (B,H,C), S0 (B,H,K,V), one dtype and device.
//
// The backward is written by hand: with G_C = dS_final, walking c = C-1 .. 0,
//   dUt_c = dU_c + Kend_c G_{c+1}               (the total gradient of U_c)
//   G_c   = decay_c G_{c+1} - W_c^T dUt_c + dS_in_c
// then dS0 = G_0, and batched over all chunks afterwards
//   dW_c = -dUt_c S_c^T,  dKend_c = U_c G_{c+1}^T,  ddecay_c = <S_c, G_{c+1}>.
// Only the two walks are sequential; each runs either as a LibTorch loop over the chunks (any device and dtype)
// or as one CUDA kernel (kernels/chunk_state_scan.h: fp32 CUDA tensors, ABLATE_WITH_CUDA builds).
#pragma once
#include <torch/torch.h>

#include <tuple>

namespace ablate::core {

enum class ChunkScanImpl {
  kAuto,          // the CUDA kernel where chunk_state_scan_kernel_applies, else kTorch
  kTorch,         // the custom op, both walks as LibTorch loops over the chunks
  kKernel,        // the custom op, both walks as CUDA kernels (an error where they do not apply)
  kAutogradLoop,  // no custom op: the forward loop recorded by autograd (the reference)
};

// Whether the CUDA kernels take tensors like t (fp32 on a CUDA device, built with CUDA) for these sizes.
bool chunk_state_scan_kernel_applies(const torch::Tensor& t, int64_t chunk_len, int64_t dk);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> chunk_state_scan(const torch::Tensor& Ut,
                                                                         const torch::Tensor& W,
                                                                         const torch::Tensor& Kend,
                                                                         const torch::Tensor& decay,
                                                                         const torch::Tensor& S0,
                                                                         ChunkScanImpl impl = ChunkScanImpl::kAuto);

}  // namespace ablate::core
