// The training loop, evaluation, metrics/events and checkpoints of ablate-train.
#include "core/train.h"

#include <sys/resource.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>
#include <torch/torch.h>

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "core/data.h"
#include "core/fsutil.h"
#include "core/model.h"
#include "core/sha256.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace ablate {
namespace {

struct Diverged : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// JSON lines on an inherited descriptor; one write per line so a reader never sees a partial object.
class Events {
 public:
  explicit Events(int fd) : fd_(fd) {
    if (fd_ >= 0) std::signal(SIGPIPE, SIG_IGN);  // a vanished reader must not kill the run
  }
  void emit(const json& j) {
    if (fd_ < 0) return;
    const std::string line = j.dump() + "\n";
    size_t off = 0;
    while (off < line.size()) {
      const ssize_t n = ::write(fd_, line.data() + off, line.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        if (!warned_) std::cerr << "ablate-train: warning: cannot write events to fd " << fd_ << "\n";
        warned_ = true;
        return;
      }
      off += static_cast<size_t>(n);
    }
  }

 private:
  int fd_;
  bool warned_ = false;
};

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

json config_json(const TrainConfig& c) {
  return {{"model_size", c.model_size},
          {"block_pattern", c.block_pattern},
          {"attn_type", c.attn_type},
          {"optimizer_type", c.optimizer_type},
          {"rope_theta", c.rope_theta},
          {"context_length", c.context_length},
          {"batch_size", c.batch_size},
          {"gradient_accumulation_steps", c.gradient_accumulation_steps},
          {"num_train_steps", c.num_train_steps},
          {"warmup_steps", c.warmup_steps},
          {"learning_rate", c.learning_rate},
          {"min_lr_ratio", c.min_lr_ratio},
          {"weight_decay", c.weight_decay},
          {"max_grad_norm", c.max_grad_norm},
          {"dtype", c.dtype},
          {"seed", c.seed},
          {"data_dir", c.data_dir}};
}

json dims_json(const ModelDims& m) {
  return {{"d", m.d},           {"n_layers", m.n_layers},         {"n_heads", m.n_heads},
          {"n_kv_heads", m.n_kv_heads}, {"intermediate", m.intermediate}, {"padded_vocab", m.padded_vocab}};
}

void write_text_atomic(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
    f.flush();
    if (!f) throw std::runtime_error("cannot write " + tmp.string());
  }
  fs::rename(tmp, path);
}

int64_t peak_memory_bytes(const torch::Device& dev) {
#if ABLATE_WITH_CUDA
  if (dev.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev.index() < 0 ? 0 : dev.index());
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  }
#else
  (void)dev;
#endif
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

// Files in a checkpoint, in the order they are written; manifest.json comes last.
const std::vector<std::string> kCheckpointFiles = {"model.pt", "optimizer.pt", "state.json"};

std::string save_checkpoint(const fs::path& run_dir, int64_t step, Transformer& model, torch::optim::AdamW& opt,
                            const json& state) {
  const fs::path final_dir = run_dir / ("checkpoint-" + std::to_string(step));
  // Written into a temporary directory and renamed, so a crash never leaves a half checkpoint under the final name.
  const fs::path tmp_dir = run_dir / ("checkpoint-" + std::to_string(step) + ".tmp-" + std::to_string(::getpid()));
  remove_tree(tmp_dir);
  fs::create_directories(tmp_dir);
  torch::save(model, (tmp_dir / "model.pt").string());
  torch::save(opt, (tmp_dir / "optimizer.pt").string());
  write_text_atomic(tmp_dir / "state.json", state.dump(2) + "\n");
  json files = json::object();
  for (const auto& f : kCheckpointFiles) {
    const auto p = tmp_dir / f;
    files[f] = {{"bytes", static_cast<int64_t>(fs::file_size(p))}, {"sha256", sha256_file(p.string())}};
  }
  write_text_atomic(tmp_dir / "manifest.json",
                    json{{"format", "ablate-checkpoint-v1"}, {"step", step}, {"files", files}}.dump(2) + "\n");
  remove_tree(final_dir);  // the end-of-run save may repeat the last periodic step
  fs::rename(tmp_dir, final_dir);
  return fs::absolute(final_dir).lexically_normal().string();
}

}  // namespace

