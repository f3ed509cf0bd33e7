// Mamba2 state-space duality (SSD) scan as pure LibTorch functions (any device, autograd through ATen ops).
//
// Per batch b, head h (with group g = h / (H/G)) and step t, with state S_t of shape (P, N):
//   S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T        (x_t: P, B_t: N)
//   y_t = S_t C_t                                               (the D skip is added by the caller)
// ssd_chunked computes the same thing as ssd_sequential with the chunked SSD algorithm of Dao & Gu (2024),
// "Transformers are SSMs", section 6 / mamba_ssm's ssd_minimal_discrete: a quadratic, attention-like form inside
// each chunk and a scalar-decay recurrence over chunk states between chunks.
//
// Shapes: x (B,T,H,P), dt (B,T,H) (already softplus-ed, > 0), A (H) (negative), B and C (B,T,G,N) with H % G == 0,
// initial_state (B,H,P,N) or undefined (zeros). States use mamba_ssm's (B,H,P,N) layout.
// Returns (y (B,T,H,P) in x's dtype, final_state (B,H,P,N) in the compute dtype).
// Compute dtype: fp64 for fp64 inputs, fp32 otherwise. GEMM operands: bf16/fp16 for bf16/fp16 x (fp32 accumulation,
// as under autocast and in mamba_ssm's kernels: core/mixers/half_gemms.h), or autocast's dtype when it is on; decays
// and elementwise products always in the compute dtype.
#pragma once
#include <torch/torch.h>

#include <tuple>

namespace ablate::core {

// Numerically safe segment sum over the last dimension of x (..., L):
//   out[..., i, j] = sum_{j < k <= i} x[..., k]   for j <= i,   -inf for j > i.
// Built by a masked cumsum (no differences of large cumulative sums, which lose precision), so exp(out) is the
// lower-triangular decay matrix with exact zeros above the diagonal and never overflows when x <= 0.
torch::Tensor segment_sum(const torch::Tensor& x);

// The lower-triangular decay matrix from inclusive cumulative log-decays cs (..., L) (non-increasing: every
// per-step log-decay is <= 0):  out[..., l, s] = exp(cs[l] - cs[s]) for s <= l, 0 above the diagonal.
// The same matrix as exp(segment_sum(x)) for cs = cumsum(x), built in three elementwise passes over the L x L
// output instead of segment_sum's five plus an L x L cumsum (the chunked scans' largest tensors: at T 32K,
// 32 heads and chunk 256, 1 GB each in fp32). The price: cs[l] - cs[s] carries the rounding of the cumulative sums,
// about sqrt(L) ulp(|cs|) in the exponent, i.e. a relative error near 1e-4 in fp32 for |cs| in the hundreds — far
// below bf16's resolution; mamba_ssm and fla build their decays the same way.
torch::Tensor decay_matrix(const torch::Tensor& cs);

std::tuple<torch::Tensor, torch::Tensor> ssd_chunked(const torch::Tensor& x, const torch::Tensor& dt,
                                                     const torch::Tensor& A, const torch::Tensor& B,
                                                     const torch::Tensor& C, int64_t chunk_size,
                                                     const torch::Tensor& initial_state = torch::Tensor());

// The intra-chunk term of ssd_chunked on fused CUDA kernels (kernels/ssd_intra.h), which never materialise per-head
// L x L tensors: taken for CUDA tensors with a chunk size that is a multiple of 64, head dim 64 or 128 and a GEMM dtype
// of fp32/bf16/fp16; otherwise (and on CPU) the LibTorch composition. On unless ABLATE_SSD_FUSED=0 (read once) or
// ssd_set_fused_enabled(false); ssd_fused_calls() counts the forward calls that took the kernels.
void ssd_set_fused_enabled(bool enabled);
bool ssd_fused_enabled();
int64_t ssd_fused_calls();

// The plain per-step recurrence above (a loop over T); the reference for the tests.
std::tuple<torch::Tensor, torch::Tensor> ssd_sequential(const torch::Tensor& x, const torch::Tensor& dt,
                                                        const torch::Tensor& A, const torch::Tensor& B,
                                                        const torch::Tensor& C,
                                                        const torch::Tensor& initial_state = torch::Tensor());

}  // namespace ablate::core
