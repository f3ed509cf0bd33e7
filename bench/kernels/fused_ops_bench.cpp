// kernels_bench: our fused CUDA ops beside the LibTorch composites they replace, at LLM shapes, on one GPU.
//
// Method (shared/BENCHMARKS.md "Method (GPU)"): a quick correctness check of ours vs the composite first; then
// warm-up, then >= 50 timed iterations per variant, each bracketed by its own pair of CUDA events; inputs rotate
// over enough sets to exceed 4x the L2 and a scratch buffer twice the L2 is overwritten before every iteration
// (outside the events). Reported: median with p20/p80, effective bandwidth over the minimum bytes (every input
// read once, every output written once) against the 4.3 TB/s copy ceiling, or TFLOP/s against 790 for the
// matmul-bound fused linear + CE, and the ratio composite / ours. One JSON object per row goes to stdout (lines
// starting with '{') and, with --json FILE, to FILE.
//
//   kernels_bench [--op all|rope|swiglu|rmsnorm_residual|cross_entropy] [--iters 50] [--tokens 32768] [--json F]
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "core/ops/cross_entropy.h"
#include "core/ops/rmsnorm_residual.h"
#include "core/ops/rope.h"
#include "core/ops/swiglu.h"
#include "kernels/rmsnorm_residual.h"

namespace {

namespace F = torch::nn::functional;

constexpr double kCopyCeiling = 4.3e12;   // bytes/s, device-to-device copy measured on the H200
constexpr double kMatmulCeiling = 790e12;  // FLOP/s, dense bf16 matmul measured on the H200

struct Options {
  std::string op = "all";
  int iters = 50;
  int64_t tokens = 32768;
  std::string json_path;
};

struct Stats {
  double med_ms = 0, p20_ms = 0, p80_ms = 0;
};

std::ofstream g_json;
int64_t g_l2_bytes = 0;
torch::Tensor g_flush;

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// Times fn(i) for i = 0..iters-1 (after warmup calls); fn picks its input set from i.
Stats time_it(const std::function<void(int)>& fn, int iters, int warmup = 5) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int i = 0; i < warmup; ++i) fn(i);
  check_cuda(cudaStreamSynchronize(stream), "warm-up");
  std::vector<cudaEvent_t> start(iters), stop(iters);
  for (int i = 0; i < iters; ++i) {
    check_cuda(cudaEventCreate(&start[i]), "event");
    check_cuda(cudaEventCreate(&stop[i]), "event");
  }
  for (int i = 0; i < iters; ++i) {
    g_flush.fill_(static_cast<float>(i));  // evict L2 (outside the events)
    check_cuda(cudaEventRecord(start[i], stream), "record");
    fn(warmup + i);
    check_cuda(cudaEventRecord(stop[i], stream), "record");
  }
  check_cuda(cudaStreamSynchronize(stream), "timed loop");
  std::vector<double> ms(iters);
  for (int i = 0; i < iters; ++i) {
    float t = 0;
    check_cuda(cudaEventElapsedTime(&t, start[i], stop[i]), "elapsed");
    ms[i] = t;
    cudaEventDestroy(start[i]);
    cudaEventDestroy(stop[i]);
  }
  std::sort(ms.begin(), ms.end());
  auto pct = [&](double p) { return ms[std::min<size_t>(ms.size() - 1, size_t(p * (ms.size() - 1) + 0.5))]; };
  return {pct(0.5), pct(0.2), pct(0.8)};
}

// Number of input sets so that the sets together exceed 4x the L2 (at least 2).
int sets_for(double bytes_per_set) {
  const double need = 4.0 * double(g_l2_bytes);
  return std::max(2, static_cast<int>(std::ceil(need / std::max(bytes_per_set, 1.0))));
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat32) - b.to(torch::kFloat32)).abs().max().item<double>();
}

void header(const std::string& title) {
  std::printf("\n== %s\n%-18s %-34s %-10s %9s %9s %9s %10s %8s %8s\n", title.c_str(), "op", "shape", "variant",
              "med ms", "p20 ms", "p80 ms", "rate", "%ceil", "speedup");
}