void verify_checkpoint(const std::string& dir_str) {
  const fs::path dir(dir_str);
  if (!fs::is_directory(dir)) throw ConfigError("--resume_from " + dir_str + ": not a directory");
  const fs::path mpath = dir / "manifest.json";
  if (!fs::exists(mpath))
    throw ConfigError("checkpoint " + dir_str + ": missing manifest.json (incomplete or not an ablate checkpoint)");
  json m;
  try {
    std::ifstream f(mpath);
    m = json::parse(f);
  } catch (const std::exception& e) {
    throw ConfigError("checkpoint " + mpath.string() + ": unreadable manifest (" + e.what() + ")");
  }
  if (!m.contains("files") || !m["files"].is_object())
    throw ConfigError("checkpoint " + mpath.string() + ": manifest has no 'files' table");
  for (const auto& f : kCheckpointFiles)
    if (!m["files"].contains(f)) throw ConfigError("checkpoint " + mpath.string() + ": manifest does not list " + f);
  for (const auto& [name, info] : m["files"].items()) {
    const fs::path p = dir / name;
    if (!fs::exists(p)) throw ConfigError("checkpoint file " + p.string() + " is missing");
    const auto size = static_cast<int64_t>(fs::file_size(p));
    if (size != info.value("bytes", int64_t(-1)))
      throw ConfigError("checkpoint file " + p.string() + " is corrupted: " + std::to_string(size) +
                        " bytes, manifest says " + std::to_string(info.value("bytes", int64_t(-1))));
    if (sha256_file(p.string()) != info.value("sha256", std::string()))
      throw ConfigError("checkpoint file " + p.string() + " is corrupted: sha256 does not match the manifest");
  }
}

