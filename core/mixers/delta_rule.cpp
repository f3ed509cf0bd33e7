#include "core/mixers/delta_rule.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>

#include "core/mixers/half_gemms.h"
#include "core/mixers/ssd.h"  // decay_matrix
#include "core/mixers/unit_lower_inverse.h"

namespace ablate::core {
namespace {

namespace F = torch::nn::functional;

struct DeltaDims {
  int64_t batch, seqlen, heads, dk, dv;
};

DeltaDims check_delta_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& g, const torch::Tensor& beta, const torch::Tensor& initial_state) {
  TORCH_CHECK(q.dim() == 4, "gated_delta_rule: q must be (B,T,H,K), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "gated_delta_rule: k must have q's shape ", q.sizes(), ", got ", k.sizes());
  const DeltaDims d{q.size(0), q.size(1), q.size(2), q.size(3), v.dim() == 4 ? v.size(3) : -1};
  TORCH_CHECK(d.seqlen > 0, "gated_delta_rule: sequence length must be positive, got q ", q.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == d.batch && v.size(1) == d.seqlen && v.size(2) == d.heads,
              "gated_delta_rule: v must be (B,T,H,V) with (B,T,H) = (", d.batch, ",", d.seqlen, ",", d.heads, "), got ",
              v.sizes());
  const std::vector<int64_t> bth{d.batch, d.seqlen, d.heads};
  TORCH_CHECK(g.sizes() == bth, "gated_delta_rule: g must be (B,T,H) = ", c10::IntArrayRef(bth), ", got ", g.sizes());
  TORCH_CHECK(beta.sizes() == bth, "gated_delta_rule: beta must be (B,T,H) = ", c10::IntArrayRef(bth), ", got ",
              beta.sizes());
  TORCH_CHECK(
      q.device() == k.device() && q.device() == v.device() && q.device() == g.device() && q.device() == beta.device(),
      "gated_delta_rule: all inputs must be on one device");
  if (initial_state.defined()) {
    const std::vector<int64_t> want{d.batch, d.heads, d.dk, d.dv};
    TORCH_CHECK(initial_state.sizes() == want,
                "gated_delta_rule: initial_state must be (B,H,K,V) = ", c10::IntArrayRef(want), ", got ",
                initial_state.sizes());
  }
  return d;
}

torch::ScalarType compute_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

double resolve_scale(double scale, int64_t dk) { return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(dk)); }

// (B,T,H,...) -> (B,H,Tp,...) in the compute dtype, zero-padded in time. Padded steps have g = 0 (no decay),
// beta = 0 and k = 0, so they leave the state untouched and the final state is exact.
torch::Tensor to_heads_padded(const torch::Tensor& t, int64_t Tp, torch::ScalarType ct) {
  auto x = t.to(ct).transpose(1, 2);
  const int64_t pad = Tp - x.size(2);
  if (pad == 0) return x;
  std::vector<int64_t> p(2 * (x.dim() - 3), 0);
  p.push_back(0);
  p.push_back(pad);
  return F::pad(x, F::PadFuncOptions(p));
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> gated_delta_rule_chunked(const torch::Tensor& q, const torch::Tensor& k,
                                                                  const torch::Tensor& v, const torch::Tensor& g,
                                                                  const torch::Tensor& beta, int64_t chunk_size,
                                                                  double scale, const torch::Tensor& initial_state) {
  return gated_delta_rule_chunked_with(ChunkScanImpl::kAuto, q, k, v, g, beta, chunk_size, scale, initial_state);
}

std::tuple<torch::Tensor, torch::Tensor> gated_delta_rule_chunked_with(ChunkScanImpl impl, const torch::Tensor& q,
                                                                       const torch::Tensor& k, const torch::Tensor& v,
                                                                       const torch::Tensor& g,
                                                                       const torch::Tensor& beta, int64_t chunk_size,
                                                                       double scale,
                                                                       const torch::Tensor& initial_state) {
  const auto d = check_delta_inputs(q, k, v, g, beta, initial_state);
  TORCH_CHECK(chunk_size > 0, "gated_delta_rule_chunked: chunk_size must be positive, got ", chunk_size);
  const HalfInputGemms half_gemms(v);  // bf16/fp16 v: GEMMs in that dtype, as under autocast
  const auto ct = compute_dtype(v);
  const int64_t L = chunk_size, nc = (d.seqlen + L - 1) / L, Tp = nc * L;
  const int64_t Bn = d.batch, H = d.heads, K = d.dk, V = d.dv;

  // (b,h,c,l,·) layout.
  const auto qc = (to_heads_padded(q, Tp, ct) * resolve_scale(scale, K)).reshape({Bn, H, nc, L, K});
  const auto kc = to_heads_padded(k, Tp, ct).reshape({Bn, H, nc, L, K});
  const auto vc = to_heads_padded(v, Tp, ct).reshape({Bn, H, nc, L, V});
  const auto gc = to_heads_padded(g, Tp, ct).reshape({Bn, H, nc, L});
  const auto bc = to_heads_padded(beta, Tp, ct).reshape({Bn, H, nc, L}).unsqueeze(-1);

  // gamma_l = sum_{k <= l} g_k (log-decay from the chunk start), M[l,s] = exp(gamma_l - gamma_s) for s <= l
  // (zero above the diagonal; never exp of a positive number): decay_matrix in ssd.h.
  const auto gamma = torch::cumsum(gc, -1);
  const auto M = decay_matrix(gamma);  // (b,h,c,l,s)

  // Unrolling the recurrence inside a chunk from its entering state S0 gives
  //   S_l = e^{gamma_l} S0 + sum_{s<=l} M[l,s] k_s u_s^T,
  //   u_l + beta_l sum_{s<l} M[l,s] (k_l·k_s) u_s = beta_l v_l - beta_l e^{gamma_l} S0^T k_l,
  // i.e. (I + A) U = diag(beta) V - diag(beta e^gamma) K S0 with A strictly lower triangular. Solving once per
  // chunk for both right-hand sides (the UT transform) gives U = U~ - W S0 with
  //   W = (I + A)^{-1} diag(beta e^gamma) K,   U~ = (I + A)^{-1} diag(beta) V.
  const auto kb = kc * bc;
  const auto A = torch::tril(torch::matmul(kb, kc.transpose(-1, -2)) * M, -1);
  const auto rhs = torch::cat({kb * torch::exp(gamma).unsqueeze(-1), vc * bc}, -1);  // (b,h,c,l,K+V)
  // Solve (I + A) X = rhs (the zero diagonal of A read as ones). On CUDA (fp32, L <= 64) through the inverse
  // kernel and one GEMM: cuBLAS's batched trsm took 2.4 ms at 32K x 16 heads on the H200, forward and backward each.
  torch::Tensor X;
  const bool fast_path = impl == ChunkScanImpl::kAuto || impl == ChunkScanImpl::kKernel;
  if (fast_path && unit_lower_inverse_kernel_applies(A)) {
    const auto T = unit_lower_inverse(A, /*use_kernel=*/true);
    // In fp32 like the solve, also under autocast: T's entries grow with the overlaps of a chunk's keys.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    X = torch::matmul(T, rhs);
  } else {
    X = torch::linalg_solve_triangular(A, rhs, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  }
  const auto W = X.narrow(-1, 0, K);
  const auto Ut = X.narrow(-1, K, V);

  // o_l = e^{gamma_l} S0^T q_l + sum_{s<=l} M[l,s] (q_l·k_s) u_s.
  const auto Aqk = torch::matmul(qc, kc.transpose(-1, -2)) * M;  // lower incl. diagonal
  const auto q_decayed = qc * torch::exp(gamma).unsqueeze(-1);
  // S_end = e^{gamma_{L-1}} S0 + sum_s exp(gamma_{L-1} - gamma_s) k_s u_s^T; the decay to the chunk end is the
  // last row of M.
  const auto k_to_end = kc * M.select(-2, L - 1).unsqueeze(-1);
  const auto chunk_decay = torch::exp(gamma.select(-1, L - 1));  // (b,h,c)
  const auto S0 = initial_state.defined() ? initial_state.to(ct) : torch::zeros({Bn, H, K, V}, vc.options());

  torch::Tensor o, S;
  if (impl == ChunkScanImpl::kAutogradLoop) {
    // The original form: one state update and one output block per chunk, all recorded by autograd.
    const auto cd = chunk_decay.unsqueeze(-1).unsqueeze(-1);
    S = S0;
    std::vector<torch::Tensor> outs;
    outs.reserve(nc);
    for (int64_t c = 0; c < nc; ++c) {
      const auto U = Ut.select(2, c) - torch::matmul(W.select(2, c), S);  // (b,h,l,V)
      outs.push_back(torch::matmul(q_decayed.select(2, c), S) + torch::matmul(Aqk.select(2, c), U));
      S = cd.select(2, c) * S + torch::matmul(k_to_end.select(2, c).transpose(-1, -2), U);
    }
    o = torch::stack(outs, 2);
  } else {
    // U_c = Ut_c - W_c S_c and S_{c+1} = decay_c S_c + k_to_end_c^T U_c in one op; outputs batched over chunks.
    auto [S_in, U, S_final] = chunk_state_scan(Ut, W, k_to_end, chunk_decay, S0, impl);
    o = torch::matmul(q_decayed, S_in) + torch::matmul(Aqk, U);  // (b,h,c,l,V)
    S = S_final;
  }
  o = o.reshape({Bn, H, Tp, V}).narrow(2, 0, d.seqlen).transpose(1, 2);
  return {o.to(v.scalar_type()), S};
}

std::tuple<torch::Tensor, torch::Tensor> gated_delta_rule_sequential(const torch::Tensor& q, const torch::Tensor& k,
                                                                     const torch::Tensor& v, const torch::Tensor& g,
                                                                     const torch::Tensor& beta, double scale,
                                                                     const torch::Tensor& initial_state) {
  const auto d = check_delta_inputs(q, k, v, g, beta, initial_state);
  const auto ct = compute_dtype(v);
  const auto qf = q.to(ct) * resolve_scale(scale, d.dk);
  const auto kf = k.to(ct);
  const auto vf = v.to(ct);
  const auto alpha = torch::exp(g.to(ct));
  const auto bf = beta.to(ct);
  auto S = initial_state.defined() ? initial_state.to(ct) : torch::zeros({d.batch, d.heads, d.dk, d.dv}, vf.options());
  std::vector<torch::Tensor> outs;
  outs.reserve(d.seqlen);
  for (int64_t t = 0; t < d.seqlen; ++t) {
    const auto kt = kf.select(1, t);                         // (B,H,K)
    S = S * alpha.select(1, t).unsqueeze(-1).unsqueeze(-1);  // S'_{t-1}
    const auto pred = (S * kt.unsqueeze(-1)).sum(-2);        // S'^T k_t: (B,H,V)
    const auto u = bf.select(1, t).unsqueeze(-1) * (vf.select(1, t) - pred);
    S = S + kt.unsqueeze(-1) * u.unsqueeze(-2);
    outs.push_back((S * qf.select(1, t).unsqueeze(-1)).sum(-2));  // S_t^T q_t
  }
  return {torch::stack(outs, 1).to(v.scalar_type()), S};
}

}  // namespace ablate::core
