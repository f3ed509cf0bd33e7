// Native Sparse Attention: see nsa.h for the algorithm and layouts.
//
// Implementation notes.
// - All three branches run on "group layout": queries of one chunk as (B, KV, C, G, hd), so the G heads of a
//   GQA group share one K/V tile (and, for the selected branch, one gathered set of blocks).
// - cmp and swa use keys shared by the whole chunk (K: (B, KV, L, hd)); slc gathers per query
//   (K: (B, KV, C, n*l', hd)). The chunk size is chosen so that neither scores nor gathered K/V exceed
//   `chunk_budget` elements.
// - Backward recomputes scores and probabilities chunk by chunk from the saved inputs (FlashAttention's
//   dS = P * (dP - rowsum(P * dP))); nothing per chunk is kept between forward and backward.
// - On CUDA the selected branch runs the kernels of kernels/nsa_select.h instead (no gathered K/V at all):
//   query-centric forward and dq, key-centric dk/dv over an inverse index built here with sort/bincount/cumsum.
// - On CUDA the sliding-window branch runs FlashAttention-2's local mode (bf16/fp16; ABLATE_NSA_SWA_FLASH=0 turns it
//   off), else SDPA's fused kernels (chunked, band mask, autograd) when SDPA picks a fused backend for it.
// - The compressed branch is the LibTorch Function below unless the fused kernels of kernels/nsa_compress.h are
//   switched off (ABLATE_NSA_CMP_FUSED=0 / nsa_set_cmp_fused_enabled(false); on by default since the H200 run of
//   2026-11-29: GPU test passed, 3.7x faster fwd+bwd at 32K, see bench/RESULTS.md):
//   online-softmax forward writing o and lse, then per query chunk the importance recomputed from lse and the same
//   nsa_select_blocks top-n; backward dq query-centric and dkc/dvc key-centric from the saved lse.
#include "core/mixers/nsa.h"
#include "core/mixers/param_init.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include <ATen/SDPBackend.h>

#include "core/ops/kernel_dispatch.h"
#include "kernels/nsa_compress.h"
#include "kernels/nsa_select.h"

#if ABLATE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::core {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kInf = std::numeric_limits<double>::infinity();

std::atomic<int64_t> g_max_chunk_numel{0};
std::atomic<bool> g_slc_kernels{true};
std::atomic<bool> g_swa_sdpa{true};
std::atomic<int64_t> g_swa_flash_calls{0};

// FlashAttention-2's local mode for the window branch: on by default since its GPU test passed on the H200
// (2026-11-30; fwd+bwd 3.4 ms vs 19.6 ms through SDPA at 32K, bench/RESULTS.md); ABLATE_NSA_SWA_FLASH=0 (read once) or
// nsa_set_swa_flash_enabled(false) turns it off.
std::atomic<bool>& swa_flash_switch() {
  static std::atomic<bool> on{ops::env_switch_default("ABLATE_NSA_SWA_FLASH", /*unset=*/true)};
  return on;
}
std::atomic<int64_t> g_cmp_fused_calls{0};

// The fused compressed-branch kernels: on unless ABLATE_NSA_CMP_FUSED=0 (read once) or nsa_set_cmp_fused_enabled.
std::atomic<bool>& cmp_fused_switch() {
  static std::atomic<bool> on{ops::env_switch_default("ABLATE_NSA_CMP_FUSED")};
  return on;
}

void note_chunk(const Tensor& t) {
  const int64_t n = t.numel();
  int64_t cur = g_max_chunk_numel.load(std::memory_order_relaxed);
  while (n > cur && !g_max_chunk_numel.compare_exchange_weak(cur, n, std::memory_order_relaxed)) {
  }
}

// Softmax statistics in fp32 for half/bf16 inputs; fp32/fp64 stay as they are (fp64 for gradient checks).
c10::ScalarType acc_type(c10::ScalarType t) {
  return (t == torch::kHalf || t == torch::kBFloat16) ? torch::kFloat : t;
}

// Softmax over the last dim restricted to `mask`; rows without an allowed entry give zeros, never NaN.
Tensor masked_softmax(const Tensor& s, const Tensor& mask) {
  auto sm = s.masked_fill(mask.logical_not(), -kInf);
  auto m = std::get<0>(sm.max(-1, /*keepdim=*/true));
  m = m.masked_fill(torch::isinf(m), 0.0);  // -inf only on empty rows
  auto e = (sm - m).exp();
  // A non-empty row sums to >= 1 (its max contributes exp(0)), so the clamp only changes empty rows.
  return e / e.sum(-1, true).clamp_min(1.0);
}

// (B, C, H, hd) -> (B, KV, C, G, hd), contiguous.
Tensor to_group(const Tensor& t, int64_t kv) {
  const auto B = t.size(0), C = t.size(1), H = t.size(2), hd = t.size(3);
  return t.reshape({B, C, kv, H / kv, hd}).permute({0, 2, 1, 3, 4}).contiguous();
}

// (B, KV, C, G, hd) -> (B, C, H, hd).
Tensor from_group(const Tensor& t) {
  const auto B = t.size(0), KV = t.size(1), C = t.size(2), G = t.size(3), hd = t.size(4);
  return t.permute({0, 2, 1, 3, 4}).reshape({B, C, KV * G, hd});
}

// qg (B, KV, C, G, hd); K shared (B, KV, L, hd) or per query (B, KV, C, L, hd) -> scaled scores (B, KV, C, G, L)
// in the accumulation dtype.
Tensor chunk_scores(const Tensor& qg, const Tensor& K, bool shared, double scale) {
  const auto B = qg.size(0), KV = qg.size(1), C = qg.size(2), G = qg.size(3), hd = qg.size(4);
  const auto L = K.size(-2);
  Tensor s = shared ? torch::matmul(qg.reshape({B, KV, C * G, hd}), K.transpose(-1, -2)).view({B, KV, C, G, L})
                    : torch::matmul(qg, K.transpose(-1, -2));
  note_chunk(s);
  return s.to(acc_type(qg.scalar_type())) * scale;
}

// p (B, KV, C, G, L) @ V -> (B, KV, C, G, hd).
Tensor chunk_apply(const Tensor& p, const Tensor& V, bool shared) {
  const auto B = p.size(0), KV = p.size(1), C = p.size(2), G = p.size(3), L = p.size(4);
  const auto hd = V.size(-1);
  auto pv = p.to(V.scalar_type());
  return shared ? torch::matmul(pv.reshape({B, KV, C * G, L}), V).view({B, KV, C, G, hd}) : torch::matmul(pv, V);
}

struct ChunkGrads {
  Tensor dq, dK, dV;
};

// Recomputes P for the chunk and returns the gradients w.r.t. qg and the chunk's K/V (same shapes as K/V).
ChunkGrads chunk_backward(const Tensor& qg, const Tensor& K, const Tensor& V, const Tensor& mask, bool shared,
                          double scale, const Tensor& dog) {
  const auto B = qg.size(0), KV = qg.size(1), C = qg.size(2), G = qg.size(3), hd = qg.size(4);
  const auto L = K.size(-2);
  const auto dt = qg.scalar_type();
  auto p = masked_softmax(chunk_scores(qg, K, shared, scale), mask);
  Tensor dp = shared ? torch::matmul(dog.reshape({B, KV, C * G, hd}), V.transpose(-1, -2)).view({B, KV, C, G, L})
                     : torch::matmul(dog, V.transpose(-1, -2));
  dp = dp.to(p.scalar_type());
  auto ds = (p * (dp - (p * dp).sum(-1, true)) * scale).to(dt);
  auto pd = p.to(dt);
  ChunkGrads g;
  if (shared) {
    auto ds2 = ds.reshape({B, KV, C * G, L});
    g.dq = torch::matmul(ds2, K).view({B, KV, C, G, hd});
    g.dK = torch::matmul(ds2.transpose(-1, -2), qg.reshape({B, KV, C * G, hd}));
    g.dV = torch::matmul(pd.reshape({B, KV, C * G, L}).transpose(-1, -2), dog.reshape({B, KV, C * G, hd}));
  } else {
    g.dq = torch::matmul(ds, K);
    g.dK = torch::matmul(ds.transpose(-1, -2), qg);
    g.dV = torch::matmul(pd.transpose(-1, -2), dog);
  }
  return g;
}

