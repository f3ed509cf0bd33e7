// mixer_bench: our sequence-mixer ops (K1-K4 of shared/BENCHMARKS.md) at the benchmark shapes, fwd and fwd+bwd.
//
//   K1 dense causal attention  the model's own call (core::causal_attention, core/mixers/causal_attention.h: SDPA,
//                              is_causal, enable_gqa in bf16/fp16) and, as a second row, SDPA with enable_gqa
//                              always (no K/V copy)
//   K2 NSA                     core/mixers/nsa.h public functions: "cmp+slc" = compress_keys/values (the module's
//                              MLPs) + nsa_compressed_attention (with top-n selection) + nsa_selected_attention;
//                              "swa" = nsa_window_attention ("swa_flash" / "swa_sdpa": its other CUDA path, with
//                              FlashAttention-2's local mode switched); paper config l=32, d=16, l'=64, n=16, w=512;
//                              "cmp" / "slc" = the two halves of cmp+slc alone, "cmp" forced onto the chunked
//                              LibTorch path, "cmp_fused" = "cmp" on the fused CUDA kernels of
//                              kernels/nsa_compress.h (the default on CUDA, so "cmp+slc" runs them too)
//   K3 Mamba2 SSD              core/mixers/ssd.h ssd_chunked, chunk 256
//   K4 Gated DeltaNet          core/mixers/delta_rule.h gated_delta_rule_chunked, chunk 64
//
// Inputs are bf16 (q/k/v, x/B/C). SSD's dt and A and DeltaNet's g (log-decay) and beta are fp32: our functions
// take any dtype and compute in fp32 internally (bf16/fp16 inputs are upcast), mamba_ssm and fla do the same.
//
// Method (shared/BENCHMARKS.md "Method (GPU)"): every case first passes a correctness check at a small T against
// a reference (K1: an fp32 math-path composite softmax(QK^T)V, criterion max|ours - ref| <= 2 max|composite in
// bf16 - ref| + 1e-3 as flash-attention's tests; K2-K4: the repo's own dense/sequential references in fp32/fp64,
// relative RMS error criterion as fla's tests), then is timed: warm-up, then CUDA events around each call with
// the L2 flushed (a 2 x L2 buffer overwritten) before every call, median and p20/p80. Iterations adapt to a time
// budget per row (>= 50 when it fits, never fewer than --min_iters; the JSON says how many); a global deadline
// skips the remaining rows (reported). fwd+bwd = forward + torch::autograd::grad of all float inputs with a fixed
// random cotangent. Outputs: a table, and one JSON object per row on stdout (lines starting with '{') and in
// --json FILE. Exit status 1 when a correctness check fails.
//
//   mixer_bench [--device cuda|cpu] [--case all|k1,k2,k3,k4 (a list, in order)] [--smoke] [--max_t N] [--iters 50]
//   [--min_iters 5]
//               [--budget_s 3] [--deadline_s 200] [--json FILE]
// --smoke: tiny shapes and 3 iterations (CPU ctest); the checks are the same.
#include <torch/torch.h>

#if ABLATE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/mixers/causal_attention.h"
#include "core/mixers/delta_rule.h"
#include "core/mixers/nsa.h"
#include "core/mixers/ssd.h"

namespace {

using torch::Tensor;
namespace core = ablate::core;
constexpr double kMatmulCeiling = 790e12;  // FLOP/s, dense bf16 matmul measured on the H200
constexpr double kCopyCeiling = 4.3e12;    // bytes/s, device copy measured on the H200

struct Options {
  std::string device = "cuda";
  std::string which = "all";
  bool smoke = false;
  int64_t max_t = int64_t{1} << 20;
  int iters = 50, min_iters = 5;
  double budget_s = 3.0, deadline_s = 200.0;
  std::string json_path;
};

struct Stats {
  double med_ms = 0, p20_ms = 0, p80_ms = 0;
  int iters = 0;
};

Options g_opt;
torch::Device g_dev(torch::kCPU);
std::ofstream g_json;
Tensor g_flush;
std::chrono::steady_clock::time_point g_start;
int g_failures = 0;
std::map<std::string, int> g_case_failures;  // by id: rows of a case whose check failed say so

double elapsed_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count(); }

void sync() {
#if ABLATE_WITH_CUDA
  if (g_dev.is_cuda()) AT_CUDA_CHECK(cudaDeviceSynchronize());
#endif
}

[[maybe_unused]] void flush_l2() {
  if (g_flush.defined()) g_flush.add_(1.0f);
}

// Warm-up (two calls; the second, timed, sizes the run), then iterations timed one by one: CUDA events on CUDA, the
// steady clock (after a sync) on CPU.
Stats time_it(const std::function<void()>& fn) {
  fn();  // first call: allocator growth, cuBLAS/cuDNN plan selection
  sync();
  auto t0 = std::chrono::steady_clock::now();
  fn();  // sizes the run
  sync();
  const double first = std::max(1e-6, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  // Slow calls (> budget): no further warm-up, and at least 3 timed calls within ~6 budgets.
  const int warm = first > g_opt.budget_s ? 0 : std::clamp(static_cast<int>(0.3 * g_opt.budget_s / first), 1, 9);
  for (int i = 0; i < warm; ++i) fn();
  sync();
  int iters = std::clamp(static_cast<int>(g_opt.budget_s / first), g_opt.min_iters, g_opt.iters);
  if (first * iters > 6 * g_opt.budget_s)
    iters = std::max(std::min(3, g_opt.iters), static_cast<int>(6 * g_opt.budget_s / first));
  std::vector<double> ms(iters);
#if ABLATE_WITH_CUDA
  if (g_dev.is_cuda()) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    std::vector<cudaEvent_t> a(iters), b(iters);
    for (int i = 0; i < iters; ++i) {
      AT_CUDA_CHECK(cudaEventCreate(&a[i]));
      AT_CUDA_CHECK(cudaEventCreate(&b[i]));
    }
    for (int i = 0; i < iters; ++i) {
      flush_l2();  // outside the events
      AT_CUDA_CHECK(cudaEventRecord(a[i], stream));
      fn();
      AT_CUDA_CHECK(cudaEventRecord(b[i], stream));
    }
    AT_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int i = 0; i < iters; ++i) {
      float t = 0;
      AT_CUDA_CHECK(cudaEventElapsedTime(&t, a[i], b[i]));
      ms[i] = t;
      cudaEventDestroy(a[i]);
      cudaEventDestroy(b[i]);
    }
  } else
