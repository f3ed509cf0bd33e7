// optim_bench: one step() of each optimizer of core/optim on the parameter set of a model, timed (BENCHMARKS.md
// K5-K8; the PyTorch references run beside it from bench/optim/ref_optim.py, bench/optim/run_gpu.sh joins both).
//
// Method (shared/BENCHMARKS.md "Method (GPU)"): parameters and gradients are fp32, random and non-zero; the
// gradients are redrawn before every step (outside the timing). Each timed step is: overwrite a scratch buffer
// twice the L2 (evicts the cache), synchronize, CUDA event, step(), CUDA event, synchronize. So the time includes
// the step's CPU-side launch work, as it would show when the GPU waits for the optimizer. AdamW family: 5 warm-up
// steps, then up to --iters (>= 50) timed steps, fewer (at least 10) only if a case would outlast
// --max_seconds; the row says how many. SOAP family: step 1 (eigh of the factors) is timed alone; the optimizer
// runs with precondition_frequency 2 so that steps alternate between "no refresh" and "refresh" (QR basis
// update); after one warm-up step of each kind, --soap_iters steps of each kind are timed (default 5: far
// fewer than 50, because a refresh step of the 0.44B set takes seconds). The amortized step at the training
// frequency f (--precondition_frequency, default 10) is no_refresh + (refresh - no_refresh) / f.
// Reported: median with p20/p80, optimizer-state bytes per parameter (state_bytes(), exact), the bytes floor
// 12 B/param (read p, g; write p) + 2 x state bytes (read and write every moment) against the 4.3 TB/s copy
// ceiling, and for SOAP the GEMM FLOPs (fp32) of a step. One JSON object per row with --json FILE (appended).
//
//   optim_bench [--device cuda|cpu] [--shapes qwen3-0.6b-linear,ablate-0.6b,ablate-4b,tiny,tiny-linear]
//               [--optimizers adamw,adamw8bit,adamw4bit,soap,soap8bit,soap4bit,shampoo] [--layers N]
//               [--iters 50] [--soap_iters 5] [--precondition_frequency 10] [--max_seconds 10]
//               [--parity FILE ...] [--json FILE] [--dump_shapes FILE] [--lowbit_per_tensor 1|0]
//
// adamw8bit/adamw4bit print two rows: "step" (the default path: on CUDA one multi-tensor kernel launch per
// parameter group) and "step_per_tensor" (the previous path, one launch per tensor, timed right after on the
// same optimizer; --lowbit_per_tensor 0 skips it). With ABLATE_LOWBIT_MULTI_TENSOR=0 in the environment the
// per-tensor path is the only row.
//
// --dump_shapes FILE: writes each shape set of --shapes (after --layers) as one JSON line {name, layers,
// total_layers, shapes: [[param name, [dims]], ...]} and exits; ref_optim.py --shapes_file reads it, so both
// sides time the same tensors.
//
// --parity FILE: torchao test vectors (tests/optim/make_torchao_vectors.py format: init.i, grad.k.i, param.k.i,
// optionally "hparams" = [bits, lr, beta1, beta2, eps, weight_decay]; bench/optim/ref_optim.py writes them at
// scale). Our AdamW8bit/4bit take the same two steps on --device and the max abs difference per step is printed.
#include <torch/torch.h>

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/optim/adamw.h"
#include "core/optim/optimizer.h"

