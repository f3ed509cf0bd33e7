// NSA compressed branch on the GPU: the fused CUDA kernels (kernels/nsa_compress.h, switched on here with
// nsa_set_cmp_fused_enabled) against the chunked LibTorch CmpFn path, both measured against an fp64 run of the
// LibTorch path on the same (dtype-rounded) inputs: output, dq, dkc, dvc; the importance (kernel entry point) against
// a dense fp64 importance built with nsa_cmp_to_slc_importance; the selected blocks (tie-aware: the reference
// importance of the chosen set). fp32 tight (1e-4 of max|ref|), bf16/fp16 no worse than twice the LibTorch path's own
// error against fp64. G = 1, 3, 4, 5, 8, 16, hd 64 and 128, T not a multiple of any tile (25, 63, 777, 1000, 1500,
// 4133), l/d/l' other than the paper's, queries that see no compressed block (every t < l - 1, and T < l where
// there is none at all). Then a timing at the paper scale. Every check prints its numbers and keeps going.
// Skips without a GPU or without the CUDA kernels.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "core/mixers/nsa.h"
#include "kernels/nsa_compress.h"
#include "tests/cuda_timing.h"
#include "tests/require_cuda.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace ablate::core {
namespace {

using torch::Tensor;

// The fused kernels on or off; restores the previous setting.
struct FusedSwitch {
  explicit FusedSwitch(bool on) : prev(nsa_cmp_fused_enabled()) { nsa_set_cmp_fused_enabled(on); }
  ~FusedSwitch() { nsa_set_cmp_fused_enabled(prev); }
  bool prev;
};

struct Case {
  const char* name;
  int64_t B, T, H, KV, hd;
  int64_t l, d, lp, n;  // cmp_block, cmp_stride, slc_block, num_selected
};

NsaAttentionOptions cmp_options(const Case& c) {
  return NsaAttentionOptions(/*d_model=*/16, c.H, c.KV, c.hd)
      .cmp_block(c.l)
      .cmp_stride(c.d)
      .slc_block(c.lp)
      .num_selected(c.n)
      .num_init_blocks(1)
      .num_local_blocks(2);
}

#if ABLATE_WITH_CUDA
// max |a - ref| / max |ref| (0 for empty tensors, e.g. dkc when there is no compressed block).
double max_err(const Tensor& a, const Tensor& ref) {
  if (ref.numel() == 0) return 0.0;
  const double scale = std::max(ref.abs().max().item<double>(), 1e-30);
  return (a.to(torch::kDouble) - ref.to(torch::kDouble)).abs().max().item<double>() / scale;
}

struct CmpRun {
  Tensor o, idx, dq, dk, dv;  // fp64 except idx
};

CmpRun run_cmp(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& w, const NsaAttentionOptions& o,
            torch::Dtype dt, bool fused) {
  FusedSwitch sw(fused);
  auto qq = q.to(dt).detach().requires_grad_();
  auto kk = kc.to(dt).detach().requires_grad_();
  auto vv = vc.to(dt).detach().requires_grad_();
  auto r = nsa_compressed_attention(qq, kk, vv, o);
  r.out.backward(w.to(dt));
  return {r.out.detach().to(torch::kDouble), r.block_idx, qq.grad().to(torch::kDouble), kk.grad().to(torch::kDouble),
          vv.grad().to(torch::kDouble)};
}

// Dense importance (B, KV, T, Ns) in fp64 from q (B, T, H, hd), kc (B, Nc, KV, hd); when `as` is not kDouble, the
// scores are computed the way the LibTorch path does (matmul in that dtype, then fp32) and the rest in fp32.
Tensor dense_importance(const Tensor& q, const Tensor& kc, const NsaAttentionOptions& o, torch::Dtype as) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), nc = kc.size(1), KV = kc.size(2), G = H / KV;
  const auto acc = as == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto qh = q.to(as).permute({0, 2, 1, 3});                               // (B, H, T, hd)
  auto kh = kc.to(as).repeat_interleave(G, 2).permute({0, 2, 1, 3});      // (B, H, Nc, hd)
  auto s = torch::matmul(qh, kh.transpose(-1, -2)).to(acc) * o.scale();  // (B, H, T, Nc)
  auto lopt = torch::TensorOptions().dtype(torch::kLong).device(q.device());
  auto t = torch::arange(T, lopt).view({T, 1});
  auto j = torch::arange(nc, lopt).view({1, nc});
  auto mask = (j * o.cmp_stride() + o.cmp_block() - 1 <= t);
  auto p = torch::softmax(s.masked_fill(mask.logical_not(), -INFINITY), -1).nan_to_num(0.0);
  auto psum = p.reshape({B, KV, G, T, nc}).sum(2);  // (B, KV, T, Nc)
  return nsa_cmp_to_slc_importance(psum, o.num_slc_blocks(T), o).to(torch::kDouble);
}