// Largest chunk <= query_chunk whose per-chunk intermediates (per_query elements each) fit the budget.
int64_t pick_chunk(int64_t per_query, const NsaAttentionOptions& o, int64_t T) {
  const int64_t c = o.chunk_budget() / std::max<int64_t>(1, per_query);
  return std::clamp<int64_t>(std::min(c, o.query_chunk()), 1, std::max<int64_t>(T, 1));
}

// ---- autograd plumbing: the options travel through saved_data ----

void save_options(AutogradContext* ctx, const NsaAttentionOptions& o) {
  ctx->saved_data["ints"] = std::vector<int64_t>{
      o.d_model(),      o.num_heads(),    o.num_kv_heads(),    o.head_dim(),         o.cmp_block(),
      o.cmp_stride(),   o.cmp_hidden(),   o.slc_block(),       o.num_selected(),     o.num_init_blocks(),
      o.num_local_blocks(), o.window(),   o.query_chunk(),     o.chunk_budget()};
  ctx->saved_data["scale"] = o.softmax_scale();
}

NsaAttentionOptions load_options(AutogradContext* ctx) {
  const auto v = ctx->saved_data["ints"].toIntVector();
  NsaAttentionOptions o(v[0], v[1], v[2], v[3]);
  o.cmp_block(v[4]).cmp_stride(v[5]).cmp_hidden(v[6]).slc_block(v[7]).num_selected(v[8]);
  o.num_init_blocks(v[9]).num_local_blocks(v[10]).window(v[11]).query_chunk(v[12]).chunk_budget(v[13]);
  o.softmax_scale(ctx->saved_data["scale"].toDouble());
  return o;
}

// ---- compressed branch ----

// Compressed blocks visible to query t: j*d + l - 1 <= t.
int64_t cmp_visible(int64_t t, const NsaAttentionOptions& o, int64_t nc) {
  if (t < o.cmp_block() - 1) return 0;
  return std::min(nc, (t - o.cmp_block() + 1) / o.cmp_stride() + 1);
}

Tensor cmp_mask(int64_t t0, int64_t t1, int64_t ne, const NsaAttentionOptions& o, torch::Device dev) {
  auto opt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  auto t = torch::arange(t0, t1, opt).view({-1, 1});
  auto j = torch::arange(ne, opt).view({1, -1});
  return (j * o.cmp_stride() + (o.cmp_block() - 1) <= t).view({1, 1, t1 - t0, 1, ne});
}

int64_t cmp_chunk(int64_t B, int64_t H, int64_t nc, const NsaAttentionOptions& o, int64_t T) {
  return pick_chunk(B * H * std::max<int64_t>(nc, 1), o, T);
}

// ---- compressed branch on the fused CUDA kernels (kernels/nsa_compress.h; CUDA build only) ----
#if ABLATE_WITH_CUDA

Tensor kernel_operand(const Tensor& t);  // selected branch, below

// Switch on, CUDA build, CUDA tensors of one fp32/bf16/fp16 dtype, head_dim 64/128, G <= 16, a device that runs them.
bool cmp_kernel_takes(const Tensor& q, const Tensor& kc, const Tensor& vc, const NsaAttentionOptions& o) {
  if (!ops::kHaveCudaKernels || !q.is_cuda() || !cmp_fused_switch().load()) return false;
  const auto st = q.scalar_type();
  if (st != torch::kFloat && st != torch::kBFloat16 && st != torch::kHalf) return false;
  if (kc.scalar_type() != st || vc.scalar_type() != st || kc.device() != q.device() || vc.device() != q.device()) {
    return false;
  }
  if (q.size(1) >= (int64_t{1} << 31)) return false;
  if (!kernels::nsa_cmp_cuda_supports(o.head_dim(), o.num_heads() / o.num_kv_heads())) return false;
  const c10::cuda::CUDAGuard guard(q.device());
  return kernels::nsa_cmp_cuda_device_ok(ops::kernel_dtype(st));
}

kernels::NsaCmpShape cmp_shape(const Tensor& q, const Tensor& kc, const NsaAttentionOptions& o) {
  kernels::NsaCmpShape s;
  s.B = q.size(0);
  s.T = q.size(1);
  s.H = o.num_heads();
  s.KV = o.num_kv_heads();
  s.head_dim = o.head_dim();
  s.num_cmp = kc.size(1);
  s.cmp_block = o.cmp_block();
  s.cmp_stride = o.cmp_stride();
  s.slc_block = o.slc_block();
  s.scale = static_cast<float>(o.scale());
  s.dtype = ops::kernel_dtype(q.scalar_type());
  return s;
}

void cmp_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "nsa_compressed_attention ", what, " CUDA kernel: ", cudaGetErrorString(err));
}

// Queries per importance chunk: the (B, KV, C, Ns) fp32 importance (and nsa_select_blocks' temporaries of that size)
// within the chunk budget; whole multiples of 64 queries when the budget allows.
int64_t cmp_importance_chunk(int64_t per_query, const NsaAttentionOptions& o, int64_t T) {
  int64_t c = o.chunk_budget() / std::max<int64_t>(1, per_query);
  if (c >= 64) c -= c % 64;
  return std::clamp<int64_t>(c, 1, std::max<int64_t>(T, 1));
}

// CmpFn's forward on the kernels: o and lse for all queries, then per chunk the importance and the unchanged top-n.
// Saves the kernel operands, o and lse (fp32, B*T*H) for the backward.
variable_list cmp_fused_forward(AutogradContext* ctx, const Tensor& q_in, const Tensor& kc_in, const Tensor& vc_in,
                                const NsaAttentionOptions& o) {
  auto q = kernel_operand(q_in), kc = kernel_operand(kc_in), vc = kernel_operand(vc_in);
  const auto B = q.size(0), T = q.size(1), H = q.size(2), KV = o.num_kv_heads();
  const int64_t ns = o.num_slc_blocks(T);
  auto out = torch::empty(q.sizes(), q.options());
  auto lse = torch::empty({B, T, H}, q.options().dtype(torch::kFloat));
  auto idx = torch::empty({B, T, KV, o.num_selected()}, q.options().dtype(torch::kLong));
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernels::NsaCmpFwdArgs a;
  a.s = cmp_shape(q, kc, o);
  a.q = q.data_ptr();
  a.kc = kc.data_ptr();
  a.vc = vc.data_ptr();
  a.o = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  cmp_check(kernels::nsa_cmp_forward_cuda(a, stream), "forward");
  const int64_t C = cmp_importance_chunk(B * KV * std::max<int64_t>(ns, 1), o, T);
  for (int64_t t0 = 0; t0 < T; t0 += C) {
    const int64_t t1 = std::min(T, t0 + C);
    const int64_t ns_c = std::min(ns, (t1 - 1) / o.slc_block() + 1);
    auto imp = torch::zeros({B, KV, t1 - t0, ns_c}, q.options().dtype(torch::kFloat));
    note_chunk(imp);
    kernels::NsaCmpImportanceArgs ia;
    ia.s = a.s;
    ia.q = a.q;
    ia.kc = a.kc;
    ia.lse = a.lse;
    ia.t0 = t0;
    ia.t1 = t1;
    ia.num_cols = ns_c;
    ia.importance = imp.data_ptr<float>();
    cmp_check(kernels::nsa_cmp_importance_cuda(ia, stream), "importance");
    auto tpos = torch::arange(t0, t1, q.options().dtype(torch::kLong));
    idx.slice(1, t0, t1).copy_(nsa_select_blocks(imp, tpos, o).permute({0, 2, 1, 3}));
  }
  g_cmp_fused_calls.fetch_add(1);
  save_options(ctx, o);
  ctx->saved_data["fused"] = true;
  ctx->save_for_backward({q, kc, vc, out, lse});
  ctx->mark_non_differentiable({idx});
  return {out, idx};
}