namespace {

using ablate::core::optim::NamedParams;
using ablate::core::optim::OptimConfig;
using ablate::core::optim::Optimizer;

constexpr double kCopyCeiling = 4.3e12;  // bytes/s, device copy measured on the H200 (BENCHMARKS.md)
constexpr double kFp32Ceiling = 67e12;   // FLOP/s, plain fp32 FMA of the H200 (datasheet, not measured)

struct Options {
  std::string device = "cuda";
  std::vector<std::string> shapes = {"qwen3-0.6b-linear"};
  std::vector<std::string> optimizers = {"adamw", "adamw8bit", "adamw4bit"};
  int64_t layers = 0;  // 0: all layers of the shape set
  int iters = 50;
  int soap_iters = 5;
  int64_t precondition_frequency = 10;
  double max_seconds = 10;
  std::vector<std::string> parity;
  std::string json_path;
  std::string dump_shapes;  // write the shape sets as JSON lines for ref_optim.py and exit
  bool lowbit_per_tensor = true;  // adamw8bit/4bit: also time the per-tensor path (variant step_per_tensor)
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

// ------------------------------------------------------------------------------------------------ shape sets

struct ShapeSet {
  std::string name;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  int64_t layers = 0, total_layers = 0;
  int64_t numel() const {
    int64_t n = 0;
    for (const auto& [_, s] : shapes) {
      int64_t k = 1;
      for (int64_t d : s) k *= d;
      n += k;
    }
    return n;
  }
};

// The parameters core/model.cpp registers for a dense Transformer, by name and shape (no module is built, so a
// 4B set costs nothing on the host). With every layer, the count is checked against ablate::count_params.
ShapeSet transformer_shapes(const std::string& name, const ablate::ModelDims& m, int64_t max_layers) {
  ShapeSet set{name, {}, 0, m.n_layers};
  const int64_t L = max_layers > 0 ? std::min(max_layers, m.n_layers) : m.n_layers;
  const int64_t qd = m.n_heads * m.head_dim, kvd = m.n_kv_heads * m.head_dim;
  set.shapes.push_back({"embed.weight", {m.padded_vocab, m.d}});
  for (int64_t i = 0; i < L; ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".";
    set.shapes.push_back({b + "norm1", {m.d}});
    set.shapes.push_back({b + "attn.q.weight", {qd, m.d}});
    set.shapes.push_back({b + "attn.k.weight", {kvd, m.d}});
    set.shapes.push_back({b + "attn.v.weight", {kvd, m.d}});
    set.shapes.push_back({b + "attn.o.weight", {m.d, qd}});
    set.shapes.push_back({b + "norm2", {m.d}});
    set.shapes.push_back({b + "mlp.gate.weight", {m.intermediate, m.d}});
    set.shapes.push_back({b + "mlp.up.weight", {m.intermediate, m.d}});
    set.shapes.push_back({b + "mlp.down.weight", {m.d, m.intermediate}});
  }
  set.shapes.push_back({"final_norm", {m.d}});
  set.shapes.push_back({"head.weight", {m.padded_vocab, m.d}});
  set.layers = L;
  if (L == m.n_layers)
    TORCH_CHECK(set.numel() == ablate::count_params(m), "optim_bench: the shape list of ", name, " has ",
                set.numel(), " parameters, core's count_params ", ablate::count_params(m),
                " (core/model.cpp changed? update transformer_shapes)");
  return set;
}

ShapeSet make_shape_set(const std::string& name, int64_t max_layers) {
  if (name == "qwen3-0.6b-linear" || name == "tiny-linear") {
    // Qwen3-0.6B's linear layers: d 1024, 28 layers, 16 q / 8 kv heads of 128, MLP 3072 (196 matrices, 0.44B).
    // tiny-linear: the same layout at d 32 over 2 layers, for CPU runs of the SOAP comparison.
    const bool tiny = name == "tiny-linear";
    const int64_t total = tiny ? 2 : 28, L = max_layers > 0 ? std::min(max_layers, total) : total;
    const int64_t d = tiny ? 32 : 1024, q = 2 * d, mlp = 3 * d;
    ShapeSet set{name, {}, L, total};
    for (int64_t i = 0; i < L; ++i) {
      const std::string b = "layers." + std::to_string(i) + ".";
      set.shapes.push_back({b + "q.weight", {q, d}});
      set.shapes.push_back({b + "k.weight", {d, d}});
      set.shapes.push_back({b + "v.weight", {d, d}});
      set.shapes.push_back({b + "o.weight", {d, q}});
      set.shapes.push_back({b + "gate.weight", {mlp, d}});
      set.shapes.push_back({b + "up.weight", {mlp, d}});
      set.shapes.push_back({b + "down.weight", {d, mlp}});
    }
    return set;
  }
  if (name == "ablate-0.6b" || name == "ablate-4b") {
    // Our dense Transformer of that size with the seed's Qwen vocabulary (what --model_size 0.6B / 4B builds).
    const ablate::ModelDims m = ablate::resolve_model_size(name == "ablate-0.6b" ? "0.6B" : "4B", ablate::kSeedVocab);
    return transformer_shapes(name, m, max_layers);
  }
  if (name == "tiny") {
    // The CPU smoke test: every kind of tensor (quantized and not, 1-D, a side past max_precond_dim is not here).
    ablate::ModelDims m;
    m.d = 64;
    m.n_layers = 2;
    m.n_heads = 4;
    m.n_kv_heads = 2;
    m.head_dim = 16;
    m.intermediate = 192;
    m.vocab_size = m.padded_vocab = 256;
    return transformer_shapes(name, m, max_layers);
  }
  TORCH_CHECK(false, "optim_bench: unknown shape set '", name,
              "', expected qwen3-0.6b-linear, ablate-0.6b, ablate-4b, tiny or tiny-linear");
}

// ------------------------------------------------------------------------------------------------ timing

struct Stats {
  double med = 0, p20 = 0, p80 = 0;
  int n = 0;
};

Stats stats_of(std::vector<double> ms) {
  Stats s;
  s.n = static_cast<int>(ms.size());
  if (ms.empty()) return s;
  std::sort(ms.begin(), ms.end());
  auto pct = [&](double p) { return ms[std::min<size_t>(ms.size() - 1, size_t(p * double(ms.size() - 1) + 0.5))]; };
  s.med = pct(0.5);
  s.p20 = pct(0.2);
  s.p80 = pct(0.8);
  return s;
}

class Device {
 public:
  explicit Device(const std::string& name) : dev_(name == "cuda" ? torch::kCUDA : torch::kCPU) {
    TORCH_CHECK(name == "cuda" || name == "cpu", "optim_bench: --device must be cuda or cpu, got ", name);
#if ABLATE_WITH_CUDA
    if (dev_.is_cuda()) {
      TORCH_CHECK(torch::cuda::is_available(), "optim_bench: --device cuda but no CUDA device is visible");
      cudaDeviceProp prop{};
      check(cudaGetDeviceProperties(&prop, 0), "properties");
      l2_bytes_ = prop.l2CacheSize;
      desc_ = std::string(prop.name) + ", " + std::to_string(prop.multiProcessorCount) + " SMs, L2 " +
              std::to_string(l2_bytes_ >> 20) + " MiB, " + std::to_string(prop.totalGlobalMem >> 30) + " GiB";
      flush_ = torch::empty({2 * l2_bytes_ / 4}, torch::TensorOptions().dtype(torch::kFloat).device(dev_));
      check(cudaEventCreate(&start_), "event");
      check(cudaEventCreate(&stop_), "event");
    }
#else
    TORCH_CHECK(!dev_.is_cuda(), "optim_bench: --device cuda, but this build has no CUDA (ABLATE_WITH_CUDA=OFF)");
#endif
    if (!dev_.is_cuda()) desc_ = "CPU (" + std::to_string(torch::get_num_threads()) + " threads)";
  }
  torch::Device device() const { return dev_; }
  const std::string& description() const { return desc_; }