kernels::NsaCmpShape kernel_shape(const Tensor& q, const Tensor& kc, const NsaAttentionOptions& o) {
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
  s.dtype = q.scalar_type() == torch::kBFloat16 ? kernels::NsaDtype::kBF16
            : q.scalar_type() == torch::kHalf   ? kernels::NsaDtype::kF16
                                                : kernels::NsaDtype::kF32;
  return s;
}

// The importance straight from the kernel entry points (forward for the lse, then the importance over the query
// chunks [0, split) and [split, T), or one chunk when split is 0): (B, KV, T, Ns) fp64.
Tensor kernel_importance(const Tensor& q_in, const Tensor& kc_in, const NsaAttentionOptions& o, torch::Dtype dt,
                         int64_t split) {
  auto q = q_in.to(dt).contiguous(), kc = kc_in.to(dt).contiguous();
  auto vc = torch::zeros_like(kc);
  const int64_t B = q.size(0), T = q.size(1), KV = kc.size(2), ns = o.num_slc_blocks(T);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({B, T, q.size(2)}, q.options().dtype(torch::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernels::NsaCmpFwdArgs a;
  a.s = kernel_shape(q, kc, o);
  a.q = q.data_ptr();
  a.kc = kc.data_ptr();
  a.vc = vc.data_ptr();
  a.o = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  EXPECT_EQ(kernels::nsa_cmp_forward_cuda(a, stream), cudaSuccess);
  std::vector<Tensor> parts;
  std::vector<int64_t> bounds = {0};
  if (split > 0 && split < T) bounds.push_back(split);
  bounds.push_back(T);
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    const int64_t t0 = bounds[i], t1 = bounds[i + 1];
    auto imp = torch::zeros({B, KV, t1 - t0, ns}, q.options().dtype(torch::kFloat));
    kernels::NsaCmpImportanceArgs ia;
    ia.s = a.s;
    ia.q = a.q;
    ia.kc = a.kc;
    ia.lse = a.lse;
    ia.t0 = t0;
    ia.t1 = t1;
    ia.num_cols = ns;
    ia.importance = imp.data_ptr<float>();
    EXPECT_EQ(kernels::nsa_cmp_importance_cuda(ia, stream), cudaSuccess);
    parts.push_back(imp);
  }
  return torch::cat(parts, 2).to(torch::kDouble);
}

// Tie-aware selection check: the reference (fp64) importance summed over each row's chosen blocks, as a deficit
// against the reference's own top-n; max over rows, relative to max |reference importance|.
double selection_deficit(const Tensor& idx /*(B,T,KV,n)*/, const Tensor& ref_imp /*(B,KV,T,Ns)*/,
                         const Tensor& ref_idx /*(B,T,KV,n)*/) {
  if (ref_imp.numel() == 0) return 0.0;
  auto ip = ref_imp.permute({0, 2, 1, 3});  // (B, T, KV, Ns)
  auto score = [&](const Tensor& ids) {
    return ip.gather(-1, ids.clamp_min(0)).masked_fill(ids < 0, 0.0).sum(-1);
  };
  const double scale = std::max(ref_imp.abs().max().item<double>(), 1e-30);
  return (score(ref_idx) - score(idx)).max().item<double>() / scale;
}
#endif  // ABLATE_WITH_CUDA

TEST(NsaCompressGpu, FusedMatchesLibTorchPath) {
  ABLATE_REQUIRE_CUDA();
#if ABLATE_WITH_CUDA
  const torch::Device dev(torch::kCUDA);
  const std::vector<Case> cases = {
      {"G1 hd64 T1000", 2, 1000, 4, 4, 64, 32, 16, 64, 16},
      {"G4 hd64 T4133", 1, 4133, 8, 2, 64, 32, 16, 64, 16},
      {"G16 hd128 T1000", 1, 1000, 16, 1, 128, 32, 16, 64, 16},
      {"G16 hd64 T4133", 1, 4133, 32, 2, 64, 32, 16, 64, 16},
      {"G4 hd128 T4133", 1, 4133, 8, 2, 128, 32, 16, 64, 16},
      {"G1 hd128 T777 l48 l'32", 1, 777, 2, 2, 128, 48, 16, 32, 8},
      {"G3 hd64 T777 l64 l'16", 1, 777, 6, 2, 64, 64, 16, 16, 8},
      {"G5 hd128 T1500 l32 d8 l'24", 1, 1500, 10, 2, 128, 32, 8, 24, 6},
      {"G8 hd64 T63 (one or two blocks)", 1, 63, 8, 1, 64, 32, 16, 64, 4},
      {"G2 hd64 T25 (no block)", 2, 25, 4, 2, 64, 32, 16, 64, 4},
  };
  const std::vector<std::pair<torch::Dtype, const char*>> dtypes = {
      {torch::kFloat, "fp32"}, {torch::kBFloat16, "bf16"}, {torch::kHalf, "fp16"}};
  int failures = 0;
  auto check = [&](bool ok, const std::string& what) {
    if (!ok) ++failures;
    EXPECT_TRUE(ok) << what;
  };
  for (const auto& c : cases) {
    torch::manual_seed(4321 + c.T + c.H);
    const auto o = cmp_options(c);
    const int64_t nc = o.num_cmp_blocks(c.T);
    auto fopt = torch::TensorOptions().device(dev);
    auto q = torch::randn({c.B, c.T, c.H, c.hd}, fopt);
    // Compressed keys with some spread, so the softmax over them is not flat.
    auto kc = 1.5 * torch::randn({c.B, nc, c.KV, c.hd}, fopt);
    auto vc = torch::randn({c.B, nc, c.KV, c.hd}, fopt);
    auto w = torch::randn({c.B, c.T, c.H, c.hd}, fopt);
    for (const auto& [dt, dname] : dtypes) {
      auto qr = q.to(dt), kr = kc.to(dt), vr = vc.to(dt), wr = w.to(dt);
      const CmpRun ref = run_cmp(qr, kr, vr, wr, o, torch::kDouble, false);
      const CmpRun lib = run_cmp(qr, kr, vr, wr, o, dt, false);
      const int64_t calls0 = nsa_cmp_fused_calls();
      const CmpRun fus = run_cmp(qr, kr, vr, wr, o, dt, true);
      check(nsa_cmp_fused_calls() - calls0 == 1, std::string(c.name) + " " + dname + ": the fused path was not taken");
      const char* names[4] = {"o", "dq", "dk", "dv"};
      const Tensor* r[4] = {&ref.o, &ref.dq, &ref.dk, &ref.dv};
      const Tensor* lb[4] = {&lib.o, &lib.dq, &lib.dk, &lib.dv};
      const Tensor* fz[4] = {&fus.o, &fus.dq, &fus.dk, &fus.dv};
      std::string line;
      for (int i = 0; i < 4; ++i) {
        const double el = max_err(*lb[i], *r[i]), ef = max_err(*fz[i], *r[i]);
        char buf[128];
        std::snprintf(buf, sizeof buf, "  %s %.2e (lib %.2e)", names[i], ef, el);
        line += buf;
        const double tol = dt == torch::kFloat ? 1e-4 : 2.0 * el + 1e-6;
        check(std::isfinite(ef) && ef <= tol, std::string(c.name) + " " + dname + " " + names[i] + ": fused error " +
                                                  std::to_string(ef) + " > " + std::to_string(tol));
      }
      // Importance from the kernel entry points against the dense fp64 importance; the LibTorch way in this dtype
      // sets the half-precision tolerance. Two query chunks must give the same as one.
      const auto ref_imp = dense_importance(qr, kr, o, torch::kDouble);
      const auto lib_imp = dense_importance(qr, kr, o, dt);
      const auto fus_imp = kernel_importance(qr, kr, o, dt, 0);
      const auto fus_imp2 = kernel_importance(qr, kr, o, dt, (c.T / 3) | 1);
      const double eil = max_err(lib_imp, ref_imp), eif = max_err(fus_imp, ref_imp), eis = max_err(fus_imp2, fus_imp);
      const double itol = dt == torch::kFloat ? 1e-4 : 2.0 * eil + 1e-6;
      check(std::isfinite(eif) && eif <= itol, std::string(c.name) + " " + dname + " importance: fused error " +
                                                   std::to_string(eif) + " > " + std::to_string(itol));
      check(eis <= 1e-6, std::string(c.name) + " " + dname + " importance in two chunks differs: " +
                             std::to_string(eis));
      // Selection: identical where there are no near-ties; the chosen set may not lose more reference importance
      // than the importance error allows (n blocks, each off by at most the tolerance).
      const auto ref_idx = nsa_select_blocks(ref_imp, torch::arange(c.T, torch::TensorOptions().dtype(torch::kLong)
                                                                             .device(dev)), o)
                               .permute({0, 2, 1, 3});
      const double same = fus.idx.eq(lib.idx).to(torch::kDouble).mean().item<double>();
      const double dl = selection_deficit(lib.idx, ref_imp, ref_idx), df = selection_deficit(fus.idx, ref_imp, ref_idx);
      const double stol = 2.0 * c.n * itol + 2.0 * dl;
      check(df <= stol, std::string(c.name) + " " + dname + " selection deficit " + std::to_string(df) + " > " +
                            std::to_string(stol));
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "  imp %.2e (lib %.2e, 2 chunks %.1e)  idx same %.5f, deficit %.1e (lib %.1e)", eif, eil, eis,
                    same, df, dl);
      line += buf;
      // Queries before the first complete compressed block: zero output and zero dq, exactly.
      const int64_t t_empty = std::min<int64_t>(c.T, c.l - 1);
      if (t_empty > 0) {
        check(fus.o.slice(1, 0, t_empty).abs().max().item<double>() == 0.0,
              std::string(c.name) + " " + dname + ": o not zero before the first block");
        check(fus.dq.slice(1, 0, t_empty).abs().max().item<double>() == 0.0,
              std::string(c.name) + " " + dname + ": dq not zero before the first block");
      }
      std::printf("[nsa cmp gpu] %-28s %s%s\n", c.name, dname, line.c_str());
    }
  }
  std::printf("[nsa cmp gpu] %d failing comparisons\n", failures);
#endif
}