variable_list cmp_fused_backward(AutogradContext* ctx, const variable_list& grads) {
  const auto o = load_options(ctx);
  const auto saved = ctx->get_saved_variables();
  const auto &q = saved[0], &kc = saved[1], &vc = saved[2], &out = saved[3], &lse = saved[4];
  if (!grads[0].defined()) {
    return {torch::zeros(q.sizes(), q.options()), torch::zeros(kc.sizes(), kc.options()),
            torch::zeros(vc.sizes(), vc.options()), Tensor()};
  }
  auto dout = kernel_operand(grads[0].to(q.scalar_type()));
  auto delta = (dout.to(torch::kFloat) * out.to(torch::kFloat)).sum(-1).contiguous();  // (B, T, H)
  auto dq = torch::empty(q.sizes(), q.options());
  auto dkc = torch::zeros(kc.sizes(), kc.options().dtype(torch::kFloat));
  auto dvc = torch::zeros(vc.sizes(), vc.options().dtype(torch::kFloat));
  kernels::NsaCmpBwdArgs a;
  a.s = cmp_shape(q, kc, o);
  a.q = q.data_ptr();
  a.kc = kc.data_ptr();
  a.vc = vc.data_ptr();
  a.dout = dout.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dkc = dkc.data_ptr<float>();
  a.dvc = dvc.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(q.device());
  cmp_check(kernels::nsa_cmp_backward_cuda(a, c10::cuda::getCurrentCUDAStream()), "backward");
  return {dq, dkc.to(kc.scalar_type()), dvc.to(vc.scalar_type()), Tensor()};
}

#endif  // ABLATE_WITH_CUDA

struct CmpFn : torch::autograd::Function<CmpFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& kc, const Tensor& vc,
                               const NsaAttentionOptions& o) {
#if ABLATE_WITH_CUDA
    if (cmp_kernel_takes(q, kc, vc, o)) return cmp_fused_forward(ctx, q, kc, vc, o);
#endif
    const auto B = q.size(0), T = q.size(1), H = q.size(2);
    const auto KV = kc.size(2), nc = kc.size(1);
    const auto ns = o.num_slc_blocks(T);
    const double scale = o.scale();
    auto kct = kc.permute({0, 2, 1, 3}).contiguous();  // (B, KV, Nc, hd)
    auto vct = vc.permute({0, 2, 1, 3}).contiguous();
    auto out = torch::zeros(q.sizes(), q.options());
    auto idx = torch::empty({B, T, KV, o.num_selected()}, q.options().dtype(torch::kLong));
    const int64_t C = cmp_chunk(B, H, nc, o, T);
    for (int64_t t0 = 0; t0 < T; t0 += C) {
      const int64_t t1 = std::min(T, t0 + C);
      const int64_t ne = cmp_visible(t1 - 1, o, nc);
      const int64_t ns_c = std::min(ns, (t1 - 1) / o.slc_block() + 1);
      Tensor imp;
      if (ne > 0) {
        auto qg = to_group(q.slice(1, t0, t1), KV);
        auto K = kct.slice(2, 0, ne), V = vct.slice(2, 0, ne);
        auto p = masked_softmax(chunk_scores(qg, K, true, scale), cmp_mask(t0, t1, ne, o, q.device()));
        out.slice(1, t0, t1).copy_(from_group(chunk_apply(p, V, true)));
        imp = nsa_cmp_to_slc_importance(p.sum(3), ns_c, o);  // summed over the group: shared selection
      } else {
        imp = torch::zeros({B, KV, t1 - t0, ns_c}, q.options().dtype(acc_type(q.scalar_type())));
      }
      auto tpos = torch::arange(t0, t1, q.options().dtype(torch::kLong));
      idx.slice(1, t0, t1).copy_(nsa_select_blocks(imp, tpos, o).permute({0, 2, 1, 3}));
    }
    save_options(ctx, o);
    ctx->save_for_backward({q, kc, vc});
    ctx->mark_non_differentiable({idx});
    return {out, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
#if ABLATE_WITH_CUDA
    if (ctx->saved_data.count("fused") != 0) return cmp_fused_backward(ctx, grads);
#endif
    const auto o = load_options(ctx);
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &kc = saved[1], &vc = saved[2];
    const auto B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3);
    const auto KV = kc.size(2), nc = kc.size(1);
    const auto acc = q.options().dtype(acc_type(q.scalar_type()));
    auto kct = kc.permute({0, 2, 1, 3}).contiguous();
    auto vct = vc.permute({0, 2, 1, 3}).contiguous();
    auto dq = torch::zeros(q.sizes(), q.options());
    auto dkc = torch::zeros({B, KV, nc, hd}, acc);
    auto dvc = torch::zeros({B, KV, nc, hd}, acc);
    const auto& go = grads[0];
    if (go.defined()) {
      const int64_t C = cmp_chunk(B, H, nc, o, T);
      for (int64_t t0 = 0; t0 < T; t0 += C) {
        const int64_t t1 = std::min(T, t0 + C);
        const int64_t ne = cmp_visible(t1 - 1, o, nc);
        if (ne == 0) continue;  // zero output, zero gradient
        auto g = chunk_backward(to_group(q.slice(1, t0, t1), KV), kct.slice(2, 0, ne), vct.slice(2, 0, ne),
                                cmp_mask(t0, t1, ne, o, q.device()), true, o.scale(),
                                to_group(go.slice(1, t0, t1), KV));
        dq.slice(1, t0, t1).copy_(from_group(g.dq));
        dkc.slice(2, 0, ne).add_(g.dK);
        dvc.slice(2, 0, ne).add_(g.dV);
      }
    }
    return {dq, dkc.permute({0, 2, 1, 3}).to(kc.scalar_type()), dvc.permute({0, 2, 1, 3}).to(vc.scalar_type()),
            Tensor()};
  }
};

// ---- selected branch ----

// (B, T, KV, hd) -> (B*KV*Ns, l'*hd): one row per (batch, kv head, selection block), zero-padded past T.
Tensor to_blocks(const Tensor& k, int64_t ns, int64_t lp) {
  const auto B = k.size(0), T = k.size(1), KV = k.size(2), hd = k.size(3);
  auto kp = torch::constant_pad_nd(k, {0, 0, 0, 0, 0, ns * lp - T});
  return kp.view({B, ns, lp, KV, hd}).permute({0, 3, 1, 2, 4}).contiguous().view({B * KV * ns, lp * hd});
}

// Inverse of to_blocks for gradients: -> (B, T, KV, hd).
Tensor from_blocks(const Tensor& kb, int64_t B, int64_t T, int64_t KV, int64_t hd, int64_t ns, int64_t lp) {
  return kb.view({B, KV, ns, lp, hd}).permute({0, 2, 3, 1, 4}).reshape({B, ns * lp, KV, hd}).slice(1, 0, T);
}

struct SlcGather {
  Tensor K, V;   // (B, KV, C, n*l', hd)
  Tensor mask;   // (B, KV, C, 1, n*l')
  Tensor flat;   // (B*KV*C*n) rows of the block tables
};