// One table row + JSON line. bytes > 0: bandwidth-bound row; flops > 0: matmul-bound row.
void row(const std::string& op, const std::string& shape, const std::string& variant, const Stats& s, double bytes,
         double flops, double ref_ms, double check_err) {
  const double sec = s.med_ms * 1e-3;
  const bool bw = flops <= 0;
  const double rate = bw ? bytes / sec : flops / sec;
  const double ceil_pct = 100.0 * rate / (bw ? kCopyCeiling : kMatmulCeiling);
  const double speedup = ref_ms > 0 ? ref_ms / s.med_ms : 1.0;
  char rate_s[32];
  std::snprintf(rate_s, sizeof rate_s, bw ? "%.0f GB/s" : "%.0f TF/s", bw ? rate / 1e9 : rate / 1e12);
  std::printf("%-18s %-34s %-10s %9.3f %9.3f %9.3f %10s %7.1f%% %7.2fx\n", op.c_str(), shape.c_str(), variant.c_str(),
              s.med_ms, s.p20_ms, s.p80_ms, rate_s, ceil_pct, speedup);
  char js[1024];
  std::snprintf(js, sizeof js,
                "{\"op\":\"%s\",\"shape\":\"%s\",\"variant\":\"%s\",\"median_ms\":%.5f,\"p20_ms\":%.5f,\"p80_ms\":%.5f,"
                "\"min_bytes\":%.0f,\"flops\":%.0f,\"gbps\":%.1f,\"tflops\":%.1f,\"pct_ceiling\":%.2f,"
                "\"speedup_vs_composite\":%.3f,\"max_abs_diff_vs_composite\":%.3e}",
                op.c_str(), shape.c_str(), variant.c_str(), s.med_ms, s.p20_ms, s.p80_ms, bytes, flops,
                bw ? rate / 1e9 : bytes / sec / 1e9, bw ? 0.0 : rate / 1e12, ceil_pct, speedup, check_err);
  std::printf("%s\n", js);
  if (g_json.is_open()) g_json << js << "\n";
}

std::pair<torch::Tensor, torch::Tensor> rope_tables(int64_t T, int64_t hd, double theta, torch::Device dev) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto inv_freq = torch::pow(theta, -torch::arange(0, hd, 2, opts) / double(hd));
  auto ang = torch::outer(torch::arange(T, opts), inv_freq);
  auto emb = torch::cat({ang, ang}, -1);
  return {emb.cos().to(torch::kFloat32).to(dev), emb.sin().to(torch::kFloat32).to(dev)};
}