  void sync() const {
#if ABLATE_WITH_CUDA
    if (dev_.is_cuda()) check(cudaStreamSynchronize(c10::cuda::getCurrentCUDAStream()), "sync");
#endif
  }
  void free_cache() const {
#if ABLATE_WITH_CUDA
    if (dev_.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  }

  // Milliseconds of fn() on the device: L2 evicted and the stream idle before, CUDA events around it.
  template <typename Fn>
  double time_ms(Fn&& fn) {
#if ABLATE_WITH_CUDA
    if (dev_.is_cuda()) {
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      flush_.fill_(static_cast<float>(++flushes_));
      check(cudaStreamSynchronize(stream), "sync");
      check(cudaEventRecord(start_, stream), "record");
      fn();
      check(cudaEventRecord(stop_, stream), "record");
      check(cudaEventSynchronize(stop_), "sync");
      float ms = 0;
      check(cudaEventElapsedTime(&ms, start_, stop_), "elapsed");
      return ms;
    }
#endif
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

 private:
#if ABLATE_WITH_CUDA
  static void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
      std::fprintf(stderr, "optim_bench: CUDA error in %s: %s\n", what, cudaGetErrorString(e));
      std::exit(1);
    }
  }
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  int64_t l2_bytes_ = 0;
  torch::Tensor flush_;
  int64_t flushes_ = 0;
#endif
  torch::Device dev_;
  std::string desc_;
};

// ------------------------------------------------------------------------------------------------ report

std::ofstream g_json;

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) o += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  return o;
}