#endif
  {
    for (int i = 0; i < iters; ++i) {
      auto s = std::chrono::steady_clock::now();
      fn();
      ms[i] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s).count();
    }
  }
  std::sort(ms.begin(), ms.end());
  auto pct = [&](double p) { return ms[std::min<size_t>(ms.size() - 1, size_t(p * double(ms.size() - 1) + 0.5))]; };
  return {pct(0.5), pct(0.2), pct(0.8), iters};
}

// ------------------------------------------------------------------------------------------------ reporting
std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o;
}

void emit(const std::string& js) {
  std::printf("%s\n", js.c_str());
  if (g_json.is_open()) g_json << js << "\n" << std::flush;
}

void header(const std::string& title) {
  std::printf("\n== %s\n%-5s %-34s %-10s %-8s %9s %9s %9s %5s %9s %7s %9s\n", title.c_str(), "id", "shape", "variant",
              "dir", "med ms", "p20 ms", "p80 ms", "n", "TFLOP/s", "%790", "floor ms");
}

// flops / bytes: the work of this row (fwd or fwd+bwd); floor = max(flops / 790e12, bytes / 4.3e12).
void row(const std::string& id, const std::string& shape, const std::string& variant, const std::string& dir,
         const Stats& s, double flops, double bytes, std::string check) {
  if (g_case_failures[id] > 0) check = "check FAILED (see the check lines)";
  const double sec = s.med_ms * 1e-3;
  const double tf = flops / sec / 1e12;
  const double floor_ms = 1e3 * std::max(flops / kMatmulCeiling, bytes / kCopyCeiling);
  std::printf("%-5s %-34s %-10s %-8s %9.3f %9.3f %9.3f %5d %9.1f %6.1f%% %9.3f\n", id.c_str(), shape.c_str(),
              variant.c_str(), dir.c_str(), s.med_ms, s.p20_ms, s.p80_ms, s.iters, tf,
              100.0 * tf * 1e12 / kMatmulCeiling, floor_ms);
  char js[2048];
  std::snprintf(js, sizeof js,
                "{\"bench\":\"mixer_bench\",\"id\":\"%s\",\"shape\":\"%s\",\"impl\":\"ours\",\"variant\":\"%s\","
                "\"dir\":\"%s\",\"device\":\"%s\",\"median_ms\":%.5f,\"p20_ms\":%.5f,\"p80_ms\":%.5f,\"iters\":%d,"
                "\"flops\":%.6g,\"min_bytes\":%.6g,\"tflops\":%.2f,\"floor_ms\":%.5f,\"check\":\"%s\"}",
                id.c_str(), shape.c_str(), variant.c_str(), dir.c_str(), g_dev.str().c_str(), s.med_ms, s.p20_ms,
                s.p80_ms, s.iters, flops, bytes, tf, floor_ms, json_escape(check).c_str());
  emit(js);
}

void skipped(const std::string& id, const std::string& shape, const std::string& variant, const std::string& why) {
  std::printf("%-5s %-34s %-10s SKIPPED: %s\n", id.c_str(), shape.c_str(), variant.c_str(), why.c_str());
  char js[2048];
  std::snprintf(js, sizeof js,
                "{\"bench\":\"mixer_bench\",\"id\":\"%s\",\"shape\":\"%s\",\"impl\":\"ours\",\"variant\":\"%s\","
                "\"device\":\"%s\",\"skipped\":\"%s\"}",
                id.c_str(), shape.c_str(), variant.c_str(), g_dev.str().c_str(), json_escape(why).c_str());
  emit(js);
}

void check_result(const std::string& id, const std::string& what, bool ok, const std::string& detail) {
  std::printf("check %-4s %-40s %s  %s\n", id.c_str(), what.c_str(), ok ? "PASS" : "FAIL", detail.c_str());
  char js[2048];
  std::snprintf(js, sizeof js,
                "{\"bench\":\"mixer_bench\",\"id\":\"%s\",\"check\":\"%s\",\"pass\":%s,\"detail\":\"%s\","
                "\"device\":\"%s\"}",
                id.c_str(), json_escape(what).c_str(), ok ? "true" : "false", json_escape(detail).c_str(),
                g_dev.str().c_str());
  emit(js);
  if (!ok) {
    ++g_failures;
    ++g_case_failures[id];
  }
}

double rel_rms(const Tensor& a, const Tensor& ref) {
  const auto r = ref.to(torch::kFloat64);
  return (a.to(torch::kFloat64) - r).norm().item<double>() / std::max(r.norm().item<double>(), 1e-30);
}