// ------------------------------------------------------------------------------------------------ RoPE
void bench_rope(const Options& o) {
  header("RoPE (q and k, model layout: [B, T, H, hd] memory seen as [B, H, T, hd]), bf16");
  const auto dev = torch::Device(torch::kCUDA);
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(dev);
  struct Shape {
    int64_t H, KV, hd;
  };
  for (const Shape sh : {Shape{16, 8, 128}, Shape{32, 8, 128}}) {
    const int64_t T = o.tokens, B = 1;
    auto [cos, sin] = rope_tables(T, sh.hd, 1e6, dev);
    const double elems = double(B * T) * double(sh.H + sh.KV) * double(sh.hd);
    const double bytes = 2.0 * elems * 2.0 + 2.0 * double(T * sh.hd) * 4.0;  // q,k in+out; tables once
    const int sets = sets_for(bytes);
    std::vector<torch::Tensor> qs, ks, gqs, gks;
    for (int i = 0; i < sets; ++i) {
      qs.push_back(torch::randn({B, T, sh.H, sh.hd}, bf).transpose(1, 2));
      ks.push_back(torch::randn({B, T, sh.KV, sh.hd}, bf).transpose(1, 2));
      gqs.push_back(torch::randn({B, sh.H, T, sh.hd}, bf));
      gks.push_back(torch::randn({B, sh.KV, T, sh.hd}, bf));
    }
    const std::string shape = "T" + std::to_string(T) + " H" + std::to_string(sh.H) + "/" + std::to_string(sh.KV) +
                              " hd" + std::to_string(sh.hd);
    auto [qo, ko] = ablate::ops::rope_qk(qs[0], ks[0], cos, sin);
    const double err = std::max(max_diff(qo, ablate::ops::rope_composite(qs[0], cos, sin)),
                                max_diff(ko, ablate::ops::rope_composite(ks[0], cos, sin)));
    torch::NoGradGuard ng;
    const Stats comp = time_it(
        [&](int i) {
          auto a = ablate::ops::rope_composite(qs[i % sets], cos, sin);
          auto b = ablate::ops::rope_composite(ks[i % sets], cos, sin);
        },
        o.iters);
    const Stats ours = time_it([&](int i) { auto r = ablate::ops::rope_qk(qs[i % sets], ks[i % sets], cos, sin); },
                               o.iters);
    row("rope fwd", shape, "composite", comp, bytes, 0, 0, 0);
    row("rope fwd", shape, "ours", ours, bytes, 0, comp.med_ms, err);
    // Backward alone: one graph per input set built outside the timing, replayed with retain_graph.
    torch::GradMode::set_enabled(true);
    std::vector<std::vector<torch::Tensor>> outs_c(sets), outs_o(sets);
    for (int i = 0; i < sets; ++i) {
      qs[i].requires_grad_(true);
      ks[i].requires_grad_(true);
      outs_c[i] = {ablate::ops::rope_composite(qs[i], cos, sin), ablate::ops::rope_composite(ks[i], cos, sin)};
      auto [a, b] = ablate::ops::rope_qk(qs[i], ks[i], cos, sin);
      outs_o[i] = {a, b};
    }
    auto bwd = [&](std::vector<std::vector<torch::Tensor>>& outs) {
      return [&](int i) {
        const int s = i % sets;
        auto g = torch::autograd::grad(outs[s], {qs[s], ks[s]}, {gqs[s], gks[s]}, /*retain_graph=*/true);
      };
    };
    const Stats comp_b = time_it(bwd(outs_c), o.iters);
    const Stats ours_b = time_it(bwd(outs_o), o.iters);
    torch::GradMode::set_enabled(false);
    const double bwd_err = std::max(
        max_diff(torch::autograd::grad(outs_c[0], {qs[0], ks[0]}, {gqs[0], gks[0]}, true)[0],
                 torch::autograd::grad(outs_o[0], {qs[0], ks[0]}, {gqs[0], gks[0]}, true)[0]),
        0.0);
    row("rope bwd", shape, "composite", comp_b, bytes, 0, 0, 0);
    row("rope bwd", shape, "ours", ours_b, bytes, 0, comp_b.med_ms, bwd_err);
  }
}