int run_training(const TrainConfig& cfg, TrainResult* result) {
  Events events(cfg.events_fd);
  auto fail = [&](int code, const std::string& cls, const std::string& msg) {
    std::cerr << "ablate-train: " << msg << "\n";
    events.emit({{"event", "finished"}, {"status", "failed"}, {"failure_class", cls}, {"message", msg}});
    return code;
  };

  try {
    cfg.validate();

    // Vocabulary comes from the dataset; --print_config works without one (byte-level default).
    std::unique_ptr<DataLoader> data;
    int64_t vocab = kByteVocab;
    if (!cfg.print_config || !cfg.data_dir.empty()) {
      if (cfg.data_dir.empty()) throw ConfigError("--data_dir is required (a directory made by ablate-train prepare-data)");
      data = std::make_unique<DataLoader>(cfg.data_dir, cfg.batch_size, cfg.context_length, cfg.seed);
      vocab = data->vocab_size();
    }
    ModelDims dims = resolve_model_size(cfg.model_size, vocab);
    if (!cfg.block_pattern.empty()) {
      // An all-'A' pattern is a dense stack; the layer count follows the seed's block_repeats rule.
      const int64_t len = static_cast<int64_t>(cfg.block_pattern.size());
      const int64_t reps = cfg.block_repeats > 0 ? cfg.block_repeats : std::max<int64_t>(1, dims.n_layers / len);
      dims.n_layers = reps * len;
    }
    const int64_t n_params = count_params(dims);
    // Auto threads: small models run fastest on one thread (their ops are too small to split, and OpenMP's
    // spinning threads collapse when the cores are shared with other jobs: measured 16k vs 0.8k tok/s on 2 busy
    // cores for tiny); larger models use every hardware thread.
    const int64_t threads = cfg.num_threads > 0 ? cfg.num_threads
                            : n_params < 5'000'000 ? 1
                                                   : std::max<int64_t>(1, std::thread::hardware_concurrency());
    at::set_num_threads(static_cast<int>(threads));

    if (cfg.print_config) {
      std::cout << dims.to_string() << "\nparams: " << n_params << " (" << std::fixed << std::setprecision(3)
                << double(n_params) / 1e6 << "M)\n";
      return kExitOk;
    }

    // Device and precision.
    torch::Device device(torch::kCPU);
    if (cfg.device == "cuda" || (cfg.device == "auto" && torch::cuda::is_available())) {
      if (!torch::cuda::is_available()) throw ConfigError("--device cuda: no CUDA device is available");
#if !ABLATE_WITH_CUDA
      if (cfg.device == "cuda")
        throw ConfigError("--device cuda: this ablate-train was built without CUDA (ABLATE_WITH_CUDA=OFF)");
      // auto with a GPU present but a CPU-only build: stay on the CPU.
#else
      device = torch::Device(torch::kCUDA, 0);
#endif
    }
    bool autocast = false;
    c10::ScalarType amp_dtype = torch::kFloat32;
    if (cfg.dtype != "float32") {
      if (device.is_cpu()) {
        std::cerr << "ablate-train: note: --dtype " << cfg.dtype
                  << " on CPU computes in float32 (reduced-precision CPU matmuls are slower here)\n";
      } else {
        // Mixed precision: fp32 master weights and optimizer state, matmuls in the low dtype.
        autocast = true;
        amp_dtype = cfg.dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat16;
      }
    }
    if (cfg.gradient_checkpointing)
      std::cerr << "ablate-train: note: --gradient_checkpointing is accepted but not implemented yet (no effect)\n";

    const std::string run_name = cfg.run_name.empty() ? cfg.default_run_name() : cfg.run_name;
    const fs::path run_dir = fs::path(cfg.output_dir) / run_name;

    // Model and optimizer.
    torch::manual_seed(cfg.seed);
    Transformer model(dims, cfg.rope_theta);
    model->to(device);
    auto [decay, no_decay] = model->decay_groups();
    auto opts = torch::optim::AdamWOptions(cfg.learning_rate).betas({0.9, 0.95}).eps(1e-8).weight_decay(cfg.weight_decay);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(opts));
    auto nd = std::make_unique<torch::optim::AdamWOptions>(opts);
    nd->weight_decay(0.0);
    groups.emplace_back(no_decay, std::move(nd));
    torch::optim::AdamW optimizer(std::move(groups), opts);
    std::vector<torch::Tensor> params = model->parameters();

    // Resume.
    int64_t start_step = 0;
    if (!cfg.resume_from.empty()) {
      verify_checkpoint(cfg.resume_from);
      json st;
      {
        std::ifstream f(fs::path(cfg.resume_from) / "state.json");
        st = json::parse(f);
      }
      if (st.value("dims", json()) != dims_json(dims))
        throw ConfigError("checkpoint " + cfg.resume_from + " was made for model " + st.value("dims", json()).dump() +
                          ", but this run builds " + dims_json(dims).dump());
      torch::load(model, (fs::path(cfg.resume_from) / "model.pt").string(), device);
      torch::load(optimizer, (fs::path(cfg.resume_from) / "optimizer.pt").string(), device);
      start_step = st.at("step").get<int64_t>();
      std::cout << "resumed from " << cfg.resume_from << " at step " << start_step << "\n";
    }

    std::cout << "ablate-train: " << dims.to_string() << " | params " << n_params << " | device " << device
              << " | threads " << threads << " | tokens/step "
              << cfg.batch_size * cfg.context_length * cfg.gradient_accumulation_steps << "\n";
    events.emit({{"event", "started"}, {"total_steps", cfg.num_train_steps}, {"params", n_params}});
    if (result) {
      result->params = n_params;
      result->first_step = start_step + 1;
    }

    auto forward_loss = [&](const Batch& b) {
      auto ids = b.inputs.to(device, /*non_blocking=*/true);
      auto tgt = b.targets.to(device, /*non_blocking=*/true);
      if (!autocast) return model->loss(ids, tgt);
      at::autocast::set_autocast_enabled(device.type(), true);
      at::autocast::set_autocast_dtype(device.type(), amp_dtype);
      auto l = model->loss(ids, tgt);
      at::autocast::set_autocast_enabled(device.type(), false);
      at::autocast::clear_cache();
      return l;
    };

    auto evaluate = [&]() {
      torch::NoGradGuard ng;
      auto sum = torch::zeros({}, torch::TensorOptions().device(device));
      for (int64_t i = 0; i < cfg.eval_batches; ++i) sum += forward_loss(data->eval_batch(i, cfg.eval_batches)).detach();
      return sum.item<double>() / double(cfg.eval_batches);  // equal token counts per batch: mean of means is exact
    };

    auto state_json = [&](int64_t step) {
      return json{{"step", step},
                  {"data_cursor", step * cfg.gradient_accumulation_steps},
                  {"tokens_seen", step * cfg.batch_size * cfg.context_length * cfg.gradient_accumulation_steps},
                  {"run_name", run_name},
                  {"dims", dims_json(dims)},
                  {"config", config_json(cfg)}};
    };

    // fp16 needs loss scaling; a simple dynamic scaler (halve on overflow and skip the step, grow after 1000 good).
    const bool use_scaler = autocast && amp_dtype == torch::kFloat16;
    double loss_scale = use_scaler ? 65536.0 : 1.0;
    int64_t good_steps = 0;

    double interval_loss = 0.0, last_grad_norm = 0.0, last_lr = 0.0, final_eval = 0.0;
    int64_t interval_micro = 0, last_eval_step = -1, last_save_step = start_step;
    auto interval_start = std::chrono::steady_clock::now();
    double excluded_s = 0.0;  // eval/checkpoint time, kept out of tokens_per_sec
    const int64_t GA = cfg.gradient_accumulation_steps;
    const double max_norm = cfg.max_grad_norm > 0 ? cfg.max_grad_norm : std::numeric_limits<double>::infinity();

    for (int64_t step = start_step + 1; step <= cfg.num_train_steps; ++step) {
      const double lr = lr_at_step(step, cfg.learning_rate, cfg.warmup_steps, cfg.num_train_steps, cfg.min_lr_ratio);
      for (auto& g : optimizer.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
      optimizer.zero_grad(/*set_to_none=*/true);
      double step_loss = 0.0;
      for (int64_t m = 0; m < GA; ++m) {
        auto loss = forward_loss(data->train_batch((step - 1) * GA + m));
        (loss * (loss_scale / double(GA))).backward();
        const double lv = loss.item<double>();
        if (!std::isfinite(lv)) throw Diverged("loss is " + std::to_string(lv) + " at step " + std::to_string(step));
        step_loss += lv / double(GA);
      }
      if (use_scaler) {
        for (auto& p : params)
          if (p.grad().defined()) p.grad().div_(loss_scale);
      }
      const double gn = torch::nn::utils::clip_grad_norm_(params, max_norm);
      if (!std::isfinite(gn)) {
        if (!use_scaler) throw Diverged("gradient norm is " + std::to_string(gn) + " at step " + std::to_string(step));
        loss_scale /= 2.0;  // fp16 overflow: skip this update
        good_steps = 0;
        if (loss_scale < 1.0) throw Diverged("fp16 loss scale underflow at step " + std::to_string(step));
      } else {
        optimizer.step();
        if (use_scaler && ++good_steps % 1000 == 0) loss_scale *= 2.0;
      }
      last_grad_norm = gn;
      last_lr = lr;
      interval_loss += step_loss;
      ++interval_micro;
      if (result) result->step_losses.push_back(step_loss);

      if (step % cfg.log_interval == 0 || step == cfg.num_train_steps) {
        const double secs = std::max(1e-9, std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                                         interval_start).count() - excluded_s);
        const double tps = double(interval_micro * GA * cfg.batch_size * cfg.context_length) / secs;
        const double mean_loss = interval_loss / double(interval_micro);
        const int64_t mem = peak_memory_bytes(device);
        std::cout << "step " << step << "/" << cfg.num_train_steps << " | loss " << std::fixed << std::setprecision(4)
                  << mean_loss << " | lr " << std::scientific << std::setprecision(3) << lr << std::fixed
                  << " | tok/s " << std::setprecision(0) << tps << " | grad " << std::setprecision(3) << gn
                  << " | mem " << std::setprecision(1) << double(mem) / (1 << 20) << " MiB" << std::endl;
        events.emit({{"event", "metrics"},
                     {"step", step},
                     {"time_unix_ms", now_ms()},
                     {"values",
                      {{"train/loss", mean_loss},
                       {"train/lr", lr},
                       {"train/tokens_per_sec", tps},
                       {"train/grad_norm", gn},
                       {"train/peak_memory_bytes", mem}}}});
        interval_loss = 0.0;
        interval_micro = 0;
        excluded_s = 0.0;
        interval_start = std::chrono::steady_clock::now();
      }

      const bool last = step == cfg.num_train_steps;
      if (step % cfg.eval_interval == 0 || last) {
        const auto t0 = std::chrono::steady_clock::now();
        final_eval = evaluate();
        last_eval_step = step;
        std::cout << "eval step " << step << " | loss " << std::setprecision(4) << final_eval << " | ppl "
                  << std::setprecision(2) << std::exp(final_eval) << std::endl;
        events.emit({{"event", "metrics"},
                     {"step", step},
                     {"time_unix_ms", now_ms()},
                     {"values", {{"eval/loss", final_eval}, {"eval/perplexity", std::exp(final_eval)}}}});
        excluded_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      if (step % cfg.save_interval == 0 || last) {
        const auto t0 = std::chrono::steady_clock::now();
        const auto path = save_checkpoint(run_dir, step, model, optimizer, state_json(step));
        last_save_step = step;
        if (result) result->last_checkpoint = path;
        std::cout << "checkpoint " << path << std::endl;
        events.emit({{"event", "checkpoint"}, {"step", step}, {"path", path}});
        excluded_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
    }
    (void)last_grad_norm;
    (void)last_lr;
    (void)last_save_step;
    if (last_eval_step < 0) final_eval = evaluate();  // resumed at the end: still report an eval
    if (result) result->final_eval_loss = final_eval;
    events.emit({{"event", "finished"}, {"status", "succeeded"}});
    return kExitOk;
  } catch (const Diverged& e) {
    return fail(kExitDiverged, "diverged", e.what());
  } catch (const NotImplementedError& e) {
    return fail(kExitInvalidConfig, "invalid_config", e.what());
  } catch (const ConfigError& e) {
    return fail(kExitInvalidConfig, "invalid_config", e.what());
  } catch (const c10::OutOfMemoryError& e) {
    return fail(kExitOom, "oom", std::string("out of memory: ") + e.what_without_backtrace());
  } catch (const std::bad_alloc&) {
    return fail(kExitOom, "oom", "out of memory (host allocation failed)");
  } catch (const c10::Error& e) {
    return fail(kExitCrash, "crash", e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(kExitCrash, "crash", e.what());
  }
}

}  // namespace ablate