double max_abs(const Tensor& a, const Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

std::string fmt(const char* f, double a, double b = 0) {
  char s[256];
  std::snprintf(s, sizeof s, f, a, b);
  return s;
}

std::string kstr(int64_t T) { return T % 1024 == 0 ? std::to_string(T / 1024) + "K" : std::to_string(T); }

bool past_deadline() { return elapsed_s() > g_opt.deadline_s; }

void free_cache() {
#if ABLATE_WITH_CUDA
  if (g_dev.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

torch::TensorOptions bf16() { return torch::TensorOptions().dtype(torch::kBFloat16).device(g_dev); }
torch::TensorOptions f32() { return torch::TensorOptions().dtype(torch::kFloat32).device(g_dev); }

// Times fwd (no grad) and fwd+bwd (grads of `inputs` with cotangent `gy` on fwd's output), one row each.
void time_fwd_bwd(const std::string& id, const std::string& shape, const std::string& variant,
                  const std::function<Tensor()>& fwd, const std::vector<Tensor>& inputs, const Tensor& gy,
                  double flops_fwd, double flops_bwd_factor, double bytes_fwd, double bytes_fb,
                  const std::string& check) {
  if (past_deadline()) return skipped(id, shape, variant, "global deadline reached");
  try {
    {
      torch::NoGradGuard ng;
      const Stats s = time_it([&] { auto y = fwd(); });
      row(id, shape, variant, "fwd", s, flops_fwd, bytes_fwd, check);
    }
    if (past_deadline()) return skipped(id, shape, variant + " fwd+bwd", "global deadline reached");
    const Stats s = time_it([&] {
      auto y = fwd();
      auto g = torch::autograd::grad({y}, inputs, {gy});
    });
    row(id, shape, variant, "fwd+bwd", s, flops_fwd * flops_bwd_factor, bytes_fb, check);
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    skipped(id, shape, variant, "error: " + msg.substr(0, 300));
  }
  free_cache();
}

// ================================================================================================ K1 dense attention
// The model's attention call (core/model.cpp AttentionImpl::forward): core::causal_attention.
Tensor attention_model_path(const Tensor& q, const Tensor& k, const Tensor& v) {
  return core::causal_attention(q, k, v);
}

Tensor attention_enable_gqa(const Tensor& q, const Tensor& k, const Tensor& v) {
  return at::scaled_dot_product_attention(q, k, v, {}, 0.0, true, std::nullopt, q.size(1) != k.size(1));
}

// softmax(Q K^T / sqrt(d) + causal mask) V written out in the inputs' dtype: SDPA's math path.
Tensor attention_composite(const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t H = q.size(1), KV = k.size(1), T = q.size(2);
  auto kk = k.repeat_interleave(H / KV, 1), vv = v.repeat_interleave(H / KV, 1);
  auto s = torch::matmul(q, kk.transpose(-1, -2)) * (1.0 / std::sqrt(double(q.size(3))));
  auto mask = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool).device(q.device())).triu(1);
  s = s.masked_fill(mask, -std::numeric_limits<double>::infinity());
  return torch::matmul(torch::softmax(s, -1), vv);
}

struct AttnShape {
  int64_t B, H, KV, T;
};

void check_k1(const AttnShape& sh) {
  const int64_t T = g_opt.smoke ? 64 : 1024, d = 128;
  torch::manual_seed(1);
  auto q = torch::randn({sh.B, sh.H, T, d}, bf16()), k = torch::randn({sh.B, sh.KV, T, d}, bf16()),
       v = torch::randn({sh.B, sh.KV, T, d}, bf16()), gy = torch::randn({sh.B, sh.H, T, d}, bf16());
  auto grads = [&](const std::function<Tensor(const Tensor&, const Tensor&, const Tensor&)>& f, torch::ScalarType dt) {
    auto qi = q.to(dt).requires_grad_(true), ki = k.to(dt).requires_grad_(true), vi = v.to(dt).requires_grad_(true);
    auto y = f(qi, ki, vi);
    auto g = torch::autograd::grad({y}, {qi, ki, vi}, {gy.to(dt)});
    return std::vector<Tensor>{y.detach(), g[0], g[1], g[2]};
  };
  const auto ref = grads(attention_composite, torch::kFloat32);
  const auto comp = grads(attention_composite, torch::kBFloat16);
  for (auto [name, f] : {std::pair<const char*, Tensor (*)(const Tensor&, const Tensor&, const Tensor&)>{
                             "model path (core::causal_attention)", attention_model_path},
                         {"SDPA enable_gqa", attention_enable_gqa}}) {
    const auto ours = grads(f, torch::kBFloat16);
    const char* parts[] = {"o", "dq", "dk", "dv"};
    bool ok = true;
    std::string detail;
    for (int i = 0; i < 4; ++i) {
      const double e = max_abs(ours[i], ref[i]), ec = max_abs(comp[i], ref[i]);
      ok = ok && e <= 2 * ec + 1e-3;
      detail += std::string(parts[i]) + fmt(" %.2e (bf16 composite %.2e) ", e, ec);
    }
    check_result("K1", std::string(name) + " T" + kstr(T), ok, detail);
  }
}

void bench_k1() {
  header("K1 dense causal attention, bf16, d=128 (ours = core/model.cpp's call; fwd FLOPs 2*B*H*T^2*d, bwd 2.5x)");
  std::vector<AttnShape> shapes;
  if (g_opt.smoke) {
    shapes = {{1, 4, 2, 128}};
  } else {
    // 0.6B heads 16/8 at 4K/32K/128K; 4B heads 32/8 at 32K/64K (K2's dense at G=4); 64/4 at 64K (K2's dense at G=16).
    shapes = {{1, 16, 8, 4096},  {1, 16, 8, 32768}, {1, 16, 8, 131072}, {1, 32, 8, 32768},
              {1, 32, 8, 65536}, {1, 64, 4, 65536}, {1, 16, 1, 32768}};
  }
  check_k1(shapes.front());
  const int64_t d = 128;
  for (const auto& sh : shapes) {
    if (sh.T > g_opt.max_t) continue;
    torch::manual_seed(2);
    auto q = torch::randn({sh.B, sh.H, sh.T, d}, bf16()).requires_grad_(true);
    auto k = torch::randn({sh.B, sh.KV, sh.T, d}, bf16()).requires_grad_(true);
    auto v = torch::randn({sh.B, sh.KV, sh.T, d}, bf16()).requires_grad_(true);
    auto gy = torch::randn({sh.B, sh.H, sh.T, d}, bf16());
    const double flops = 2.0 * double(sh.B) * double(sh.H) * double(sh.T) * double(sh.T) * double(d);  // causal
    const double bytes = 2.0 * double(sh.B * sh.T * d) * double(2 * sh.H + 2 * sh.KV);                 // q, k, v, o
    const std::string shape = "B" + std::to_string(sh.B) + " T" + kstr(sh.T) + " H" + std::to_string(sh.H) + "/" +
                              std::to_string(sh.KV) + " d" + std::to_string(d);
    time_fwd_bwd(
        "K1", shape, "model", [&] { return attention_model_path(q, k, v); }, {q, k, v}, gy, flops, 3.5, bytes,
        2.5 * bytes, "passed");
    time_fwd_bwd(
        "K1", shape, "gqa", [&] { return attention_enable_gqa(q, k, v); }, {q, k, v}, gy, flops, 3.5, bytes,
        2.5 * bytes, "passed");
  }
}

// ================================================================================================ K2 NSA
// The fused compressed-branch kernels on or off for a scope (on by default on CUDA; off = the chunked LibTorch path).
struct CmpFused {
  explicit CmpFused(bool on) : prev(core::nsa_cmp_fused_enabled()) { core::nsa_set_cmp_fused_enabled(on); }
  ~CmpFused() { core::nsa_set_cmp_fused_enabled(prev); }
  bool prev;
};

core::NsaAttentionOptions nsa_options(int64_t H, int64_t KV, int64_t d) {
  auto o = core::NsaAttentionOptions(H * d, H, KV, d);  // defaults: l=32, d=16, l'=64, n=16, w=512
  if (g_opt.smoke) {
    o.cmp_block(16).cmp_stride(8).slc_block(16).num_selected(4).window(32).query_chunk(64).chunk_budget(1 << 20);
  } else if (!g_dev.is_cuda()) {
    o.chunk_budget(int64_t{1} << 22);
  }
  return o;
}

// Per-query key counts of the three branches, averaged over t = 0..T-1 (core/flops.cpp nsa_mean_keys split).
struct NsaKeys {
  double cmp = 0, slc = 0, swa = 0;
};
NsaKeys nsa_keys(const core::NsaAttentionOptions& o, int64_t T) {
  NsaKeys k;
  const int64_t l = o.cmp_block(), st = o.cmp_stride(), ls = o.slc_block(), n = o.num_selected(), w = o.window();
  for (int64_t t = 0; t < T; ++t) {
    k.cmp += t >= l - 1 ? double((t - l + 1) / st + 1) : 0.0;
    k.slc += t / ls + 1 <= n ? double(t + 1) : double((n - 1) * ls + (t % ls) + 1);
    k.swa += double(std::min(w, t + 1));
  }
  k.cmp /= double(T);
  k.slc /= double(T);
  k.swa /= double(T);
  return k;
}

// The repo's dense reference (fp32) against our chunked branches (bf16): outputs and input gradients per branch.
// The selected branch is fed the reference's block indices, so a near-tie in the top-n (bf16 vs fp32 scores) cannot
// masquerade as an attention error; the selection itself is compared in fp32 (ours vs the reference).
void check_k2(int64_t H, int64_t KV) {
  const int64_t d = g_opt.smoke ? 32 : 128, T = g_opt.smoke ? 96 : 1024, B = 1;
  const auto o = nsa_options(H, KV, d);
  torch::manual_seed(3);
  core::NsaAttention m32(o);
  torch::manual_seed(3);
  core::NsaAttention m16(o);
  m32->to(g_dev, torch::kFloat32);
  m16->to(g_dev, torch::kBFloat16);
  torch::manual_seed(4);
  auto q = torch::randn({B, T, H, d}, bf16()), k = torch::randn({B, T, KV, d}, bf16()),
       v = torch::randn({B, T, KV, d}, bf16()), x = torch::randn({B, T, H * d}, bf16());
  auto gy = torch::randn({B, T, H, d}, f32());
  const std::string tag = "H" + std::to_string(H) + "/" + std::to_string(KV) + " T" + kstr(T);
  try {
    auto q32 = q.to(torch::kFloat32).requires_grad_(true), k32 = k.to(torch::kFloat32).requires_grad_(true),
         v32 = v.to(torch::kFloat32).requires_grad_(true);
    auto ref = core::nsa_reference(*m32, q32, k32, v32, x.to(torch::kFloat32));
    const auto& rb = ref.branches;
    {
      torch::NoGradGuard ng;
      CmpFused libtorch_path(false);
      auto c32 = core::nsa_compressed_attention(q32.detach(), m32->compress_keys(k32.detach()),
                                                m32->compress_values(v32.detach()), o);
      const double same = c32.block_idx.eq(rb.block_idx).to(torch::kFloat64).mean().item<double>();
      check_result("K2", "selection (fp32) == reference " + tag, same >= 0.99, fmt("%.5f of block ids equal", same));
      if (g_dev.is_cuda()) {
        CmpFused fused(true);
        auto f32 = core::nsa_compressed_attention(q32.detach(), m32->compress_keys(k32.detach()),
                                                  m32->compress_values(v32.detach()), o);
        const double fsame = f32.block_idx.eq(rb.block_idx).to(torch::kFloat64).mean().item<double>();
        check_result("K2", "cmp_fused selection (fp32) == reference " + tag, fsame >= 0.99,
                     fmt("%.5f of block ids equal", fsame));
      }
    }
    auto qb = q.clone().requires_grad_(true), kb = k.clone().requires_grad_(true), vb = v.clone().requires_grad_(true);
    auto cmp = [&] {
      CmpFused libtorch_path(false);
      return core::nsa_compressed_attention(qb, m16->compress_keys(kb), m16->compress_values(vb), o);
    }();
    std::vector<std::pair<std::string, std::pair<Tensor, Tensor>>> branches = {
        {"cmp", {cmp.out, rb.o_cmp}},
        {"slc", {core::nsa_selected_attention(qb, kb, vb, rb.block_idx, o), rb.o_slc}},
        {"swa", {core::nsa_window_attention(qb, kb, vb, o), rb.o_swa}}};
    if (g_dev.is_cuda()) {
      CmpFused fused(true);
      auto f = core::nsa_compressed_attention(qb, m16->compress_keys(kb), m16->compress_values(vb), o);
      branches.push_back({"cmp_fused", {f.out, rb.o_cmp}});
    }
    for (const auto& [name, pr] : branches) {
      const auto& [ours, want] = pr;
      const double eo = rel_rms(ours, want);
      std::string detail = fmt("o %.2e", eo);
      bool ok = eo <= 1e-2;
      auto go = torch::autograd::grad({ours}, {qb, kb, vb}, {gy.to(torch::kBFloat16)}, true, false, true);
      auto gr = torch::autograd::grad({want}, {q32, k32, v32}, {gy}, true, false, true);
      const char* names[] = {"dq", "dk", "dv"};
      for (int i = 0; i < 3; ++i) {
        if (!gr[i].defined()) continue;
        const double e = rel_rms(go[i].defined() ? go[i] : torch::zeros_like(gr[i]), gr[i]);
        ok = ok && e <= 2e-2;
        detail += std::string(" ") + names[i] + fmt(" %.2e", e);
      }
      check_result("K2", name + " (bf16) vs nsa_reference (fp32) " + tag, ok,
                   detail + " (rel. RMS; o <= 1e-2, grads <= 2e-2)");
    }
  } catch (const c10::Error& e) {
    check_result("K2", "NSA check " + tag, false, std::string("error: ") + e.what_without_backtrace());
  }
  free_cache();
}

void bench_k2() {
  header("K2 NSA, bf16, d=128 (cmp+slc = compression MLPs + compressed attn + top-n + selected attn; swa = window; "
         "cmp / cmp_fused / slc alone up to 32K)");
  struct S {
    int64_t B, H, KV, T;
  };
  std::vector<S> shapes;
  if (g_opt.smoke) {
    shapes = {{1, 4, 1, 128}};
  } else {
    shapes = {{1, 64, 4, 32768}, {1, 64, 4, 65536}, {1, 64, 4, 131072}, {1, 16, 1, 32768},
              {1, 32, 8, 32768}, {1, 32, 8, 65536}, {1, 32, 8, 131072}};
  }
  check_k2(shapes.front().H, shapes.front().KV);
  if (!g_opt.smoke) check_k2(32, 8);  // group 4
  const int64_t d = g_opt.smoke ? 32 : 128;
  for (const auto& sh : shapes) {
    if (sh.T > g_opt.max_t) continue;
    const auto o = nsa_options(sh.H, sh.KV, d);
    torch::manual_seed(5);
    core::NsaAttention m(o);
    m->to(g_dev, torch::kBFloat16);
    auto q = torch::randn({sh.B, sh.T, sh.H, d}, bf16()).requires_grad_(true);
    auto k = torch::randn({sh.B, sh.T, sh.KV, d}, bf16()).requires_grad_(true);
    auto v = torch::randn({sh.B, sh.T, sh.KV, d}, bf16()).requires_grad_(true);
    auto gy = torch::randn({sh.B, sh.T, sh.H, d}, bf16());
    const auto keys = nsa_keys(o, sh.T);
    const double per_key = 4.0 * double(sh.B * sh.T * sh.H * d);  // QK^T and PV per attended key, fwd
    const int64_t nc = o.num_cmp_blocks(sh.T);
    const double hidden = double(d);  // cmp_hidden 0 = head_dim
    const double mlp =
        2.0 * 2.0 * double(sh.B * nc * sh.KV) * (double(o.cmp_block() * d) * hidden + hidden * double(d));
    const double bytes = 2.0 * double(sh.B * sh.T * d) * double(2 * sh.H + 2 * sh.KV);
    const std::string shape = "B" + std::to_string(sh.B) + " T" + kstr(sh.T) + " H" + std::to_string(sh.H) + "/" +
                              std::to_string(sh.KV) + " G" + std::to_string(sh.H / sh.KV);
    time_fwd_bwd(
        "K2", shape, "cmp+slc",
        [&] {
          auto c = core::nsa_compressed_attention(q, m->compress_keys(k), m->compress_values(v), o);
          return c.out + core::nsa_selected_attention(q, k, v, c.block_idx, o);
        },
        {q, k, v}, gy, per_key * (keys.cmp + keys.slc) + mlp, 3.5, bytes, 2.5 * bytes, "passed");
    time_fwd_bwd(
        "K2", shape, "swa", [&] { return core::nsa_window_attention(q, k, v, o); }, {q, k, v}, gy, per_key * keys.swa,
        3.5, bytes, 2.5 * bytes, "passed");
    if (g_dev.is_cuda()) {  // the window's other CUDA path: FlashAttention-2 local vs SDPA on chunks
      const bool flash = core::nsa_swa_flash_enabled();
      core::nsa_set_swa_flash_enabled(!flash);
      time_fwd_bwd(
          "K2", shape, flash ? "swa_sdpa" : "swa_flash", [&] { return core::nsa_window_attention(q, k, v, o); },
          {q, k, v}, gy, per_key * keys.swa, 3.5, bytes, 2.5 * bytes, "passed");
      core::nsa_set_swa_flash_enabled(flash);
    }
    // Where cmp+slc's time goes (up to 32K, to keep the run short): the compressed branch with its top-n alone,
    // and the selected branch alone on a fixed selection.
    if (sh.T <= 32768) {
      {
        CmpFused libtorch_path(false);
        time_fwd_bwd(
            "K2", shape, "cmp",
            [&] { return core::nsa_compressed_attention(q, m->compress_keys(k), m->compress_values(v), o).out; },
            {q, k, v}, gy, per_key * keys.cmp + mlp, 3.5, bytes, 2.5 * bytes, "passed");
      }
      if (g_dev.is_cuda()) {
        CmpFused fused(true);
        time_fwd_bwd(
            "K2", shape, "cmp_fused",
            [&] { return core::nsa_compressed_attention(q, m->compress_keys(k), m->compress_values(v), o).out; },
            {q, k, v}, gy, per_key * keys.cmp + mlp, 3.5, bytes, 2.5 * bytes, "passed");
      }
      Tensor idx;
      {
        torch::NoGradGuard no_grad;
        idx = core::nsa_compressed_attention(q, m->compress_keys(k), m->compress_values(v), o).block_idx;
      }
      time_fwd_bwd(
          "K2", shape, "slc", [&] { return core::nsa_selected_attention(q, k, v, idx, o); }, {q, k, v}, gy,
          per_key * keys.slc, 3.5, bytes, 2.5 * bytes, "passed");
    }
  }
}

// ================================================================================================ K3 Mamba2 SSD
struct SsdInputs {
  Tensor x, dt, A, B, C;
};
// x, B, C bf16 (N(0,1)); dt log-uniform in [1e-3, 1e-1] and A = -exp(U[0, log 16]) fp32, as mamba_ssm initialises.
SsdInputs ssd_inputs(int64_t Bn, int64_t T, int64_t H, int64_t P, int64_t G, int64_t N) {
  SsdInputs s;
  s.x = torch::randn({Bn, T, H, P}, bf16());
  s.dt = torch::exp(torch::rand({Bn, T, H}, f32()) * (std::log(1e-1) - std::log(1e-3)) + std::log(1e-3));
  s.A = -torch::exp(torch::rand({H}, f32()) * std::log(16.0));
  s.B = torch::randn({Bn, T, G, N}, bf16());
  s.C = torch::randn({Bn, T, G, N}, bf16());
  return s;
}

double ssd_macs_per_token(int64_t H, int64_t P, int64_t G, int64_t N, int64_t T, int64_t chunk) {
  const double c = double(std::min(chunk, T)), nc = std::ceil(double(T) / c);  // docs/flops.md
  return double(G) * c * double(N) + double(H) * c * double(P) + 2.0 * double(H * N * P) + double(H * N * P) * nc / c;
}

void check_k3(int64_t H, int64_t P, int64_t G, int64_t N, int64_t chunk) {
  const int64_t T = g_opt.smoke ? 80 : 600, Bn = 1;  // not a multiple of the chunk: the padding path too
  torch::manual_seed(6);
  auto s = ssd_inputs(Bn, T, H, P, G, N);
  auto gy = torch::randn({Bn, T, H, P}, f32());
  auto run = [&](bool chunked, torch::ScalarType lowp) {
    std::vector<Tensor> in = {s.x.to(lowp), s.dt.to(lowp == torch::kFloat64 ? lowp : torch::kFloat32),
                              s.A.to(lowp == torch::kFloat64 ? lowp : torch::kFloat32), s.B.to(lowp), s.C.to(lowp)};
    for (auto& t : in) t.requires_grad_(true);
    auto y = chunked ? std::get<0>(core::ssd_chunked(in[0], in[1], in[2], in[3], in[4], chunk))
                     : std::get<0>(core::ssd_sequential(in[0], in[1], in[2], in[3], in[4]));
    auto g = torch::autograd::grad({y}, in, {gy.to(y.scalar_type())});
    g.insert(g.begin(), y.detach());
    return g;
  };
  const auto ref = run(false, torch::kFloat64);
  const auto ours = run(true, torch::kBFloat16);
  const char* names[] = {"y", "dx", "ddt", "dA", "dB", "dC"};
  bool ok = true;
  std::string detail;
  for (int i = 0; i < 6; ++i) {
    const double e = rel_rms(ours[i], ref[i]);
    ok = ok && e <= (i == 0 ? 1e-2 : 2e-2);
    detail += std::string(names[i]) + fmt(" %.2e ", e);
  }
  check_result("K3", "ssd_chunked (bf16 in) vs ssd_sequential (fp64) T" + std::to_string(T), ok,
               detail + "(rel. RMS; y <= 1e-2, grads <= 2e-2)");
  free_cache();
}

void bench_k3() {
  header("K3 Mamba2 SSD chunk scan (ssd_chunked), x/B/C bf16, dt/A fp32, chunk 256 (FLOPs: docs/flops.md)");
  struct S {
    int64_t Bn, T, H, P, G, N, chunk;
  };
  std::vector<S> shapes;
  if (g_opt.smoke) {
    shapes = {{1, 128, 4, 16, 1, 16, 32}};
  } else {
    shapes = {{1, 32768, 32, 64, 1, 128, 256}, {1, 32768, 32, 64, 8, 128, 256}, {4, 32768, 32, 64, 1, 128, 256}};
  }
  const auto& c = shapes.front();
  check_k3(g_opt.smoke ? c.H : 8, c.P, c.G, c.N, c.chunk);
  for (const auto& sh : shapes) {
    if (sh.T > g_opt.max_t) continue;
    torch::manual_seed(7);
    auto s = ssd_inputs(sh.Bn, sh.T, sh.H, sh.P, sh.G, sh.N);
    std::vector<Tensor> in = {s.x, s.dt, s.A, s.B, s.C};
    for (auto& t : in) t.requires_grad_(true);
    auto gy = torch::randn({sh.Bn, sh.T, sh.H, sh.P}, bf16());
    const double tokens = double(sh.Bn * sh.T);
    const double flops = 2.0 * tokens * ssd_macs_per_token(sh.H, sh.P, sh.G, sh.N, sh.T, sh.chunk);
    const double bytes = tokens * (2.0 * 2 * double(sh.H * sh.P) + 2.0 * 2 * double(sh.G * sh.N) + 4.0 * double(sh.H));
    const std::string shape = "B" + std::to_string(sh.Bn) + " T" + kstr(sh.T) + " H" + std::to_string(sh.H) + "x" +
                              std::to_string(sh.P) + " N" + std::to_string(sh.N) + " G" + std::to_string(sh.G);
    // "chunked": what training runs (on CUDA the intra-chunk term on the fused kernels, kernels/ssd_intra.h);
    // "libtorch": the same scan with the kernels switched off, for the first shape, as the in-run baseline.
    time_fwd_bwd(
        "K3", shape, "chunked",
        [&] { return std::get<0>(core::ssd_chunked(in[0], in[1], in[2], in[3], in[4], sh.chunk)); }, in, gy, flops, 3.0,
        bytes, 2.5 * bytes, "passed");
    if (g_dev.is_cuda() && &sh == &shapes.front()) {
      const bool was = core::ssd_fused_enabled();
      core::ssd_set_fused_enabled(false);
      time_fwd_bwd(
          "K3", shape, "libtorch",
          [&] { return std::get<0>(core::ssd_chunked(in[0], in[1], in[2], in[3], in[4], sh.chunk)); }, in, gy, flops,
          3.0, bytes, 2.5 * bytes, "passed");
      core::ssd_set_fused_enabled(was);
    }
  }
}

// ================================================================================================ K4 Gated DeltaNet
struct GdnInputs {
  Tensor q, k, v, g, beta;
};
// q, k L2-normalised and v N(0,1) in bf16, beta = sigmoid(U) bf16, g = logsigmoid(U) fp32 (fla's test inputs).
GdnInputs gdn_inputs(int64_t Bn, int64_t T, int64_t H, int64_t K, int64_t V) {
  namespace F = torch::nn::functional;
  GdnInputs s;
  s.q = F::normalize(torch::randn({Bn, T, H, K}, f32()), F::NormalizeFuncOptions().dim(-1)).to(torch::kBFloat16);
  s.k = F::normalize(torch::randn({Bn, T, H, K}, f32()), F::NormalizeFuncOptions().dim(-1)).to(torch::kBFloat16);
  s.v = torch::randn({Bn, T, H, V}, bf16());
  s.g = F::logsigmoid(torch::rand({Bn, T, H}, f32()));
  s.beta = torch::sigmoid(torch::rand({Bn, T, H}, f32())).to(torch::kBFloat16);
  return s;
}

double gdn_macs_per_token(int64_t H, int64_t K, int64_t V, int64_t T, int64_t chunk) {
  const double c = double(std::min(chunk, T)), k = double(K), v = double(V);  // docs/flops.md
  return double(H) * (2 * c * k + c * (k + v) / 2 + 3 * k * v + c * v);
}

void check_k4(int64_t H, int64_t K, int64_t V, int64_t chunk) {
  const int64_t T = g_opt.smoke ? 50 : 300, Bn = 1;
  torch::manual_seed(8);
  auto s = gdn_inputs(Bn, T, H, K, V);
  auto gy = torch::randn({Bn, T, H, V}, f32());
  auto run = [&](bool chunked, bool fp64) {
    auto cv = [&](const Tensor& t) { return fp64 ? t.to(torch::kFloat64) : t.clone(); };
    std::vector<Tensor> in = {cv(s.q), cv(s.k), cv(s.v), cv(s.g), cv(s.beta)};
    for (auto& t : in) t.requires_grad_(true);
    auto o = chunked ? std::get<0>(core::gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], chunk))
                     : std::get<0>(core::gated_delta_rule_sequential(in[0], in[1], in[2], in[3], in[4]));
    auto g = torch::autograd::grad({o}, in, {gy.to(o.scalar_type())});
    g.insert(g.begin(), o.detach());
    return g;
  };
  const auto ref = run(false, true);
  const auto ours = run(true, false);
  const char* names[] = {"o", "dq", "dk", "dv", "dg", "dbeta"};
  bool ok = true;
  std::string detail;
  for (int i = 0; i < 6; ++i) {
    const double e = rel_rms(ours[i], ref[i]);
    ok = ok && e <= (i == 0 ? 1e-2 : 2e-2);
    detail += std::string(names[i]) + fmt(" %.2e ", e);
  }
  check_result("K4", "gated_delta_rule_chunked (bf16 in) vs sequential (fp64) T" + std::to_string(T), ok,
               detail + "(rel. RMS; o <= 1e-2, grads <= 2e-2)");
  free_cache();
}