// ------------------------------------------------------------------------------------------------ SwiGLU
void bench_swiglu(const Options& o) {
  header("SwiGLU silu(gate) * up, separate gate/up [N, I], bf16");
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  for (int64_t I : {3072, 5632, 11008}) {
    const int64_t N = o.tokens;
    const double e = double(N) * double(I);
    const double fwd_bytes = 3 * e * 2, bwd_bytes = 5 * e * 2;
    const int sets = sets_for(fwd_bytes);
    std::vector<torch::Tensor> gs, us, dys;
    for (int i = 0; i < sets; ++i) {
      gs.push_back(torch::randn({N, I}, bf) * 3);
      us.push_back(torch::randn({N, I}, bf));
      dys.push_back(torch::randn({N, I}, bf));
    }
    const std::string shape = "N" + std::to_string(N) + " I" + std::to_string(I);
    const double err = max_diff(ablate::ops::swiglu(gs[0], us[0]), ablate::ops::swiglu_composite(gs[0], us[0]));
    torch::NoGradGuard ng;
    const Stats comp = time_it([&](int i) { auto y = ablate::ops::swiglu_composite(gs[i % sets], us[i % sets]); }, o.iters);
    const Stats ours = time_it([&](int i) { auto y = ablate::ops::swiglu(gs[i % sets], us[i % sets]); }, o.iters);
    row("swiglu fwd", shape, "composite", comp, fwd_bytes, 0, 0, 0);
    row("swiglu fwd", shape, "ours", ours, fwd_bytes, 0, comp.med_ms, err);
    torch::GradMode::set_enabled(true);
    std::vector<torch::Tensor> outs_c(sets), outs_o(sets);
    for (int i = 0; i < sets; ++i) {
      gs[i].requires_grad_(true);
      us[i].requires_grad_(true);
      outs_c[i] = ablate::ops::swiglu_composite(gs[i], us[i]);
      outs_o[i] = ablate::ops::swiglu(gs[i], us[i]);
    }
    auto bwd = [&](std::vector<torch::Tensor>& outs) {
      return [&](int i) {
        const int s = i % sets;
        auto g = torch::autograd::grad({outs[s]}, {gs[s], us[s]}, {dys[s]}, /*retain_graph=*/true);
      };
    };
    const Stats comp_b = time_it(bwd(outs_c), o.iters);
    const Stats ours_b = time_it(bwd(outs_o), o.iters);
    const double bwd_err = max_diff(torch::autograd::grad({outs_c[0]}, {gs[0]}, {dys[0]}, true)[0],
                                    torch::autograd::grad({outs_o[0]}, {gs[0]}, {dys[0]}, true)[0]);
    torch::GradMode::set_enabled(false);
    row("swiglu bwd", shape, "composite", comp_b, bwd_bytes, 0, 0, 0);
    row("swiglu bwd", shape, "ours", ours_b, bwd_bytes, 0, comp_b.med_ms, bwd_err);
  }
}