SlcGather slc_gather(const Tensor& kb, const Tensor& vb, const Tensor& idx_chunk, int64_t t0, int64_t t1,
                     int64_t B, int64_t KV, int64_t ns, int64_t hd, const NsaAttentionOptions& o) {
  const int64_t C = t1 - t0, n = idx_chunk.size(3), lp = o.slc_block();
  auto lopt = idx_chunk.options();
  auto idc = idx_chunk.permute({0, 2, 1, 3});  // (B, KV, C, n)
  auto base = (torch::arange(B, lopt).view({B, 1, 1, 1}) * KV + torch::arange(KV, lopt).view({1, KV, 1, 1})) * ns;
  SlcGather g;
  g.flat = (base + idc.clamp_min(0)).reshape({-1});  // unused slots read block 0 and are masked out
  g.K = kb.index_select(0, g.flat).view({B, KV, C, n * lp, hd});
  g.V = vb.index_select(0, g.flat).view({B, KV, C, n * lp, hd});
  note_chunk(g.K);
  auto pos = idc.unsqueeze(-1) * lp + torch::arange(lp, lopt);  // (B, KV, C, n, l')
  auto tpos = torch::arange(t0, t1, lopt).view({1, 1, C, 1, 1});
  g.mask = ((idc.unsqueeze(-1) >= 0) & (pos <= tpos)).reshape({B, KV, C, 1, n * lp});
  return g;
}

int64_t slc_chunk(int64_t B, int64_t H, int64_t KV, int64_t hd, const NsaAttentionOptions& o, int64_t T) {
  const int64_t L = o.num_selected() * o.slc_block();
  return pick_chunk(std::max(B * KV * L * hd, B * H * L), o, T);
}

// ---- selected branch on the CUDA kernels ----

// CUDA tensors of fp32/bf16 (kernel_dispatch's rule) or fp16, with a head_dim and group size the kernels take.
bool slc_kernel_takes(const Tensor& q, const NsaAttentionOptions& o) {
  if (!ops::kHaveCudaKernels || !q.is_cuda() || !g_slc_kernels.load()) return false;
  if (!ops::kernel_takes(q.scalar_type(), q.device()) && q.scalar_type() != torch::kHalf) return false;
  return kernels::nsa_select_cuda_supports(o.head_dim(), o.num_heads() / o.num_kv_heads());
}

// Contiguous and 16-byte aligned (the kernels load 16-byte vectors).
Tensor kernel_operand(const Tensor& t) {
  auto c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

kernels::NsaSelectShape slc_shape(const Tensor& q, const NsaAttentionOptions& o) {
  kernels::NsaSelectShape s;
  s.B = q.size(0);
  s.T = q.size(1);
  s.H = o.num_heads();
  s.KV = o.num_kv_heads();
  s.head_dim = o.head_dim();
  s.num_selected = o.num_selected();
  s.block = o.slc_block();
  s.scale = static_cast<float>(o.scale());
  s.dtype = ops::kernel_dtype(q.scalar_type());
  return s;
}

#if ABLATE_WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "nsa_selected_attention ", what, " CUDA kernel: ", cudaGetErrorString(err));
}
#endif

// -> {o (B, T, H, hd) in q's dtype, lse (B, T, H) fp32}. q, k, v, idx: kernel operands.
std::pair<Tensor, Tensor> slc_kernel_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                                             const NsaAttentionOptions& o) {
  auto out = torch::empty(q.sizes(), q.options());
  auto lse = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(torch::kFloat));
#if ABLATE_WITH_CUDA
  kernels::NsaSelectFwdArgs a;
  a.s = slc_shape(q, o);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.block_idx = idx.data_ptr<int64_t>();
  a.o = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(q.device());
  check_cuda(kernels::nsa_select_forward_cuda(a, c10::cuda::getCurrentCUDAStream()), "forward");
#else
  TORCH_CHECK(false, "nsa_selected_attention: this build has no CUDA kernels (ABLATE_WITH_CUDA=OFF)");
#endif
  return {out, lse};
}

// The inverse index for the key-centric dk/dv kernel: the queries that selected each (b, kv head, block), in
// segments of at most nsa_select_seg_queries(G) queries (block 0 and the local blocks are selected by nearly
// every query; segments keep the thread blocks' work bounded).
struct SlcInverse {
  Tensor rows_t, seg_key, seg_start, seg_len;  // int32
  int64_t num_segments = 0;
};

SlcInverse slc_inverse(const Tensor& idx, const NsaAttentionOptions& o) {
  const auto B = idx.size(0), T = idx.size(1), KV = idx.size(2), n = idx.size(3);
  const int64_t ns = o.num_slc_blocks(T), nkeys = B * KV * ns;
  TORCH_CHECK(nkeys < (int64_t{1} << 31) && B * T * KV * n < (int64_t{1} << 31) && T < (int64_t{1} << 31),
              "nsa_selected_attention: too many selection entries for the CUDA kernels' int32 index");
  auto lopt = idx.options().dtype(torch::kLong);
  auto tpos = torch::arange(T, lopt).view({1, T, 1, 1}).expand(idx.sizes());
  auto bc = (torch::arange(B, lopt).view({B, 1, 1, 1}) * KV + torch::arange(KV, lopt).view({1, 1, KV, 1})) * ns;
  auto valid = (idx >= 0) & (idx * o.slc_block() <= tpos);
  auto keys = (bc + idx).masked_select(valid);
  auto ts = tpos.masked_select(valid);
  auto order = std::get<1>(keys.sort(/*stable=*/true, 0, false));
  SlcInverse r;
  r.rows_t = ts.index_select(0, order).to(torch::kInt);
  auto counts = torch::bincount(keys, /*weights=*/{}, nkeys);
  auto offsets = counts.cumsum(0) - counts;
  const int64_t sq = kernels::nsa_select_seg_queries(o.num_heads() / o.num_kv_heads());
  auto nseg = (counts + (sq - 1)).div(sq, "floor");
  r.num_segments = nseg.sum().item<int64_t>();
  auto key_of_seg = torch::repeat_interleave(torch::arange(nkeys, lopt), nseg, /*dim=*/0, r.num_segments);
  auto first_seg = nseg.cumsum(0) - nseg;
  auto within = torch::arange(r.num_segments, lopt) - first_seg.index_select(0, key_of_seg);
  r.seg_key = key_of_seg.to(torch::kInt);
  r.seg_start = (offsets.index_select(0, key_of_seg) + within * sq).to(torch::kInt);
  r.seg_len = torch::clamp_max(counts.index_select(0, key_of_seg) - within * sq, sq).to(torch::kInt);
  return r;
}

// -> {dq, dk, dv}; dk/dv in fp32.
std::vector<Tensor> slc_kernel_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                                        const Tensor& out, const Tensor& lse, const Tensor& go,
                                        const NsaAttentionOptions& o) {
  auto dout = kernel_operand(go.to(q.scalar_type()));
  auto delta = (dout.to(torch::kFloat) * out.to(torch::kFloat)).sum(-1).contiguous();  // (B, T, H)
  auto dq = torch::empty(q.sizes(), q.options());
  auto dk = torch::zeros(k.sizes(), k.options().dtype(torch::kFloat));
  auto dv = torch::zeros(v.sizes(), v.options().dtype(torch::kFloat));
  const auto inv = slc_inverse(idx, o);
#if ABLATE_WITH_CUDA
  kernels::NsaSelectBwdArgs a;
  a.s = slc_shape(q, o);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.block_idx = idx.data_ptr<int64_t>();
  a.dout = dout.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr<float>();
  a.dv = dv.data_ptr<float>();
  a.inv.rows_t = inv.rows_t.data_ptr<int32_t>();
  a.inv.seg_key = inv.seg_key.data_ptr<int32_t>();
  a.inv.seg_start = inv.seg_start.data_ptr<int32_t>();
  a.inv.seg_len = inv.seg_len.data_ptr<int32_t>();
  a.inv.num_segments = inv.num_segments;
  const c10::cuda::CUDAGuard guard(q.device());
  check_cuda(kernels::nsa_select_backward_cuda(a, c10::cuda::getCurrentCUDAStream()), "backward");
#else
  TORCH_CHECK(false, "nsa_selected_attention: this build has no CUDA kernels (ABLATE_WITH_CUDA=OFF)");
#endif
  return {dq, dk, dv};
}