struct Row {
  std::string shapes, optimizer, variant;
  int64_t layers = 0, total_layers = 0, n_params = 0, n_tensors = 0;
  Stats s;
  int64_t state_bytes = 0;
  double min_bytes = 0, flops = 0;
  std::string note;
};

void print_header() {
  std::printf("%-18s %-10s %-16s %6s %9s %9s %9s %5s %8s %10s %7s %9s\n", "shapes", "optimizer", "variant",
              "Mparam", "med ms", "p20 ms", "p80 ms", "n", "state B/p", "floor GB/s", "%4.3TB", "fp32 TF/s");
}

void emit(const Row& r) {
  const double sec = r.s.med * 1e-3;
  const double gbps = r.min_bytes > 0 && sec > 0 ? r.min_bytes / sec / 1e9 : 0;
  const double tfs = r.flops > 0 && sec > 0 ? r.flops / sec / 1e12 : 0;
  const double bpp = r.n_params > 0 ? double(r.state_bytes) / double(r.n_params) : 0;
  std::printf("%-18s %-10s %-16s %6.0f %9.3f %9.3f %9.3f %5d %8.2f %10.0f %6.1f%% %9.1f%s%s\n", r.shapes.c_str(),
              r.optimizer.c_str(), r.variant.c_str(), double(r.n_params) / 1e6, r.s.med, r.s.p20, r.s.p80, r.s.n, bpp,
              gbps, 100.0 * gbps * 1e9 / kCopyCeiling, tfs, r.note.empty() ? "" : "  ", r.note.c_str());
  char js[2048];
  std::snprintf(js, sizeof js,
                "{\"tool\":\"ours\",\"kind\":\"step\",\"shapes\":\"%s\",\"layers\":%lld,\"total_layers\":%lld,"
                "\"optimizer\":\"%s\",\"variant\":\"%s\",\"n_params\":%lld,\"n_tensors\":%lld,\"median_ms\":%.5f,"
                "\"p20_ms\":%.5f,\"p80_ms\":%.5f,\"iters\":%d,\"state_bytes\":%lld,\"state_bytes_per_param\":%.4f,"
                "\"min_bytes\":%.0f,\"gbps\":%.1f,\"pct_copy_ceiling\":%.2f,\"flops\":%.0f,\"tflops\":%.2f,"
                "\"note\":\"%s\"}",
                r.shapes.c_str(), (long long)r.layers, (long long)r.total_layers, r.optimizer.c_str(),
                r.variant.c_str(), (long long)r.n_params, (long long)r.n_tensors, r.s.med, r.s.p20, r.s.p80, r.s.n,
                (long long)r.state_bytes, bpp, r.min_bytes, gbps, 100.0 * gbps * 1e9 / kCopyCeiling, r.flops, tfs,
                json_escape(r.note).c_str());
  if (g_json.is_open()) g_json << js << "\n" << std::flush;
}

// GEMM FLOPs of one SOAP step on a 2-D m x n parameter with both sides preconditioned, counting every matmul
// as 2·a·b·c (no symmetric savings): factors G Gᵀ, Gᵀ G (2mn(m+n)); G' = Q_Lᵀ G Q_R and back (4mn(m+n)). The
// refresh adds momentum out and in (4mn(m+n)), diag(Qᵀ F Q) and F·Q for the power step (4(m³+n³)), and a
// Householder QR with Q formed (~(8/3)(m³+n³)). Sides past max_precond_dim, low-bit decode/Björck steps and
// non-2-D tensors are not counted.
std::pair<double, double> soap_flops(const ShapeSet& set, int64_t max_precond_dim) {
  double step = 0, refresh = 0;
  for (const auto& [_, s] : set.shapes) {
    if (s.size() != 2) continue;
    const double m = double(s[0]), n = double(s[1]);
    const bool l = s[0] <= max_precond_dim, r = s[1] <= max_precond_dim;
    if (!l && !r) continue;
    const double ml = l ? m : 0, nr = r ? n : 0;  // a missing side costs nothing
    step += 2 * m * n * (ml + nr) + 4 * m * n * (ml + nr);
    refresh += 4 * m * n * (ml + nr) + (4 + 8.0 / 3) * (ml * ml * ml + nr * nr * nr);
  }
  return {step, refresh};
}