// ------------------------------------------------------------------------------------------------ residual + RMSNorm
void bench_rmsnorm_residual(const Options& o) {
  header("residual add + RMSNorm (returns h and y; backward gets dy and dh)");
  for (auto dt : {torch::kBFloat16, torch::kFloat32}) {
    const auto opt = torch::TensorOptions().dtype(dt).device(torch::kCUDA);
    const double es = dt == torch::kBFloat16 ? 2 : 4;
    for (int64_t d : {1024, 2048, 4096}) {
      const int64_t N = o.tokens;
      const double e = double(N) * double(d);
      // fwd: x, residual in; h, y out (w and rstd negligible). bwd: dy, dh, h in; dx out (+ w, rstd, dw).
      const double fwd_bytes = 4 * e * es + double(N) * 4, bwd_bytes = 4 * e * es + double(N) * 4 + 2 * d * es;
      const int sets = sets_for(fwd_bytes);
      std::vector<torch::Tensor> xs, rs, gys, ghs;
      for (int i = 0; i < sets; ++i) {
        xs.push_back(torch::randn({N, d}, opt));
        rs.push_back(torch::randn({N, d}, opt));
        gys.push_back(torch::randn({N, d}, opt));
        ghs.push_back(torch::randn({N, d}, opt));
      }
      auto w = torch::rand({d}, opt) + 0.5;
      const std::string shape = std::string(dt == torch::kBFloat16 ? "bf16" : "fp32") + " N" + std::to_string(N) +
                                " d" + std::to_string(d);
      const double err = max_diff(ablate::ops::rmsnorm_residual(xs[0], rs[0], w, 1e-6).second,
                                  ablate::ops::rmsnorm_residual_composite(xs[0], rs[0], w, 1e-6).second);
      torch::NoGradGuard ng;
      const Stats comp = time_it(
          [&](int i) { auto r = ablate::ops::rmsnorm_residual_composite(xs[i % sets], rs[i % sets], w, 1e-6); },
          o.iters);
      const Stats ours =
          time_it([&](int i) { auto r = ablate::ops::rmsnorm_residual(xs[i % sets], rs[i % sets], w, 1e-6); }, o.iters);
      row("rmsnorm+res fwd", shape, "composite", comp, fwd_bytes, 0, 0, 0);
      row("rmsnorm+res fwd", shape, "ours", ours, fwd_bytes, 0, comp.med_ms, err);
      torch::GradMode::set_enabled(true);
      w.requires_grad_(true);
      std::vector<std::vector<torch::Tensor>> outs_c(sets), outs_o(sets);
      for (int i = 0; i < sets; ++i) {
        xs[i].requires_grad_(true);
        rs[i].requires_grad_(true);
        auto [hc, yc] = ablate::ops::rmsnorm_residual_composite(xs[i], rs[i], w, 1e-6);
        auto [ho, yo] = ablate::ops::rmsnorm_residual(xs[i], rs[i], w, 1e-6);
        outs_c[i] = {hc, yc};
        outs_o[i] = {ho, yo};
      }
      auto bwd = [&](std::vector<std::vector<torch::Tensor>>& outs) {
        return [&](int i) {
          const int s = i % sets;
          auto g = torch::autograd::grad(outs[s], {xs[s], rs[s], w}, {ghs[s], gys[s]}, /*retain_graph=*/true);
        };
      };
      const Stats comp_b = time_it(bwd(outs_c), o.iters);
      const Stats ours_b = time_it(bwd(outs_o), o.iters);
      const double bwd_err = max_diff(torch::autograd::grad(outs_c[0], {xs[0]}, {ghs[0], gys[0]}, true)[0],
                                      torch::autograd::grad(outs_o[0], {xs[0]}, {ghs[0], gys[0]}, true)[0]);
      torch::GradMode::set_enabled(false);
      row("rmsnorm+res bwd", shape, "composite", comp_b, bwd_bytes, 0, 0, 0);
      row("rmsnorm+res bwd", shape, "ours", ours_b, bwd_bytes, 0, comp_b.med_ms, bwd_err);
      // The raw backward kernels (no autograd), each variant: 1 smem dw + re-read, 2 registers, 3 + prefetch.
      {
        auto h = torch::empty({N, d}, opt), y = torch::empty({N, d}, opt);
        auto rstd = torch::empty({N}, opt.dtype(torch::kFloat32));
        ablate::kernels::RMSNormResidualFwdArgs fa;
        fa.x = xs[0].data_ptr();
        fa.residual = rs[0].data_ptr();
        fa.w = w.data_ptr();
        fa.h = h.data_ptr();
        fa.y = y.data_ptr();
        fa.rstd = rstd.data_ptr<float>();
        fa.rows = N;
        fa.cols = d;
        fa.bf16 = fa.w_bf16 = dt == torch::kBFloat16;
        check_cuda(ablate::kernels::rmsnorm_residual_forward_cuda(fa, c10::cuda::getCurrentCUDAStream()), "fwd");
        auto dx = torch::empty({N, d}, opt);
        auto dw = torch::empty({d}, opt.dtype(torch::kFloat32));
        auto ws = torch::empty({ablate::kernels::rmsnorm_residual_bwd_workspace_floats(N, d)}, opt.dtype(torch::kFloat32));
        for (int variant : {1, 2, 3}) {
          ablate::kernels::RMSNormResidualBwdArgs ba;
          ba.dh = ghs[0].data_ptr();
          ba.h = h.data_ptr();
          ba.w = w.data_ptr();
          ba.rstd = rstd.data_ptr<float>();
          ba.dx = dx.data_ptr();
          ba.dw = dw.data_ptr<float>();
          ba.workspace = ws.data_ptr<float>();
          ba.rows = N;
          ba.cols = d;
          ba.bf16 = ba.w_bf16 = fa.bf16;
          ba.variant = variant;
          const Stats st = time_it(
              [&](int i) {
                ba.dy = gys[i % sets].data_ptr();
                check_cuda(ablate::kernels::rmsnorm_residual_backward_cuda(ba, c10::cuda::getCurrentCUDAStream()),
                           "bwd");
              },
              o.iters);
          row("rmsnorm+res bwd", shape, "kernel v" + std::to_string(variant), st, bwd_bytes, 0, comp_b.med_ms, 0);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ linear + CE
// core/model.cpp's chunked_linear_cross_entropy algorithm (matmul -> fp32 logits -> logsumexp, softmax, gather per
// chunk), re-stated here so the benchmark doesn't need the model library: what the model runs today.
torch::Tensor model_style_chunked_ce(const torch::Tensor& hidden, const torch::Tensor& weight,
                                     const torch::Tensor& targets, int64_t chunk_rows, torch::Tensor* grad_h,
                                     torch::Tensor* grad_w) {
  const int64_t N = hidden.size(0);
  const auto valid_mask = targets.ne(-100);
  const auto count = valid_mask.sum().clamp_min(1).to(torch::kFloat32);
  auto total = torch::zeros({}, hidden.options().dtype(torch::kFloat32));
  *grad_h = torch::empty_like(hidden);
  *grad_w = torch::zeros(weight.sizes(), weight.options().dtype(torch::kFloat32));
  for (int64_t s = 0; s < N; s += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - s);
    const auto h = hidden.narrow(0, s, n), t = targets.narrow(0, s, n), valid = valid_mask.narrow(0, s, n);
    const auto logits = torch::matmul(h, weight.t()).to(torch::kFloat32);
    const auto lse = torch::logsumexp(logits, -1);
    const auto safe_t = torch::where(valid, t, torch::zeros_like(t));
    total += ((lse - logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)) * valid.to(torch::kFloat32)).sum();
    auto g = torch::softmax(logits, -1);
    g.scatter_add_(1, safe_t.unsqueeze(1), -torch::ones({n, 1}, g.options()));
    g.mul_(valid.to(torch::kFloat32).unsqueeze(1));
    const auto gc = g.to(hidden.scalar_type());
    grad_h->narrow(0, s, n).copy_(torch::matmul(gc, weight));
    grad_w->add_(torch::matmul(gc.t(), h).to(torch::kFloat32));
  }
  return total / count;
}

void bench_cross_entropy(const Options& o) {
  header("fused linear + cross-entropy, fwd+bwd (loss, dhidden, dweight), bf16, V = 151936");
  const auto bf = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  const int64_t V = 151936;
  for (int64_t d : {1024, 2048, 4096}) {
    const int64_t N = o.tokens;
    const double flops = 3.0 * 2.0 * double(N) * double(V) * double(d);  // logits, dhidden, dweight
    const int sets = 2;
    std::vector<torch::Tensor> hs, ts;
    for (int i = 0; i < sets; ++i) {
      hs.push_back(torch::randn({N, d}, bf));
      auto t = torch::randint(0, V, {N}, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
      t.masked_fill_(torch::rand({N}, torch::kCUDA) < 0.05, -100);
      ts.push_back(t);
    }
    auto w = torch::randn({V, d}, bf) * 0.02;
    const std::string shape = "N" + std::to_string(N) + " d" + std::to_string(d);
    // Check: loss and grads of ours vs the model-style chunked composite.
    torch::Tensor gh_ref, gw_ref;
    double err = 0;
    {
      const torch::AutoGradMode grad_on(true);
      auto h = hs[0].detach().requires_grad_(true), ww = w.detach().requires_grad_(true);
      auto l = ablate::ops::linear_cross_entropy(h, ww, ts[0]);
      l.backward();
      auto l_ref = model_style_chunked_ce(hs[0], w, ts[0], 4096, &gh_ref, &gw_ref);
      const auto count = ts[0].ne(-100).sum().clamp_min(1).to(torch::kFloat32);  // the model divides in backward
      gh_ref = gh_ref / count;
      gw_ref = gw_ref / count;
      err = std::abs(l.item<double>() - l_ref.item<double>());
      std::printf("check %s: loss ours %.6f composite %.6f; max |dh| diff %.3e; max |dW| diff %.3e\n", shape.c_str(),
                  l.item<double>(), l_ref.item<double>(), max_diff(h.grad(), gh_ref), max_diff(ww.grad(), gw_ref));
    }
    const int iters = std::max(10, o.iters / 5);  // each iteration is ~0.1 s of matmuls
    // The model's default chunk (max(256, 2^24 / V) = 256 rows) and a larger one.
    for (int64_t chunk : {int64_t(256), int64_t(4096)}) {
      const Stats comp = time_it(
          [&](int i) {
            torch::Tensor gh, gw;
            auto l = model_style_chunked_ce(hs[i % sets], w, ts[i % sets], chunk, &gh, &gw);
          },
          iters, 2);
      row("linear+CE", shape, "model@" + std::to_string(chunk), comp, 0, flops, 0, 0);
    }
    const Stats comp4k = time_it(
        [&](int i) {
          torch::Tensor gh, gw;
          auto l = model_style_chunked_ce(hs[i % sets], w, ts[i % sets], 4096, &gh, &gw);
        },
        iters, 2);
    torch::GradMode::set_enabled(true);
    auto ww = w.detach().requires_grad_(true);
    for (int64_t chunk : {int64_t(1024), int64_t(0), int64_t(8192)}) {
      const Stats ours = time_it(
          [&](int i) {
            auto h = hs[i % sets].detach().requires_grad_(true);
            auto g = torch::autograd::grad({ablate::ops::linear_cross_entropy(h, ww, ts[i % sets], chunk)}, {h, ww});
          },
          iters, 2);
      const int64_t c = chunk > 0 ? chunk : ablate::ops::linear_cross_entropy_chunk_rows(V);
      row("linear+CE", shape, "ours@" + std::to_string(c), ours, 0, flops, comp4k.med_ms, err);
    }
    torch::GradMode::set_enabled(false);
    // The matmuls alone (the floor of any chunked method): logits, dhidden, dweight for all N rows.
    {
      auto lg = torch::empty({4096, V}, bf);
      auto gw = torch::empty({V, d}, bf);
      const Stats mm = time_it(
          [&](int i) {
            const auto& h = hs[i % sets];
            for (int64_t s = 0; s < N; s += 4096) {
              const int64_t n = std::min<int64_t>(4096, N - s);
              auto l = lg.narrow(0, 0, n);
              at::mm_out(l, h.narrow(0, s, n), w.t());
              auto gh = at::mm(l, w);
              at::addmm_out(gw, gw, l.t(), h.narrow(0, s, n));
            }
          },
          iters, 2);
      row("linear+CE", shape, "3 matmuls", mm, 0, flops, comp4k.med_ms, 0);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--op") o.op = next();
    else if (a == "--iters") o.iters = std::max(50, std::stoi(next()));
    else if (a == "--tokens") o.tokens = std::stoll(next());
    else if (a == "--json") o.json_path = next();
    else {
      std::fprintf(stderr, "usage: %s [--op all|rope|swiglu|rmsnorm_residual|cross_entropy] [--iters N>=50] "
                   "[--tokens N] [--json FILE]\n", argv[0]);
      return 2;
    }
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a crash must not eat the table printed so far
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "kernels_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, 0), "properties");
  g_l2_bytes = prop.l2CacheSize;
  g_flush = torch::empty({2 * g_l2_bytes / 4}, torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCUDA));
  std::printf("device %s, %d SMs, L2 %.0f MB; ceilings: copy %.1f TB/s, bf16 matmul %.0f TFLOP/s; %d iterations\n",
              prop.name, prop.multiProcessorCount, g_l2_bytes / 1e6, kCopyCeiling / 1e12, kMatmulCeiling / 1e12,
              o.iters);
  if (!o.json_path.empty()) g_json.open(o.json_path);
  torch::manual_seed(0);
  torch::NoGradGuard ng;
  torch::GradMode::set_enabled(false);
  if (o.op == "all" || o.op == "rope") bench_rope(o);
  if (o.op == "all" || o.op == "swiglu") bench_swiglu(o);
  if (o.op == "all" || o.op == "rmsnorm_residual") bench_rmsnorm_residual(o);
  if (o.op == "all" || o.op == "cross_entropy") bench_cross_entropy(o);
  check_cuda(cudaDeviceSynchronize(), "final sync");
  return 0;
}