struct SlcFn : torch::autograd::Function<SlcFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                        const NsaAttentionOptions& o) {
    save_options(ctx, o);
    if (slc_kernel_takes(q, o)) {
      auto qc = kernel_operand(q), kc = kernel_operand(k), vc = kernel_operand(v), ic = idx.contiguous();
      auto [out, lse] = slc_kernel_forward(qc, kc, vc, ic, o);
      ctx->saved_data["kernel"] = true;
      ctx->save_for_backward({qc, kc, vc, ic, out, lse});
      return out;
    }
    ctx->saved_data["kernel"] = false;
    const auto B = q.size(0), T = q.size(1), H = q.size(2), KV = k.size(2), hd = k.size(3);
    const auto ns = o.num_slc_blocks(T);
    auto kb = to_blocks(k, ns, o.slc_block()), vb = to_blocks(v, ns, o.slc_block());
    auto out = torch::empty(q.sizes(), q.options());
    const int64_t C = slc_chunk(B, H, KV, hd, o, T);
    for (int64_t t0 = 0; t0 < T; t0 += C) {
      const int64_t t1 = std::min(T, t0 + C);
      auto g = slc_gather(kb, vb, idx.slice(1, t0, t1), t0, t1, B, KV, ns, hd, o);
      auto qg = to_group(q.slice(1, t0, t1), KV);
      auto p = masked_softmax(chunk_scores(qg, g.K, false, o.scale()), g.mask);
      out.slice(1, t0, t1).copy_(from_group(chunk_apply(p, g.V, false)));
    }
    ctx->save_for_backward({q, k, v, idx});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto o = load_options(ctx);
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &idx = saved[3];
    if (ctx->saved_data["kernel"].toBool()) {
      if (!grads[0].defined()) {
        return {torch::zeros(q.sizes(), q.options()), torch::zeros(k.sizes(), k.options()),
                torch::zeros(v.sizes(), v.options()), Tensor(), Tensor()};
      }
      auto g = slc_kernel_backward(q, k, v, idx, saved[4], saved[5], grads[0], o);
      return {g[0], g[1].to(k.scalar_type()), g[2].to(v.scalar_type()), Tensor(), Tensor()};
    }
    const auto B = q.size(0), T = q.size(1), H = q.size(2), KV = k.size(2), hd = k.size(3);
    const auto ns = o.num_slc_blocks(T), lp = o.slc_block();
    const auto acc = q.options().dtype(acc_type(q.scalar_type()));
    auto kb = to_blocks(k, ns, lp), vb = to_blocks(v, ns, lp);
    auto dq = torch::zeros(q.sizes(), q.options());
    auto dkb = torch::zeros({B * KV * ns, lp * hd}, acc);
    auto dvb = torch::zeros({B * KV * ns, lp * hd}, acc);
    const auto& go = grads[0];
    if (go.defined()) {
      const int64_t C = slc_chunk(B, H, KV, hd, o, T);
      for (int64_t t0 = 0; t0 < T; t0 += C) {
        const int64_t t1 = std::min(T, t0 + C);
        auto g = slc_gather(kb, vb, idx.slice(1, t0, t1), t0, t1, B, KV, ns, hd, o);
        auto gr = chunk_backward(to_group(q.slice(1, t0, t1), KV), g.K, g.V, g.mask, false, o.scale(),
                                 to_group(go.slice(1, t0, t1), KV));
        dq.slice(1, t0, t1).copy_(from_group(gr.dq));
        // Masked (and unused-slot) entries carry exactly zero gradient, so scattering them is harmless.
        dkb.index_add_(0, g.flat, gr.dK.reshape({-1, lp * hd}).to(acc.dtype()));
        dvb.index_add_(0, g.flat, gr.dV.reshape({-1, lp * hd}).to(acc.dtype()));
      }
    }
    return {dq, from_blocks(dkb, B, T, KV, hd, ns, lp).to(k.scalar_type()),
            from_blocks(dvb, B, T, KV, hd, ns, lp).to(v.scalar_type()), Tensor(), Tensor()};
  }
};

// ---- sliding-window branch: query chunk [t0, t1) reads keys [t0 - w + 1, t1) with a band mask ----

int64_t swa_chunk(int64_t B, int64_t H, const NsaAttentionOptions& o, int64_t T) {
  int64_t C = std::clamp<int64_t>(o.query_chunk(), 1, std::max<int64_t>(T, 1));
  while (C > 1 && B * H * C * (C + o.window()) > o.chunk_budget()) C = (C + 1) / 2;
  return C;
}

Tensor swa_mask(int64_t lo, int64_t t0, int64_t t1, const NsaAttentionOptions& o, torch::Device dev) {
  auto opt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  auto s = torch::arange(lo, t1, opt).view({1, -1});
  auto t = torch::arange(t0, t1, opt).view({-1, 1});
  return ((s <= t) & (s > t - o.window())).view({1, 1, t1 - t0, 1, t1 - lo});
}

struct SwaFn : torch::autograd::Function<SwaFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const NsaAttentionOptions& o) {
    const auto B = q.size(0), T = q.size(1), H = q.size(2), KV = k.size(2);
    auto out = torch::empty(q.sizes(), q.options());
    const int64_t C = swa_chunk(B, H, o, T);
    for (int64_t t0 = 0; t0 < T; t0 += C) {
      const int64_t t1 = std::min(T, t0 + C), lo = std::max<int64_t>(0, t0 - o.window() + 1);
      auto K = k.slice(1, lo, t1).permute({0, 2, 1, 3});  // (B, KV, L, hd)
      auto V = v.slice(1, lo, t1).permute({0, 2, 1, 3});
      auto qg = to_group(q.slice(1, t0, t1), KV);
      auto p = masked_softmax(chunk_scores(qg, K, true, o.scale()), swa_mask(lo, t0, t1, o, q.device()));
      out.slice(1, t0, t1).copy_(from_group(chunk_apply(p, V, true)));
    }
    save_options(ctx, o);
    ctx->save_for_backward({q, k, v});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto o = load_options(ctx);
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2];
    const auto B = q.size(0), T = q.size(1), H = q.size(2), KV = k.size(2);
    const auto acc = q.options().dtype(acc_type(q.scalar_type()));
    auto dq = torch::zeros(q.sizes(), q.options());
    auto dk = torch::zeros(k.sizes(), acc);
    auto dv = torch::zeros(v.sizes(), acc);
    const auto& go = grads[0];
    if (go.defined()) {
      const int64_t C = swa_chunk(B, H, o, T);
      for (int64_t t0 = 0; t0 < T; t0 += C) {
        const int64_t t1 = std::min(T, t0 + C), lo = std::max<int64_t>(0, t0 - o.window() + 1);
        auto K = k.slice(1, lo, t1).permute({0, 2, 1, 3});
        auto V = v.slice(1, lo, t1).permute({0, 2, 1, 3});
        auto g = chunk_backward(to_group(q.slice(1, t0, t1), KV), K, V, swa_mask(lo, t0, t1, o, q.device()), true,
                                o.scale(), to_group(go.slice(1, t0, t1), KV));
        dq.slice(1, t0, t1).copy_(from_group(g.dq));
        dk.slice(1, lo, t1).add_(g.dK.permute({0, 2, 1, 3}));
        dv.slice(1, lo, t1).add_(g.dV.permute({0, 2, 1, 3}));
      }
    }
    return {dq, dk.to(k.scalar_type()), dv.to(v.scalar_type()), Tensor()};
  }
};

