// Gated delta rule (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks") as pure LibTorch functions.
//
// Per batch b, head h and step t, with state S of shape (K, V), alpha_t = exp(g_t) in (0, 1]:
//   S'_{t-1} = alpha_t S_{t-1}
//   u_t      = beta_t (v_t - S'_{t-1}^T k_t)
//   S_t      = S'_{t-1} + k_t u_t^T            ( = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T )
//   o_t      = S_t^T (scale * q_t)
// q and k are expected to be L2-normalised by the caller (the mixer does it); nothing here normalises them.
//
// Shapes: q, k (B,T,H,K); v (B,T,H,V); g (log-decay, <= 0) and beta (B,T,H); initial_state (B,H,K,V) or undefined.
// Returns (o (B,T,H,V) in v's dtype, final_state (B,H,K,V) in the compute dtype: fp64 for fp64 inputs, else fp32).
// GEMM operands are bf16/fp16 for bf16/fp16 v (fp32 accumulation, as under autocast and in fla's kernels:
// core/mixers/half_gemms.h), decays, the triangular solve and the chunk-state scan in the compute dtype.
// scale <= 0 means 1/sqrt(K).
#pragma once
#include <torch/torch.h>

#include <tuple>

#include "core/mixers/chunk_state_scan.h"

namespace ablate::core {

// The chunked WY/UT-transform form (flash-linear-attention's chunk_gated_delta_rule): inside each chunk the
// pseudo-values u solve a unit-lower-triangular system, then a sequential recurrence runs over the chunks only
// (chunk_state_scan: one CUDA kernel per direction for fp32 CUDA tensors); the outputs are batched over chunks.
// T need not be a multiple of chunk_size (zero-padded internally, cropped).
std::tuple<torch::Tensor, torch::Tensor> gated_delta_rule_chunked(const torch::Tensor& q, const torch::Tensor& k,
                                                                  const torch::Tensor& v, const torch::Tensor& g,
                                                                  const torch::Tensor& beta, int64_t chunk_size = 64,
                                                                  double scale = -1.0,
                                                                  const torch::Tensor& initial_state = torch::Tensor());

// gated_delta_rule_chunked with the chunk scan's implementation chosen (tests and benchmarks): kAuto is what
// gated_delta_rule_chunked does; kAutogradLoop runs the original per-chunk loop (state update and outputs per chunk)
// under autograd.
std::tuple<torch::Tensor, torch::Tensor> gated_delta_rule_chunked_with(
    ChunkScanImpl impl, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& g,
    const torch::Tensor& beta, int64_t chunk_size = 64, double scale = -1.0,
    const torch::Tensor& initial_state = torch::Tensor());

// The per-step recurrence above (a loop over T); the reference for the tests.
std::tuple<torch::Tensor, torch::Tensor> gated_delta_rule_sequential(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& g,
    const torch::Tensor& beta, double scale = -1.0, const torch::Tensor& initial_state = torch::Tensor());

}  // namespace ablate::core