void bench_k4() {
  header("K4 Gated DeltaNet (gated_delta_rule_chunked), q/k/v/beta bf16, g fp32, chunk 64 (FLOPs: docs/flops.md)");
  struct S {
    int64_t Bn, T, H, K, V, chunk;
  };
  std::vector<S> shapes;
  if (g_opt.smoke) {
    shapes = {{1, 128, 2, 16, 16, 16}};
  } else {
    shapes = {{1, 4096, 16, 128, 128, 64}, {1, 32768, 16, 128, 128, 64}, {4, 4096, 16, 128, 128, 64}};
  }
  const auto& c = shapes.front();
  check_k4(g_opt.smoke ? c.H : 4, c.K, c.V, c.chunk);
  for (const auto& sh : shapes) {
    if (sh.T > g_opt.max_t) continue;
    torch::manual_seed(9);
    auto s = gdn_inputs(sh.Bn, sh.T, sh.H, sh.K, sh.V);
    std::vector<Tensor> in = {s.q, s.k, s.v, s.g, s.beta};
    for (auto& t : in) t.requires_grad_(true);
    auto gy = torch::randn({sh.Bn, sh.T, sh.H, sh.V}, bf16());
    const double tokens = double(sh.Bn * sh.T);
    const double flops = 2.0 * tokens * gdn_macs_per_token(sh.H, sh.K, sh.V, sh.T, sh.chunk);
    const double bytes = tokens * double(sh.H) * (2.0 * double(2 * sh.K + 2 * sh.V) + 4.0 + 2.0);
    const std::string shape = "B" + std::to_string(sh.Bn) + " T" + kstr(sh.T) + " H" + std::to_string(sh.H) + " K" +
                              std::to_string(sh.K) + " V" + std::to_string(sh.V);
    time_fwd_bwd(
        "K4", shape, "chunked",
        [&] { return std::get<0>(core::gated_delta_rule_chunked(in[0], in[1], in[2], in[3], in[4], sh.chunk)); }, in,
        gy, flops, 3.0, bytes, 2.5 * bytes, "passed");
  }
}