// ---- sliding-window branch on CUDA: FlashAttention-2's local mode ----
//
// LibTorch carries FlashAttention-2 (at::_flash_attention_forward/_backward) with its window arguments: causal with
// window_size_left = w - 1 is exactly keys [t - w + 1, t]. (B, T, H, hd) is the kernels' own layout and GQA K/V go
// in as they are (the backward sums dk/dv over each group), so there is no chunking, no mask and no expanded K/V;
// the kernel visits only the key tiles that meet the band. Saved for backward: q, k, v, o and the fp32 lse.
struct SwaFlashFn : torch::autograd::Function<SwaFlashFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v, int64_t w,
                        double scale) {
    const auto T = q.size(1);
    auto [o, lse, rng, unused, dbg] = at::_flash_attention_forward(q, k, v, std::nullopt, std::nullopt, T, T, 0.0,
                                                                   /*is_causal=*/true, /*return_debug_mask=*/false,
                                                                   scale, w - 1, 0);
    ctx->save_for_backward({q, k, v, o, lse, rng, unused});
    ctx->saved_data["w"] = w;
    ctx->saved_data["scale"] = scale;
    g_swa_flash_calls.fetch_add(1, std::memory_order_relaxed);
    return o;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t w = ctx->saved_data["w"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto T = s[0].size(1);
    auto [dq, dk, dv] = at::_flash_attention_backward(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], Tensor(),
                                                      Tensor(), T, T, 0.0, /*is_causal=*/true, s[5], s[6], scale,
                                                      w - 1, 0);
    return {dq, dk, dv, Tensor(), Tensor()};
  }
};

// Where FlashAttention-2 runs: CUDA, sm_80 or newer, bf16/fp16, head_dim a multiple of 8 up to 256.
std::optional<Tensor> swa_flash(const Tensor& q, const Tensor& k, const Tensor& v, const NsaAttentionOptions& o) {
  const auto st = q.scalar_type();
  const auto hd = q.size(3);
  if (!q.is_cuda() || !swa_flash_switch().load() || !(st == torch::kBFloat16 || st == torch::kHalf) ||
      hd % 8 != 0 || hd > 256 || q.size(1) == 0) {
    return std::nullopt;
  }
#if ABLATE_WITH_CUDA
  if (at::cuda::getDeviceProperties(q.get_device())->major < 8) return std::nullopt;
#endif
  auto last_dim_dense = [](const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  return SwaFlashFn::apply(last_dim_dense(q), last_dim_dense(k), last_dim_dense(v), o.window(), o.scale());
}

// ---- sliding-window branch on CUDA in fp32 (or FlashAttention off): SDPA's fused kernels over query chunks ----
//
// Chunk [t0, t0 + C) attends to keys [t0 - w + 1, t0 + C) under the band mask; K/V are expanded to the H heads
// (SDPA's memory-efficient kernel takes a mask but no GQA). C = 2w: the fused kernel computes C x (C + w) scores
// for C x w useful ones (1.5x), and autograd keeps the expanded chunk K/V, ~3 T*H*hd elements. Used only when
// SDPA picks a fused backend (never the math fallback, which would materialise the chunk scores and keep them).
std::optional<Tensor> swa_sdpa(const Tensor& q, const Tensor& k, const Tensor& v, const NsaAttentionOptions& o) {
  const auto st = q.scalar_type();
  if (!q.is_cuda() || !g_swa_sdpa.load() || !(st == torch::kFloat || st == torch::kBFloat16 || st == torch::kHalf)) {
    return std::nullopt;
  }
  const auto T = q.size(1), H = q.size(2), KV = k.size(2), G = H / KV;
  const int64_t w = o.window();
  const int64_t C = std::clamp<int64_t>(2 * w, 128, std::max<int64_t>(T, 1));
  auto qh = q.transpose(1, 2), kh = k.transpose(1, 2), vh = v.transpose(1, 2);  // (B, *, T, hd) views
  std::vector<Tensor> outs;
  for (int64_t t0 = 0; t0 < T; t0 += C) {
    const int64_t t1 = std::min(T, t0 + C), lo = std::max<int64_t>(0, t0 - w + 1);
    auto K = kh.slice(2, lo, t1), V = vh.slice(2, lo, t1);
    if (G > 1) {
      K = K.repeat_interleave(G, 1);
      V = V.repeat_interleave(G, 1);
    }
    auto qc = qh.slice(2, t0, t1);
    auto mask = swa_mask(lo, t0, t1, o, q.device()).view({t1 - t0, t1 - lo});
    if (t0 == 0) {
      const auto choice = static_cast<at::SDPBackend>(at::_fused_sdp_choice(qc, K, V, mask, 0.0, false, o.scale()));
      if (choice != at::SDPBackend::flash_attention && choice != at::SDPBackend::efficient_attention &&
          choice != at::SDPBackend::cudnn_attention) {
        return std::nullopt;
      }
    }
    outs.push_back(at::scaled_dot_product_attention(qc, K, V, mask, 0.0, false, o.scale()));
  }
  if (outs.empty()) return std::nullopt;
  return torch::cat(outs, 2).transpose(1, 2).contiguous();
}

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const NsaAttentionOptions& o) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == o.num_heads() && q.size(3) == o.head_dim(),
              "NSA: q must be (B, T, H=", o.num_heads(), ", hd=", o.head_dim(), "), got ", q.sizes());
  const std::vector<int64_t> kv_shape{q.size(0), q.size(1), o.num_kv_heads(), o.head_dim()};
  TORCH_CHECK(k.sizes() == kv_shape, "NSA: k must be ", c10::IntArrayRef(kv_shape), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == kv_shape, "NSA: v must be ", c10::IntArrayRef(kv_shape), ", got ", v.sizes());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "NSA: q, k, v must share a device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "NSA: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.is_floating_point(), "NSA: expected floating-point q/k/v, got ", q.scalar_type());
}

}  // namespace

// ---- options ----

void NsaAttentionOptions::validate() const {
  TORCH_CHECK(d_model() > 0 && num_heads() > 0 && num_kv_heads() > 0 && head_dim() > 0,
              "NsaAttentionOptions: d_model, num_heads, num_kv_heads, head_dim must be > 0, got ", d_model(), ", ",
              num_heads(), ", ", num_kv_heads(), ", ", head_dim());
  TORCH_CHECK(num_heads() % num_kv_heads() == 0, "NsaAttentionOptions: num_heads (", num_heads(),
              ") must be a multiple of num_kv_heads (", num_kv_heads(), ")");
  TORCH_CHECK(cmp_stride() > 0 && cmp_block() > 0 && cmp_block() % cmp_stride() == 0,
              "NsaAttentionOptions: cmp_block must be a positive multiple of cmp_stride, got cmp_block=",
              cmp_block(), " cmp_stride=", cmp_stride());
  TORCH_CHECK(slc_block() > 0 && slc_block() % cmp_stride() == 0,
              "NsaAttentionOptions: slc_block must be a positive multiple of cmp_stride (paper eq. 9), got slc_block=",
              slc_block(), " cmp_stride=", cmp_stride());
  TORCH_CHECK(num_init_blocks() >= 0 && num_local_blocks() >= 0,
              "NsaAttentionOptions: num_init_blocks and num_local_blocks must be >= 0, got ", num_init_blocks(), ", ",
              num_local_blocks());
  TORCH_CHECK(num_selected() >= std::max<int64_t>(1, num_init_blocks() + num_local_blocks()),
              "NsaAttentionOptions: num_selected (", num_selected(),
              ") must be >= 1 and hold the forced blocks (num_init_blocks + num_local_blocks = ",
              num_init_blocks() + num_local_blocks(), ")");
  TORCH_CHECK(window() > 0, "NsaAttentionOptions: window must be > 0, got ", window());
  TORCH_CHECK(cmp_hidden() >= 0, "NsaAttentionOptions: cmp_hidden must be >= 0 (0 = head_dim), got ", cmp_hidden());
  TORCH_CHECK(softmax_scale() >= 0, "NsaAttentionOptions: softmax_scale must be >= 0 (0 = 1/sqrt(hd)), got ",
              softmax_scale());
  TORCH_CHECK(query_chunk() > 0 && chunk_budget() > 0,
              "NsaAttentionOptions: query_chunk and chunk_budget must be > 0, got ", query_chunk(), ", ",
              chunk_budget());
}

double NsaAttentionOptions::scale() const {
  return softmax_scale() > 0 ? softmax_scale() : 1.0 / std::sqrt(static_cast<double>(head_dim()));
}

int64_t NsaAttentionOptions::num_cmp_blocks(int64_t T) const {
  return T >= cmp_block() ? (T - cmp_block()) / cmp_stride() + 1 : 0;
}