// ------------------------------------------------------------------------------------------------ the cases

struct Bench {
  Options o;
  Device dev;
  OptimConfig base;

  explicit Bench(const Options& opts) : o(opts), dev(opts.device) {
    base.lr = 1e-3;
    base.weight_decay = 0.1;
    base.beta1 = 0.9;
    base.beta2 = 0.95;
    base.eps = 1e-8;
  }

  static bool is_soap_family(const std::string& name) {
    return name == "soap" || name == "soap8bit" || name == "soap4bit" || name == "shampoo";
  }

  void redraw_grads(NamedParams& params) {
    for (auto& [_, p] : params) p.mutable_grad().normal_(0.0, 1e-3);
  }

  void run_set(const std::string& set_name) {
    const ShapeSet set = make_shape_set(set_name, o.layers);
    const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(dev.device());
    NamedParams params;
    for (const auto& [name, shape] : set.shapes) {
      torch::Tensor p = (torch::randn(shape, opts) * 0.02).requires_grad_(true);
      p.mutable_grad() = torch::empty_like(p);
      params.emplace_back(name, p);
    }
    redraw_grads(params);
    std::printf("\n== %s: %zu tensors, %.1f M parameters (%lld of %lld layers), fp32 params and grads\n",
                set.name.c_str(), set.shapes.size(), double(set.numel()) / 1e6, (long long)set.layers,
                (long long)set.total_layers);
    print_header();
    for (const auto& name : o.optimizers) {
      if (is_soap_family(name))
        run_soap(set, params, name);
      else
        run_adam(set, params, name);
      dev.free_cache();
    }
  }

  Row row_for(const ShapeSet& set, const std::string& optimizer, const std::string& variant, const Stats& s,
              const Optimizer& opt) {
    Row r;
    r.shapes = set.name;
    r.layers = set.layers;
    r.total_layers = set.total_layers;
    r.optimizer = optimizer;
    r.variant = variant;
    r.n_params = set.numel();
    r.n_tensors = static_cast<int64_t>(set.shapes.size());
    r.s = s;
    r.state_bytes = opt.state_bytes();
    return r;
  }