int usage(const char* argv0) {
  std::fprintf(
      stderr,
      "usage: %s [--device cuda|cpu] [--case all|k1,k2,k3,k4 (a list, in order)] [--smoke] [--max_t N] [--iters 50] "
      "[--min_iters 5] [--budget_s 3] [--deadline_s 200] [--json FILE]\n",
      argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  g_start = std::chrono::steady_clock::now();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--device")
      g_opt.device = next();
    else if (a == "--case")
      g_opt.which = next();
    else if (a == "--smoke")
      g_opt.smoke = true;
    else if (a == "--max_t")
      g_opt.max_t = std::stoll(next());
    else if (a == "--iters")
      g_opt.iters = std::stoi(next());
    else if (a == "--min_iters")
      g_opt.min_iters = std::stoi(next());
    else if (a == "--budget_s")
      g_opt.budget_s = std::stod(next());
    else if (a == "--deadline_s")
      g_opt.deadline_s = std::stod(next());
    else if (a == "--json")
      g_opt.json_path = next();
    else
      return usage(argv[0]);
  }
  if (g_opt.device == "cuda") {
    if (!torch::cuda::is_available()) {
      std::fprintf(stderr, "mixer_bench: --device cuda but no CUDA device (use --device cpu --smoke)\n");
      return 2;
    }
    g_dev = torch::Device(torch::kCUDA, 0);
  } else if (g_opt.device != "cpu") {
    return usage(argv[0]);
  }
  if (g_opt.smoke) {
    g_opt.iters = std::min(g_opt.iters, 2);
    g_opt.min_iters = 1;
    g_opt.budget_s = std::min(g_opt.budget_s, 0.05);
  }
  g_opt.min_iters = std::min(g_opt.min_iters, g_opt.iters);
  if (!g_opt.json_path.empty()) g_json.open(g_opt.json_path, std::ios::trunc);
  std::string dev_name = "cpu";
#if ABLATE_WITH_CUDA
  if (g_dev.is_cuda()) {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    dev_name = prop->name;
    // A buffer of twice the L2, rewritten before every timed call, evicts the inputs of the previous call.
    g_flush = torch::empty({std::max<int64_t>(1, 2 * int64_t(prop->l2CacheSize) / 4)}, f32());
  }
#endif
  char meta[512];
  std::snprintf(meta, sizeof meta,
                "{\"bench\":\"mixer_bench\",\"meta\":true,\"device\":\"%s\",\"device_name\":\"%s\","
                "\"smoke\":%s,\"iters\":%d,\"min_iters\":%d,\"budget_s\":%.2f}",
                g_dev.str().c_str(), json_escape(dev_name).c_str(), g_opt.smoke ? "true" : "false", g_opt.iters,
                g_opt.min_iters, g_opt.budget_s);
  emit(meta);
  // --case all or a comma list, run in the order given (so a deadline cuts the last ones).
  std::string w = g_opt.which == "all" ? "k1,k2,k3,k4" : g_opt.which;
  for (size_t pos = 0; pos <= w.size();) {
    const size_t end = std::min(w.find(',', pos), w.size());
    const std::string c = w.substr(pos, end - pos);
    pos = end + 1;
    if (c == "k1")
      bench_k1();
    else if (c == "k2")
      bench_k2();
    else if (c == "k3")
      bench_k3();
    else if (c == "k4")
      bench_k4();
    else if (!c.empty())
      return usage(argv[0]);
  }
  std::printf("\nmixer_bench: %d correctness check(s) failed; %.1f s\n", g_failures, elapsed_s());
  return g_failures ? 1 : 0;
}