int64_t NsaAttentionOptions::num_slc_blocks(int64_t T) const { return (T + slc_block() - 1) / slc_block(); }

// ---- selection pieces ----

Tensor nsa_cmp_to_slc_importance(const Tensor& p_cmp, int64_t num_slc_blocks, const NsaAttentionOptions& o) {
  const int64_t r = o.cmp_block() / o.cmp_stride();  // sub-blocks per compressed block
  const int64_t m = o.slc_block() / o.cmp_stride();  // sub-blocks per selection block
  const int64_t ncb = p_cmp.size(-1);
  auto lead = p_cmp.sizes().vec();
  lead.pop_back();
  auto out_shape = lead;
  out_shape.push_back(num_slc_blocks);
  if (ncb == 0) return torch::zeros(out_shape, p_cmp.options());
  // cover[u] = sum_{n<r} p[u - n]: the mass of the compressed blocks that contain sub-block u.
  auto cover = torch::constant_pad_nd(p_cmp, {r - 1, r - 1}).unfold(-1, r, 1).sum(-1);  // (..., ncb + r - 1)
  const int64_t nsub = ncb + r - 1;
  TORCH_CHECK(nsub <= num_slc_blocks * m, "nsa_cmp_to_slc_importance: ", ncb, " compressed blocks reach sub-block ",
              nsub, " beyond the ", num_slc_blocks, " selection blocks given");
  cover = torch::constant_pad_nd(cover, {0, num_slc_blocks * m - nsub});
  auto grouped = lead;
  grouped.push_back(num_slc_blocks);
  grouped.push_back(m);
  return cover.reshape(grouped).sum(-1);
}

Tensor nsa_select_blocks(const Tensor& importance, const Tensor& t_pos, const NsaAttentionOptions& o) {
  TORCH_CHECK(importance.dim() == 4 && t_pos.dim() == 1 && importance.size(2) == t_pos.size(0),
              "nsa_select_blocks: expected importance (B, KV, C, Ns) and t_pos (C), got ", importance.sizes(), " and ",
              t_pos.sizes());
  const auto B = importance.size(0), KV = importance.size(1), C = importance.size(2), ns = importance.size(3);
  const int64_t n = o.num_selected();
  auto lopt = t_pos.options().dtype(torch::kLong);
  auto j = torch::arange(ns, lopt).view({1, ns});
  auto jcur = t_pos.to(torch::kLong).div(o.slc_block(), "floor").view({C, 1});
  auto eligible = j <= jcur;  // block start <= t
  auto forced = eligible & ((j < o.num_init_blocks()) | (j > jcur - o.num_local_blocks()));
  auto s = importance.masked_fill(eligible.logical_not(), -kInf).masked_fill(forced, kInf);
  const int64_t kk = std::min(n, ns);
  auto [vals, ids] = s.topk(kk, -1);
  ids = ids.masked_fill(torch::isneginf(vals), -1);
  ids = std::get<0>(ids.sort(-1));
  if (kk < n) ids = torch::cat({torch::full({B, KV, C, n - kk}, -1, lopt), ids}, -1);
  return ids;
}

// ---- module ----

NsaAttentionImpl::NsaAttentionImpl(const NsaAttentionOptions& options_) : options(options_) { reset(); }

void NsaAttentionImpl::reset() {
  options.validate();
  const int64_t l = options.cmp_block(), hd = options.head_dim();
  const int64_t hidden = options.cmp_hidden() > 0 ? options.cmp_hidden() : hd;
  cmp_k_pe = register_parameter("cmp_k_pe", torch::empty({l, hd}));
  cmp_v_pe = register_parameter("cmp_v_pe", torch::empty({l, hd}));
  cmp_k_fc1 = register_module("cmp_k_fc1", make_linear(l * hd, hidden, /*bias=*/true));
  cmp_k_fc2 = register_module("cmp_k_fc2", make_linear(hidden, hd, /*bias=*/true));
  cmp_v_fc1 = register_module("cmp_v_fc1", make_linear(l * hd, hidden, /*bias=*/true));
  cmp_v_fc2 = register_module("cmp_v_fc2", make_linear(hidden, hd, /*bias=*/true));
  gate = register_module("gate", make_linear(options.d_model(), 3 * options.num_heads(), /*bias=*/true));
  reset_parameters();
}

void NsaAttentionImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  // Linear layers keep LibTorch's default (Kaiming-uniform) init; the position embeddings start small.
  cmp_k_pe.normal_(0.0, 0.02);
  cmp_v_pe.normal_(0.0, 0.02);
}

Tensor NsaAttentionImpl::compress(const Tensor& kv, const Tensor& pe, torch::nn::Linear& fc1,
                                  torch::nn::Linear& fc2) {
  TORCH_CHECK(kv.dim() == 4 && kv.size(2) == options.num_kv_heads() && kv.size(3) == options.head_dim(),
              "NSA compress: expected (B, T, KV=", options.num_kv_heads(), ", hd=", options.head_dim(), "), got ",
              kv.sizes());
  const auto B = kv.size(0), T = kv.size(1), KV = kv.size(2), hd = kv.size(3);
  const int64_t l = options.cmp_block(), nc = options.num_cmp_blocks(T);
  Tensor flat;
  if (nc == 0) {
    flat = kv.new_zeros({B, 0, KV, l * hd});  // keeps the MLP in the graph; its gradient is zero
  } else {
    // unfold: (B, Nc, KV, hd, l) windows starting at 0, d, 2d, ...; a view, copied once by the add.
    auto blocks = kv.unfold(1, l, options.cmp_stride()).permute({0, 1, 2, 4, 3}) + pe.to(kv.scalar_type());
    flat = blocks.reshape({B, nc, KV, l * hd});
  }
  return fc2(torch::gelu(fc1(flat)));
}

Tensor NsaAttentionImpl::compress_keys(const Tensor& k) { return compress(k, cmp_k_pe, cmp_k_fc1, cmp_k_fc2); }

Tensor NsaAttentionImpl::compress_values(const Tensor& v) { return compress(v, cmp_v_pe, cmp_v_fc1, cmp_v_fc2); }

Tensor NsaAttentionImpl::gates(const Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == options.d_model(), "NSA gates: x must be (B, T, d_model=",
              options.d_model(), "), got ", x.sizes());
  return torch::sigmoid(gate(x)).view({x.size(0), x.size(1), 3, options.num_heads()});
}

NsaBranches NsaAttentionImpl::forward_branches(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x) {
  check_qkv(q, k, v, options);
  TORCH_CHECK(x.dim() == 3 && x.size(0) == q.size(0) && x.size(1) == q.size(1),
              "NSA: x must be (B, T, d_model) with B, T of q ", q.sizes(), ", got ", x.sizes());
  NsaBranches r;
  auto cmp = nsa_compressed_attention(q, compress_keys(k), compress_values(v), options);
  r.o_cmp = cmp.out;
  r.block_idx = cmp.block_idx;
  r.o_slc = nsa_selected_attention(q, k, v, r.block_idx, options);
  r.o_swa = nsa_window_attention(q, k, v, options);
  r.gates = gates(x);
  auto g = r.gates.unsqueeze(-1).to(q.scalar_type());  // (B, T, 3, H, 1)
  r.out = g.select(2, 0) * r.o_cmp + g.select(2, 1) * r.o_slc + g.select(2, 2) * r.o_swa;
  return r;
}

Tensor NsaAttentionImpl::forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x) {
  return forward_branches(q, k, v, x).out;
}

// ---- branch entry points ----