  void run_adam(const ShapeSet& set, NamedParams& params, const std::string& name) {
    auto opt = ablate::core::optim::make_optimizer(name, params, base);
    auto* lowbit = dynamic_cast<ablate::core::optim::AdamWLowBit*>(opt.get());
    auto time_steps = [&](const std::string& variant, const std::string& note) {
      for (int i = 0; i < 5; ++i) {
        redraw_grads(params);
        opt->step();
      }
      dev.sync();
      std::vector<double> ms;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < o.iters; ++i) {
        redraw_grads(params);
        ms.push_back(dev.time_ms([&] { opt->step(); }));
        const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (i + 1 >= 10 && elapsed > o.max_seconds) break;
      }
      Row r = row_for(set, name, variant, stats_of(ms), *opt);
      r.min_bytes = 12.0 * double(r.n_params) + 2.0 * double(r.state_bytes);
      r.note = note;
      if (r.s.n < o.iters) r.note += std::string(r.note.empty() ? "" : "; ") + "fewer steps: --max_seconds reached";
      emit(r);
    };
    // adamw8bit/4bit: "step" is the default path (on CUDA one multi-tensor launch per group); "step_per_tensor"
    // the previous one (one kernel launch per tensor), timed after it on the same optimizer for A/B
    // (--lowbit_per_tensor 0 skips it; ABLATE_LOWBIT_MULTI_TENSOR=0 makes the per-tensor path the only row).
    const bool cuda = dev.device().is_cuda();
    const bool multi = lowbit && lowbit->multi_tensor();
    time_steps(cuda && lowbit && !multi ? "step_per_tensor" : "step",
               !(cuda && lowbit) ? ""
               : multi           ? "multi-tensor launches"
                                 : "one launch per tensor (ABLATE_LOWBIT_MULTI_TENSOR=0)");
    if (cuda && multi && o.lowbit_per_tensor) {
      lowbit->set_multi_tensor(false);
      time_steps("step_per_tensor", "previous path: one launch per tensor (A/B)");
    }
  }

  void run_soap(const ShapeSet& set, NamedParams& params, const std::string& name) {
    OptimConfig cfg = base;
    // Frequency 2: steps alternate between refresh and none. SOAP refreshes when its Adam step count (t - 1) is
    // even, so at t = 3, 5, ...; Shampoo recomputes its roots when t is even.
    cfg.precondition_frequency = 2;
    const int refresh_parity = name == "shampoo" ? 0 : 1;
    auto opt = ablate::core::optim::make_optimizer(name, params, cfg);
    redraw_grads(params);
    const double init_ms = dev.time_ms([&] { opt->step(); });  // t = 1: eigh of the first factors
    for (int i = 0; i < 2; ++i) {                                // t = 2, 3: one warm-up step of each kind
      redraw_grads(params);
      opt->step();
    }
    std::vector<double> plain, refresh;
    for (int i = 0; i < 2 * o.soap_iters; ++i) {
      redraw_grads(params);
      const int64_t t = 4 + i;
      (t % 2 == refresh_parity ? refresh : plain).push_back(dev.time_ms([&] { opt->step(); }));
    }
    const auto [flops_step, flops_refresh] = soap_flops(set, cfg.max_precond_dim);
    const bool soap = name != "shampoo";
    const std::string fewer = "fewer than 50 steps (--soap_iters)";
    Row init = row_for(set, name, "init", Stats{init_ms, init_ms, init_ms, 1}, *opt);
    init.note = "step 1: eigh of every factor, once";
    emit(init);
    Row nr = row_for(set, name, "step_norefresh", stats_of(plain), *opt);
    nr.flops = soap ? flops_step : 0;
    nr.note = fewer;
    emit(nr);
    Row rf = row_for(set, name, "step_refresh", stats_of(refresh), *opt);
    rf.flops = soap ? flops_step + flops_refresh : 0;
    rf.note = fewer;
    emit(rf);
    const double f = double(o.precondition_frequency);
    auto amort = [&](double a, double b) { return a + (b - a) / f; };
    Row am = row_for(set, name, "step_amortized",
                     Stats{amort(nr.s.med, rf.s.med), amort(nr.s.p20, rf.s.p20), amort(nr.s.p80, rf.s.p80), nr.s.n},
                     *opt);
    am.flops = soap ? flops_step + flops_refresh / f : 0;
    am.note = "no_refresh + (refresh - no_refresh) / " + std::to_string(o.precondition_frequency);
    emit(am);
  }
};

// ------------------------------------------------------------------------------------------------ parity

std::map<std::string, torch::Tensor> read_vectors(const std::string& path) {
  std::map<std::string, torch::Tensor> out;
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(f.good(), "optim_bench: cannot open parity file ", path);
  uint32_t name_len = 0;
  while (f.read(reinterpret_cast<char*>(&name_len), 4)) {
    std::string name(name_len, '\0');
    f.read(name.data(), name_len);
    uint32_t dtype = 0, ndim = 0;
    f.read(reinterpret_cast<char*>(&dtype), 4);
    f.read(reinterpret_cast<char*>(&ndim), 4);
    std::vector<int64_t> dims(ndim);
    f.read(reinterpret_cast<char*>(dims.data()), 8 * std::streamsize(ndim));
    torch::Tensor t = torch::empty(dims, dtype == 0 ? torch::kFloat : torch::kUInt8);
    f.read(static_cast<char*>(t.data_ptr()), std::streamsize(t.nbytes()));
    TORCH_CHECK(f.good(), "optim_bench: truncated parity file ", path, " at record ", name);
    out[name] = t;
  }
  return out;
}