// Switch semantics: on by default (unless ABLATE_NSA_CMP_FUSED=0), the setter flips it, CPU tensors never take it.
TEST(NsaCompressGpu, SwitchAndCpuFallback) {
  {
    FusedSwitch sw(true);
    const Case c{"cpu", 1, 100, 4, 2, 64, 32, 16, 64, 4};
    const auto o = cmp_options(c);
    auto q = torch::randn({1, 100, 4, 64}), kc = torch::randn({1, o.num_cmp_blocks(100), 2, 64});
    const int64_t n0 = nsa_cmp_fused_calls();
    auto r = nsa_compressed_attention(q, kc, kc, o);
    EXPECT_EQ(nsa_cmp_fused_calls(), n0) << "CPU tensors took the CUDA kernels";
    EXPECT_TRUE(torch::isfinite(r.out).all().item<bool>());
  }
  ABLATE_REQUIRE_CUDA();
  FusedSwitch sw(false);
  const Case c{"off", 1, 300, 4, 2, 64, 32, 16, 64, 4};
  const auto o = cmp_options(c);
  auto fopt = torch::TensorOptions().device(torch::kCUDA);
  auto q = torch::randn({1, 300, 4, 64}, fopt), kc = torch::randn({1, o.num_cmp_blocks(300), 2, 64}, fopt);
  const int64_t n0 = nsa_cmp_fused_calls();
  nsa_compressed_attention(q, kc, kc, o);
  EXPECT_EQ(nsa_cmp_fused_calls(), n0) << "the switch is off but the kernels ran";
}