NsaCmpResult nsa_compressed_attention(const Tensor& q, const Tensor& kc, const Tensor& vc,
                                      const NsaAttentionOptions& o) {
  o.validate();
  TORCH_CHECK(q.dim() == 4 && q.size(2) == o.num_heads() && q.size(3) == o.head_dim(),
              "nsa_compressed_attention: q must be (B, T, H=", o.num_heads(), ", hd=", o.head_dim(), "), got ",
              q.sizes());
  const std::vector<int64_t> cshape{q.size(0), o.num_cmp_blocks(q.size(1)), o.num_kv_heads(), o.head_dim()};
  TORCH_CHECK(kc.sizes() == cshape && vc.sizes() == cshape, "nsa_compressed_attention: kc/vc must be ",
              c10::IntArrayRef(cshape), ", got ", kc.sizes(), " and ", vc.sizes());
  auto outs = CmpFn::apply(q, kc, vc, o);
  return {outs[0], outs[1]};
}

Tensor nsa_selected_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& block_idx,
                              const NsaAttentionOptions& o) {
  o.validate();
  check_qkv(q, k, v, o);
  const std::vector<int64_t> ishape{q.size(0), q.size(1), o.num_kv_heads(), o.num_selected()};
  TORCH_CHECK(block_idx.sizes() == ishape && block_idx.scalar_type() == torch::kLong,
              "nsa_selected_attention: block_idx must be int64 ", c10::IntArrayRef(ishape), ", got ",
              block_idx.scalar_type(), " ", block_idx.sizes());
  return SlcFn::apply(q, k, v, block_idx.to(q.device()), o);
}

Tensor nsa_window_attention(const Tensor& q, const Tensor& k, const Tensor& v, const NsaAttentionOptions& o) {
  o.validate();
  check_qkv(q, k, v, o);
  if (auto r = swa_flash(q, k, v, o)) return *r;
  if (auto r = swa_sdpa(q, k, v, o)) return *r;
  return SwaFn::apply(q, k, v, o);
}

// ---- dense reference ----

namespace {
// Dense masked softmax attention on (B, H, T, *); rows with no allowed key give zero. A finite fill keeps the
// empty rows free of NaN (they come out uniform and are then zeroed), so autograd through it is clean.
Tensor dense_attention(const Tensor& qh, const Tensor& kh, const Tensor& vh, const Tensor& mask, double scale,
                       Tensor* probs = nullptr) {
  auto s = torch::matmul(qh, kh.transpose(-1, -2)) * scale;
  auto p = torch::softmax(s.masked_fill(mask.logical_not(), -1e30), -1) * mask.any(-1, true).to(s.scalar_type());
  if (probs) *probs = p;
  return torch::matmul(p, vh);
}
}  // namespace

NsaReferenceOutput nsa_reference(NsaAttentionImpl& module, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& x) {
  const auto& o = module.options;
  check_qkv(q, k, v, o);
  const auto B = q.size(0), T = q.size(1), H = o.num_heads(), KV = o.num_kv_heads(), G = H / KV;
  const int64_t l = o.cmp_block(), d = o.cmp_stride(), lp = o.slc_block();
  const int64_t nc = o.num_cmp_blocks(T), ns = o.num_slc_blocks(T);
  const double scale = o.scale();
  auto lopt = torch::TensorOptions().dtype(torch::kLong).device(q.device());

  auto kc = module.compress_keys(k), vc = module.compress_values(v);
  // Heads first, K/V expanded to all H heads (head h reads kv head h / G).
  auto qh = q.permute({0, 2, 1, 3});
  auto kh = k.repeat_interleave(G, 2).permute({0, 2, 1, 3});
  auto vh = v.repeat_interleave(G, 2).permute({0, 2, 1, 3});
  auto kch = kc.repeat_interleave(G, 2).permute({0, 2, 1, 3});
  auto vch = vc.repeat_interleave(G, 2).permute({0, 2, 1, 3});
  auto t = torch::arange(T, lopt).view({T, 1});
  auto s = torch::arange(T, lopt).view({1, T});

  NsaReferenceOutput r;
  // Compressed: block j usable by t iff it ends at or before t.
  auto j = torch::arange(nc, lopt).view({1, nc});
  auto mask_cmp = (j * d + l - 1 <= t);  // (T, Nc)
  Tensor p_cmp;
  auto o_cmp = dense_attention(qh, kch, vch, mask_cmp, scale, &p_cmp);  // p: (B, H, T, Nc)

  {
    torch::NoGradGuard no_grad;
    // Importance through an explicit overlap matrix: M[i][j] = (tokens shared by compressed block i and
    // selection block j) / d, i.e. the number of stride sub-blocks of i lying inside j.
    std::vector<double> m(static_cast<size_t>(nc * ns), 0.0);
    for (int64_t i = 0; i < nc; ++i) {
      for (int64_t jj = 0; jj < ns; ++jj) {
        const int64_t lo = std::max(i * d, jj * lp), hi = std::min(i * d + l, (jj + 1) * lp);
        if (hi > lo) m[static_cast<size_t>(i * ns + jj)] = static_cast<double>(hi - lo) / static_cast<double>(d);
      }
    }
    auto M = torch::tensor(m, torch::kDouble).view({nc, ns}).to(q.device(), p_cmp.scalar_type());
    auto imp = torch::matmul(p_cmp.detach().reshape({B, KV, G, T, nc}).sum(2), M);  // (B, KV, T, Ns)
    auto idx = nsa_select_blocks(imp, torch::arange(T, lopt), o);               // (B, KV, T, n)
    r.importance = imp.permute({0, 2, 1, 3});
    r.branches.block_idx = idx.permute({0, 2, 1, 3});
  }
  // Selected: dense token mask from the selected blocks (slot 0 of `sel` swallows the -1 entries).
  auto idx = r.branches.block_idx.permute({0, 2, 1, 3});  // (B, KV, T, n)
  auto sel = torch::zeros({B, KV, T, ns + 1}, lopt.dtype(torch::kBool));
  sel.scatter_(-1, idx + 1, true);
  auto tok = sel.slice(-1, 1).repeat_interleave(lp, -1).slice(-1, 0, T);  // (B, KV, T, T)
  auto mask_slc = (tok & (s <= t)).repeat_interleave(G, 1);                // (B, H, T, T)
  auto o_slc = dense_attention(qh, kh, vh, mask_slc, scale);
  // Sliding window [t - w + 1, t].
  auto mask_swa = (s <= t) & (s > t - o.window());
  auto o_swa = dense_attention(qh, kh, vh, mask_swa, scale);

  r.p_cmp = p_cmp.permute({0, 2, 1, 3});
  r.branches.o_cmp = o_cmp.permute({0, 2, 1, 3});
  r.branches.o_slc = o_slc.permute({0, 2, 1, 3});
  r.branches.o_swa = o_swa.permute({0, 2, 1, 3});
  r.branches.gates = module.gates(x);
  auto g = r.branches.gates.unsqueeze(-1).to(q.scalar_type());
  r.branches.out = g.select(2, 0) * r.branches.o_cmp + g.select(2, 1) * r.branches.o_slc +
                   g.select(2, 2) * r.branches.o_swa;
  return r;
}

int64_t nsa_max_chunk_numel() { return g_max_chunk_numel.load(); }

void nsa_reset_chunk_stats() { g_max_chunk_numel.store(0); }

void nsa_set_slc_kernels_enabled(bool enabled) { g_slc_kernels.store(enabled); }

bool nsa_slc_kernels_enabled() { return g_slc_kernels.load(); }

void nsa_set_swa_sdpa_enabled(bool enabled) { g_swa_sdpa.store(enabled); }

bool nsa_swa_sdpa_enabled() { return g_swa_sdpa.load(); }

void nsa_set_swa_flash_enabled(bool enabled) { swa_flash_switch().store(enabled); }

bool nsa_swa_flash_enabled() { return swa_flash_switch().load(); }

int64_t nsa_swa_flash_calls() { return g_swa_flash_calls.load(); }

void nsa_set_cmp_fused_enabled(bool enabled) { cmp_fused_switch().store(enabled); }

bool nsa_cmp_fused_enabled() { return cmp_fused_switch().load(); }

int64_t nsa_cmp_fused_calls() { return g_cmp_fused_calls.load(); }

}  // namespace ablate::core