// Our AdamW8bit/4bit against torchao's parameters after each of two steps from the same inputs. Returns false
// when a difference exceeds 1e-5.
bool run_parity(const std::string& path, const Device& dev) {
  auto v = read_vectors(path);
  OptimConfig cfg;
  int bits = path.find("4bit") != std::string::npos ? 4 : 8;
  cfg.lr = 1e-2;  // the values of tests/optim/make_torchao_vectors.py when the file does not carry them
  cfg.weight_decay = 0.1;
  cfg.beta1 = 0.9;
  cfg.beta2 = 0.95;
  cfg.eps = 1e-8;
  if (v.count("hparams")) {
    const auto h = v.at("hparams").to(torch::kDouble);
    const double* d = h.data_ptr<double>();
    bits = static_cast<int>(d[0]);
    cfg.lr = d[1];
    cfg.beta1 = d[2];
    cfg.beta2 = d[3];
    cfg.eps = d[4];
    cfg.weight_decay = d[5];
  }
  NamedParams params;
  for (int i = 0; v.count("init." + std::to_string(i)); ++i) {
    // Matrices are decayed, vectors not (make_param_groups: dim() <= 1 is no-decay), as the generator's groups.
    params.emplace_back("p" + std::to_string(i), v.at("init." + std::to_string(i)).to(dev.device()).requires_grad_());
  }
  auto opt = ablate::core::optim::make_optimizer(bits == 8 ? "adamw8bit" : "adamw4bit", params, cfg);
  const auto* lowbit = dynamic_cast<const ablate::core::optim::AdamWLowBit*>(opt.get());
  int64_t numel = 0;
  for (const auto& [_, p] : params) numel += p.numel();
  bool ok = true;
  for (int k = 0; k < 2; ++k) {
    for (size_t i = 0; i < params.size(); ++i)
      params[i].second.mutable_grad() = v.at("grad." + std::to_string(k) + "." + std::to_string(i)).to(dev.device());
    opt->step();
    double max_diff = 0;
    int64_t over = 0, codes = 0, codes_differ = 0;
    const std::string ks = std::to_string(k);
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string is = std::to_string(i);
      const torch::Tensor d = (params[i].second.detach().cpu() - v.at("param." + ks + "." + is)).abs();
      max_diff = std::max(max_diff, d.max().item<double>());
      over += d.gt(1e-5).sum().item<int64_t>();
      // Quantized moments whose code differs from torchao's (a rounding tie decided the other way changes the
      // next step's update by up to one quantization step of m or v).
      if (!lowbit || !v.count("exp_avg.codes." + ks + "." + is)) continue;
      for (int64_t j = 0; j < lowbit->num_params(); ++j) {
        if (!lowbit->param(j).is_same(params[i].second) || !lowbit->is_quantized(j)) continue;
        for (const std::string key : {"exp_avg", "exp_avg_sq"}) {
          const auto& q = key == "exp_avg" ? lowbit->exp_avg_quantized(j) : lowbit->exp_avg_sq_quantized(j);
          const torch::Tensor ref = v.at(key + ".codes." + ks + "." + is).view(-1);
          codes += ref.numel();
          codes_differ += q.codes().cpu().ne(ref).sum().item<int64_t>();
        }
      }
    }
    ok = ok && max_diff <= 1e-5;
    std::printf("parity %d-bit vs torchao, step %d: max |ours - torchao| = %.3e over %lld elements (%lld above 1e-5)",
                bits, k + 1, max_diff, (long long)numel, (long long)over);
    if (codes > 0) std::printf("; %lld of %lld moment code bytes differ", (long long)codes_differ, (long long)codes);
    std::printf("%s\n", max_diff <= 1e-5 ? "" : "  MISS");
    char js[1024];
    std::snprintf(js, sizeof js,
                  "{\"tool\":\"ours\",\"kind\":\"parity\",\"optimizer\":\"adamw%dbit\",\"file\":\"%s\",\"step\":%d,"
                  "\"device\":\"%s\",\"lr\":%g,\"numel\":%lld,\"max_abs_diff\":%.4e,\"n_above_1e-5\":%lld,"
                  "\"codes\":%lld,\"codes_differ\":%lld}",
                  bits, json_escape(path).c_str(), k + 1, dev.device().is_cuda() ? "cuda" : "cpu", cfg.lr,
                  (long long)numel, max_diff, (long long)over, (long long)codes, (long long)codes_differ);
    if (g_json.is_open()) g_json << js << "\n" << std::flush;
  }
  return ok;
}