#if ABLATE_WITH_CUDA
using ablate::gpu_test::median_cuda_ms;
#endif

// The paper-scale compressed branch (the 71.9 ms / 168.5 ms LibTorch measurement): B=1, T=32768, H=32, KV=8, hd=64,
// bf16, l=32, d=16, l'=64, n=16; and G=16 hd=128. Fused vs LibTorch, forward (with the top-n) and fwd+bwd.
TEST(NsaCompressGpu, TimingPaperScale) {
  ABLATE_REQUIRE_CUDA();
#if ABLATE_WITH_CUDA
  const torch::Device dev(torch::kCUDA);
  struct Cfg {
    int64_t T, H, KV, hd;
  };
  for (const Cfg cfg : {Cfg{32768, 32, 8, 64}, Cfg{32768, 64, 4, 128}}) {
    torch::manual_seed(17);
    const Case c{"timing", 1, cfg.T, cfg.H, cfg.KV, cfg.hd, 32, 16, 64, 16};
    const auto o = cmp_options(c);
    const int64_t nc = o.num_cmp_blocks(cfg.T);
    auto bopt = torch::TensorOptions().device(dev).dtype(torch::kBFloat16);
    auto q = torch::randn({1, cfg.T, cfg.H, cfg.hd}, bopt).requires_grad_();
    auto kc = torch::randn({1, nc, cfg.KV, cfg.hd}, bopt).requires_grad_();
    auto vc = torch::randn({1, nc, cfg.KV, cfg.hd}, bopt).requires_grad_();
    auto w = torch::randn({1, cfg.T, cfg.H, cfg.hd}, bopt);
    auto clear = [&] {
      for (auto* t : {&q, &kc, &vc}) t->mutable_grad() = Tensor();
    };
    double f[2], fb[2];
    Tensor outs[2], idxs[2];
    for (int fused = 1; fused >= 0; --fused) {
      FusedSwitch sw(fused == 1);
      const int reps = fused ? 5 : 2;
      f[fused] = median_cuda_ms(
          [&] {
            torch::NoGradGuard ng;
            auto r = nsa_compressed_attention(q, kc, vc, o);
            outs[fused] = r.out;
            idxs[fused] = r.block_idx;
          },
          reps, 1);
      fb[fused] = median_cuda_ms(
          [&] {
            clear();
            nsa_compressed_attention(q, kc, vc, o).out.backward(w);
          },
          reps, 1);
    }
    const double eo = max_err(outs[1], outs[0]);
    const double same = idxs[1].eq(idxs[0]).to(torch::kDouble).mean().item<double>();
    std::printf("[nsa cmp timing] B=1 T=%ld H=%ld KV=%ld hd=%ld bf16 Nc=%ld: fused fwd %.2f ms, fwd+bwd %.2f ms; "
                "LibTorch fwd %.1f ms, fwd+bwd %.1f ms (%.1fx, %.1fx); |o fused - lib| / max %.1e, idx same %.4f\n",
                static_cast<long>(cfg.T), static_cast<long>(cfg.H), static_cast<long>(cfg.KV),
                static_cast<long>(cfg.hd), static_cast<long>(nc), f[1], fb[1], f[0], fb[0], f[0] / f[1], fb[0] / fb[1],
                eo, same);
    EXPECT_LT(eo, 5e-2);
  }
#endif
}

}  // namespace
}  // namespace ablate::core