void dump_shapes(const Options& o) {
  std::ofstream f(o.dump_shapes);
  TORCH_CHECK(f.good(), "optim_bench: cannot write ", o.dump_shapes);
  for (const auto& name : o.shapes) {
    const ShapeSet set = make_shape_set(name, o.layers);
    f << "{\"name\":\"" << set.name << "\",\"layers\":" << set.layers << ",\"total_layers\":" << set.total_layers
      << ",\"shapes\":[";
    for (size_t i = 0; i < set.shapes.size(); ++i) {
      f << (i ? "," : "") << "[\"" << set.shapes[i].first << "\",[";
      for (size_t k = 0; k < set.shapes[i].second.size(); ++k) f << (k ? "," : "") << set.shapes[i].second[k];
      f << "]]";
    }
    f << "]}\n";
    std::printf("%s: %zu tensors, %lld parameters\n", set.name.c_str(), set.shapes.size(), (long long)set.numel());
  }
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--device cuda|cpu] [--shapes LIST] [--optimizers LIST] [--layers N] [--iters N>=50]\n"
               "          [--soap_iters N] [--precondition_frequency F] [--max_seconds S] [--parity FILE]... "
               "[--json FILE] [--dump_shapes FILE] [--lowbit_per_tensor 1|0]\n"
               "  shapes: qwen3-0.6b-linear, ablate-0.6b, ablate-4b, tiny, tiny-linear (comma-separated)\n"
               "  optimizers: adamw, adamw8bit, adamw4bit, soap, soap8bit, soap4bit, shampoo\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") return usage(argv[0]);
    if (i + 1 >= argc) return usage(argv[0]);
    const std::string val = argv[++i];
    if (a == "--device") o.device = val;
    else if (a == "--shapes") o.shapes = split(val);
    else if (a == "--optimizers") o.optimizers = split(val);
    else if (a == "--layers") o.layers = std::stoll(val);
    else if (a == "--iters") o.iters = std::stoi(val);
    else if (a == "--soap_iters") o.soap_iters = std::max(1, std::stoi(val));
    else if (a == "--precondition_frequency") o.precondition_frequency = std::max<int64_t>(1, std::stoll(val));
    else if (a == "--max_seconds") o.max_seconds = std::stod(val);
    else if (a == "--parity") o.parity.push_back(val);
    else if (a == "--json") o.json_path = val;
    else if (a == "--dump_shapes") o.dump_shapes = val;
    else if (a == "--lowbit_per_tensor") o.lowbit_per_tensor = std::stoi(val) != 0;
    else return usage(argv[0]);
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a crash must not eat the table printed so far
  try {
    if (!o.dump_shapes.empty()) {
      dump_shapes(o);
      return 0;
    }
    if (!o.json_path.empty()) g_json.open(o.json_path, std::ios::app);
    torch::manual_seed(0);
    torch::NoGradGuard no_grad;
    Bench bench(o);
    std::printf("optim_bench on %s; ceilings: copy %.1f TB/s (measured), fp32 FMA %.0f TFLOP/s (datasheet); "
                "AdamW family: up to %d timed steps; SOAP family: %d of each kind\n",
                bench.dev.description().c_str(), kCopyCeiling / 1e12, kFp32Ceiling / 1e12, o.iters, o.soap_iters);
    bool parity_ok = true;
    for (const auto& path : o.parity) parity_ok = run_parity(path, bench.dev) && parity_ok;
    for (const auto& s : o.shapes)
      if (!o.optimizers.empty()) bench.run_set(s);
    bench.dev.sync();
    return parity_ok ? 0 : 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "optim_bench: %s\n", e.what());
    return 1;
  }
}
