// The training loop of ablate-train: optimizer (core/optim), precision (autocast, fp16 loss scaling),
// evaluation, metrics/events (docs/contracts.md §3), checkpoints (core/checkpoint.h) and exact resume.
#include "core/train.h"
#include "core/profile.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/DeviceGuard.h>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#if ABLATE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "core/checkpoint.h"
#include "core/data.h"
#include "core/dist/communicator.h"
#include "core/dist/data_parallel.h"
#include "core/flops.h"
#include "core/optim/optimizer.h"
#include "core/precision.h"
#include "core/fsutil.h"
#include "core/lease_watch.h"
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
          {"beta1", c.beta1},
          {"beta2", c.beta2},
          {"adam_eps", c.adam_eps},
          {"precondition_frequency", c.precondition_frequency},
          {"shampoo_beta", c.shampoo_beta},
          {"max_precond_dim", c.max_precond_dim},
          {"block_repeats", c.block_repeats},
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
  return {{"family", m.family}, {"pattern", m.pattern}, {"attn_type", m.attn_type},
          {"d", m.d},           {"n_layers", m.n_layers},         {"n_heads", m.n_heads},
          {"n_kv_heads", m.n_kv_heads}, {"intermediate", m.intermediate}, {"padded_vocab", m.padded_vocab}};
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
  return static_cast<int64_t>(ru.ru_maxrss) * 1024;  // CPU: peak resident set of the process (Linux: KiB)
}

std::string device_name(const torch::Device& dev) {
#if ABLATE_WITH_CUDA
  if (dev.is_cuda()) return at::cuda::getDeviceProperties(dev.index() < 0 ? 0 : dev.index())->name;
#endif
  return dev.str();
}

// Compute precision. Master weights and optimizer state are always fp32; bf16/fp16 autocast the matmuls and
// attention (LibTorch's autocast lists, on CPU as on CUDA) while norms, softmax statistics and the loss stay fp32.
struct Precision {
  bool autocast = false;
  c10::ScalarType dtype = torch::kFloat32;
  bool loss_scaling = false;  // fp16 only: bf16 has fp32's exponent range
};

Precision precision_for(const std::string& dtype) {
  Precision p;
  if (dtype == "bfloat16") {
    p.autocast = true;
    p.dtype = torch::kBFloat16;
  } else if (dtype == "float16") {
    p.autocast = true;
    p.dtype = torch::kFloat16;
    p.loss_scaling = true;
  }
  return p;
}

// The default generators' states: nothing in the loop draws random numbers today (the data stream is a pure
// function of the cursor), but a dropout or a stochastic rounding added later must resume exactly too.
torch::serialize::OutputArchive rng_archive() {
  torch::serialize::OutputArchive ar;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    ar.write("cpu", gen.get_state());
  }
#if ABLATE_WITH_CUDA
  if (torch::cuda::is_available()) {
    auto gen = at::cuda::detail::getDefaultCUDAGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    ar.write("cuda", gen.get_state());
  }
#endif
  return ar;
}

void restore_rng(const std::string& path) {
  torch::serialize::InputArchive ar;
  ar.load_from(path);
  torch::Tensor st;
  ar.read("cpu", st);
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(st);
  }
#if ABLATE_WITH_CUDA
  if (torch::cuda::is_available() && ar.try_read("cuda", st)) {
    auto gen = at::cuda::detail::getDefaultCUDAGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(st);
  }
#endif
}

json scaler_json(const LossScaler& s) {
  return {{"enabled", s.enabled()},
          {"scale", s.scale()},
          {"growth_tracker", s.growth_tracker()},
          {"skipped_steps", s.skipped_steps()}};
}

// How this process takes part in a multi-process run (world 1: a plain run, comm == nullptr).
struct DistContext {
  dist::Communicator* comm = nullptr;
  int rank = 0, world = 1;
  bool sharded = false;    // --parallel zero: each rank holds the optimizer state of its own parameters
  int64_t pid0 = 0;        // rank 0's pid: names the temporary checkpoint directory every rank writes into
  json optimizer_shards;   // [{"file", "params": [names in that optimizer's order]}] written to state.json
  bool rank0() const { return rank == 0; }
};

ManifestEntry write_archive_durable(const std::string& path, torch::serialize::OutputArchive& ar,
                                    const std::atomic<bool>& cancel, int64_t delay_ms = 0, int fail_errno = 0);

// A manifest row as a fixed-size byte tensor (size, then the sha256's 64 hex digits), to all-gather the shards'
// rows to rank 0, and back.
constexpr int64_t kEntryBytes = 8 + 64;
torch::Tensor entry_tensor(const ManifestEntry& e, const torch::Device& device) {
  auto t = torch::zeros({kEntryBytes}, torch::kUInt8);
  std::memcpy(t.data_ptr(), &e.bytes, 8);
  std::memcpy(static_cast<uint8_t*>(t.data_ptr()) + 8, e.sha256.data(), std::min<size_t>(64, e.sha256.size()));
  return t.to(device);
}
ManifestEntry entry_from(const torch::Tensor& cpu_row, const std::string& file) {
  ManifestEntry e;
  e.file = file;
  std::memcpy(&e.bytes, cpu_row.data_ptr(), 8);
  e.sha256.assign(reinterpret_cast<const char*>(cpu_row.data_ptr()) + 8, 64);
  return e;
}

// Writes checkpoint-<step> (see core/checkpoint.h). Refuses (Diverged) to write non-finite weights or state.
// Distributed: rank 0 writes model.pt, rng.pt, state.json and the manifest; the optimizer state is rank 0's
// optimizer.pt (ddp: every rank holds the same) or, sharded, one optimizer-<r>-of-<N>.pt per rank written by that
// rank into the same temporary directory (one machine or a shared file system), its manifest row all-gathered to
// rank 0. Every decision that makes a rank throw is taken identically on all ranks, so they fail together.
// Archives stream into their files, hashed on the way (write_archive_durable): no whole-file copy in host memory
// and no read-back; the finiteness checks run on the device.
std::string save_checkpoint(const fs::path& run_dir, int64_t step, Transformer& model, core::optim::Optimizer& opt,
                            json state, const DistContext& dc) {
  torch::NoGradGuard ng;
  for (const auto& p : model->named_parameters())  // the same on every rank
    if (!torch::isfinite(p.value()).all().item<bool>())
      throw Diverged("parameter " + p.key() + " is not finite at step " + std::to_string(step) +
                     "; no checkpoint written");
  std::string bad = opt.first_nonfinite_state();
  if (dc.sharded && dc.comm->all_reduce_scalar(bad.empty() ? 0.0 : 1.0, dist::ReduceOp::kSum) > 0 && bad.empty())
    bad = "(on another rank)";
  if (!bad.empty())
    throw Diverged("optimizer state '" + bad + "' is not finite at step " + std::to_string(step) +
                   "; no checkpoint written");
  if (!dc.rank0() && !dc.sharded) return "";

  const std::atomic<bool> never{false};
  const fs::path final_dir = run_dir / ("checkpoint-" + std::to_string(step));
  const fs::path tmp_dir = run_dir / ("checkpoint-" + std::to_string(step) + ".tmp-" + std::to_string(dc.pid0));
  if (dc.rank0()) {
    fs::create_directories(run_dir);
    remove_tree(tmp_dir.string());
    fs::create_directories(tmp_dir);
  }
  std::vector<ManifestEntry> entries;
  // Rank 0 writes model.pt from a second thread while this one writes the optimizer state (its shard, or the whole
  // optimizer.pt): serializing and hashing are CPU-bound per file, so the two overlap (4B: ~16.5 GB each).
  std::future<ManifestEntry> model_file;
  auto start_model_file = [&] {
    model_file = std::async(std::launch::async, [&model, path = (tmp_dir / "model.pt").string(), &never] {
      const auto params = model->parameters();
      c10::OptionalDeviceGuard guard;  // the GPU->host copies on the model's device, not this thread's device 0
      if (!params.empty() && !params[0].is_cpu()) guard.reset_device(params[0].device());
      torch::serialize::OutputArchive model_ar;
      model->save(model_ar);
      return write_archive_durable(path, model_ar, never);
    });
  };
  auto write_optimizer = [&](const std::string& name) {
    torch::serialize::OutputArchive opt_ar;
    opt.save(opt_ar);
    return write_archive_durable((tmp_dir / name).string(), opt_ar, never);
  };
  if (dc.sharded) {
    dc.comm->barrier();  // the directory exists
    std::string err;
    ManifestEntry row;
    try {
      if (dc.rank0()) start_model_file();
      row = write_optimizer(dc.optimizer_shards.at(dc.rank).at("file").get<std::string>());
    } catch (const std::exception& e) {
      err = e.what();
    }
    if (model_file.valid()) {
      try {
        entries.push_back(model_file.get());
      } catch (const std::exception& e) {
        if (err.empty()) err = e.what();
      }
    }
    if (dc.comm->all_reduce_scalar(err.empty() ? 0.0 : 1.0, dist::ReduceOp::kSum) > 0)
      throw std::runtime_error("checkpoint at step " + std::to_string(step) + ": a rank could not write its part" +
                               (err.empty() ? std::string() : ": " + err));
    const auto device = dc.comm->device();
    auto rows = torch::empty({dc.world * kEntryBytes}, torch::TensorOptions().dtype(torch::kUInt8).device(device));
    dc.comm->all_gather(entry_tensor(row, device), rows);
    if (!dc.rank0()) return "";
    const auto host = rows.cpu().view({dc.world, kEntryBytes});
    for (int r = 0; r < dc.world; ++r)
      entries.push_back(entry_from(host[r].contiguous(), dc.optimizer_shards.at(r).at("file").get<std::string>()));
  } else {
    start_model_file();
    std::exception_ptr failed;
    try {
      entries.push_back(write_optimizer("optimizer.pt"));
    } catch (...) {
      failed = std::current_exception();
    }
    try {
      entries.push_back(model_file.get());  // joins the writer before any error leaves this function
    } catch (...) {
      if (!failed) failed = std::current_exception();
    }
    if (failed) std::rethrow_exception(failed);
  }
  {
    auto rng_ar = rng_archive();
    entries.push_back(write_archive_durable((tmp_dir / "rng.pt").string(), rng_ar, never));
  }
  state["optimizer_shards"] = dc.optimizer_shards;
  write_file_durable((tmp_dir / "state.json").string(), state.dump(2) + "\n");
  entries.push_back(manifest_entry(tmp_dir.string(), "state.json"));
  write_manifest(tmp_dir.string(), step, entries);  // last: its presence marks a complete checkpoint
  return publish_checkpoint(tmp_dir.string(), final_dir.string());
}

// Names of the parameters an optimizer built over `named` holds, in its order (make_param_groups: decayed first).
std::vector<std::string> optimizer_order(const core::optim::NamedParams& named, double weight_decay) {
  std::vector<std::string> out;
  for (const auto& g : core::optim::make_param_groups(named, weight_decay))
    for (const auto& n : g.names) out.push_back(n);
  return out;
}

// Loads the optimizer state of `mine` (the parameter names of `opt`, in its order) from a checkpoint's shards,
// whatever the number of ranks that wrote it: each shard archive holds "p<k>/..." entries for its k-th parameter,
// which are renamed to this optimizer's positions. One shard with exactly these parameters loads directly.
void load_optimizer_state(const fs::path& ck, const json& shards, const std::vector<std::string>& mine,
                          core::optim::Optimizer& opt, const torch::Device& device) {
  if (shards.size() == 1 && shards[0].at("params").get<std::vector<std::string>>() == mine) {
    torch::serialize::InputArchive ar;
    ar.load_from((ck / shards[0].at("file").get<std::string>()).string(), device);
    opt.load(ar);
    return;
  }
  std::map<std::string, size_t> want;
  for (size_t j = 0; j < mine.size(); ++j) want[mine[j]] = j;
  torch::serialize::OutputArchive out;
  out.write("optim/num_params", c10::IValue(static_cast<int64_t>(mine.size())));
  size_t found = 0;
  bool header = false;
  for (const auto& sh : shards) {
    const auto names = sh.at("params").get<std::vector<std::string>>();
    std::map<int64_t, size_t> remap;  // shard position -> our position
    for (size_t k = 0; k < names.size(); ++k)
      if (auto it = want.find(names[k]); it != want.end()) remap[static_cast<int64_t>(k)] = it->second;
    if (remap.empty() && header) continue;
    torch::serialize::InputArchive in;
    in.load_from((ck / sh.at("file").get<std::string>()).string(), device);
    if (!header) {
      for (const char* key : {"optim/name", "optim/lr"}) {
        c10::IValue v;
        if (!in.try_read(key, v)) throw ConfigError("checkpoint " + ck.string() + ": optimizer shard without " + key);
        out.write(key, v);
      }
      header = true;
    }
    for (const auto& key : in.keys()) {
      if (key.size() < 3 || key[0] != 'p') continue;
      const auto slash = key.find('/');
      if (slash == std::string::npos) continue;
      const int64_t k = std::stoll(key.substr(1, slash - 1));
      const auto it = remap.find(k);
      if (it == remap.end()) continue;
      c10::IValue v;
      in.try_read(key, v);
      const std::string nk = "p" + std::to_string(it->second) + key.substr(slash);
      if (v.isTensor()) {
        out.write(nk, v.toTensor());
      } else {
        out.write(nk, v);
      }
    }
    found += remap.size();
  }
  if (found != mine.size())
    throw ConfigError("checkpoint " + ck.string() + ": the optimizer state of " + std::to_string(mine.size() - found) +
                      " of this rank's parameters is in no shard");
  std::ostringstream os;
  out.save_to(os);
  const std::string bytes = os.str();
  torch::serialize::InputArchive ar;
  ar.load_from(bytes.data(), bytes.size(), device);
  opt.load(ar);
}

bool contains(const std::vector<int64_t>& v, int64_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// ---------------------------------------------------------------- asynchronous checkpoint saves (RELIABILITY F27)
// A single-process run snapshots its state into host memory at a checkpoint step (the model's tensors copied to
// pinned memory on CUDA, the optimizer's state through Optimizer::save, which copies to the host; RNG and
// state.json are values) and a background thread writes the same files the synchronous path writes, into the
// same checkpoint-<step>.tmp-<pid> directory, hashes them, then commits: manifest.json last, rename, fsync. The
// main thread emits the "checkpoint" event only once the rename is durable, and the writer prunes old checkpoints
// only after that. One save is in flight at a time; a save still running past --checkpoint_deadline_s is
// abandoned before it commits (its temporary directory removed, a "checkpoint_abandoned" event) and the next
// checkpoint step tries again. A write error (a full disk) ends the run from the main loop as the synchronous path
// does. Multi-process runs stay synchronous (their save is a collective: every rank must decide the same way).
//
// Test hooks (environment, never set by the worker or the CLI):
//   ABLATE_TEST_CHECKPOINT_WRITE_DELAY_MS=<ms>     the background writer sleeps that long per save, a quarter
//                                                  in each of its four files (inside the archive's serialization,
//                                                  in 10 ms slices that notice an abandonment: a slow store)
//   ABLATE_TEST_CHECKPOINT_WRITE_DELAY_STEPS=a,b   only the saves of these steps are slow (default: all)
//   ABLATE_TEST_CHECKPOINT_ENOSPC_STEPS=a,b        writing optimizer.pt of these steps fails with ENOSPC (in the
//                                                  middle of its serialization, as a full disk would)
struct CheckpointTestHooks {
  int64_t delay_ms = 0;
  std::vector<int64_t> delay_steps, enospc_steps;

  static std::vector<int64_t> steps(const char* name) {
    std::vector<int64_t> out;
    const char* v = std::getenv(name);
    if (!v) return out;
    std::stringstream ss(v);
    std::string item;
    while (std::getline(ss, item, ','))
      if (!item.empty()) out.push_back(std::stoll(item));
    return out;
  }
  static CheckpointTestHooks from_env() {
    CheckpointTestHooks h;
    if (const char* v = std::getenv("ABLATE_TEST_CHECKPOINT_WRITE_DELAY_MS"); v && *v) h.delay_ms = std::stoll(v);
    h.delay_steps = steps("ABLATE_TEST_CHECKPOINT_WRITE_DELAY_STEPS");
    h.enospc_steps = steps("ABLATE_TEST_CHECKPOINT_ENOSPC_STEPS");
    return h;
  }
  int64_t delay_for(int64_t step) const {
    return delay_ms > 0 && (delay_steps.empty() || contains(delay_steps, step)) ? delay_ms : 0;
  }
};

// What the background writer needs: host copies only, nothing that training goes on mutating.
struct CheckpointSnapshot {
  int64_t step = 0;
  fs::path run_dir;
  int64_t pid = 0;
  int64_t keep = 0;
  torch::serialize::OutputArchive model, optimizer, rng;
  // Second handles on the model's host copies: the pickler memoizes a tensor only when something else holds it
  // too (use_count > 1), as the live model does for a synchronous save; with these the bytes are the same.
  std::vector<torch::Tensor> model_refs;
  std::string state;  // state.json
  int64_t host_bytes = 0;
  int64_t delay_ms = 0;  // test hook
  bool enospc = false;   // test hook
};

// A host copy of t: a clone on the CPU; on CUDA an asynchronous copy into pinned memory (the caller synchronizes
// the stream once after all copies).
torch::Tensor host_copy(const torch::Tensor& t) {
  auto d = t.detach();
  if (d.is_cpu()) return d.clone();
  const auto opts = d.options().device(torch::kCPU).pinned_memory(true);
  auto h = d.is_non_overlapping_and_dense() ? torch::empty_strided(d.sizes(), d.strides(), opts)
                                            : torch::empty(d.sizes(), opts);
  h.copy_(d, /*non_blocking=*/true);
  return h;
}

// torch::nn::Module::save over host copies (the same archive layout, so torch::load reads it as usual). Returns
// false if two tensors share storage: a copy would untie them, so the caller saves synchronously instead.
bool snapshot_module(const torch::nn::Module& m, torch::serialize::OutputArchive& ar, std::set<const void*>& seen,
                     std::vector<torch::Tensor>& refs, int64_t& bytes) {
  for (const auto& p : m.named_parameters(/*recurse=*/false)) {
    if (!p.value().defined()) continue;
    if (!seen.insert(p.value().storage().unsafeGetStorageImpl()).second) return false;
    auto h = host_copy(p.value());
    h.set_requires_grad(p.value().requires_grad());
    bytes += static_cast<int64_t>(h.nbytes());
    refs.push_back(h);
    ar.write(p.key(), h);
  }
  for (const auto& b : m.named_buffers(/*recurse=*/false)) {
    if (!b.value().defined()) continue;
    if (!seen.insert(b.value().storage().unsafeGetStorageImpl()).second) return false;
    auto h = host_copy(b.value());
    bytes += static_cast<int64_t>(h.nbytes());
    refs.push_back(h);
    ar.write(b.key(), h, /*is_buffer=*/true);
  }
  for (const auto& c : m.named_children()) {
    if (!c.value()->is_serializable()) continue;
    torch::serialize::OutputArchive sub(ar.compilation_unit());
    if (!snapshot_module(*c.value(), sub, seen, refs, bytes)) return false;
    ar.write(c.key(), sub);
  }
  return true;
}

// Host bytes a snapshot takes: parameters and buffers plus the optimizer's state.
int64_t snapshot_bytes(const torch::nn::Module& m, const core::optim::Optimizer& opt) {
  int64_t b = opt.state_bytes();
  for (const auto& p : m.parameters()) b += p.defined() ? static_cast<int64_t>(p.nbytes()) : 0;
  for (const auto& p : m.buffers()) b += p.defined() ? static_cast<int64_t>(p.nbytes()) : 0;
  return b;
}

// MemAvailable of /proc/meminfo in bytes, -1 when unknown.
int64_t mem_available_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  int64_t kb = 0;
  while (f >> key >> kb) {
    std::getline(f, unit);
    if (key == "MemAvailable:") return kb * 1024;
  }
  return -1;
}

struct SaveCancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Streams an archive into path (created or truncated) in 8 MiB writes, checking `cancel` between them, then
// fsyncs; returns the file's manifest row, its SHA-256 taken from the bytes as they stream past (a 4B model's
// ~24 GB need not be read back to be hashed). The archive's writer callback must never fail: a short count makes
// LibTorch's zip writer throw from its destructor, which ends the process. So after a write error or a cancellation the callback swallows the rest of
// the archive (serialized, not written) and the reason is thrown here once save_to has returned.
// Test hooks: delay_ms is slept (in slices that notice `cancel`) inside the first callback, i.e. in the middle of
// serializing; fail_errno != 0 makes the first write fail with that error.
ManifestEntry write_archive_durable(const std::string& path, torch::serialize::OutputArchive& ar,
                                    const std::atomic<bool>& cancel, int64_t delay_ms, int fail_errno) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path + ": " + std::strerror(errno));
  std::string err;
  bool cancelled = false, first = true;
  Sha256 hash;
  int64_t written = 0;
  try {
    ar.save_to([&](const void* data, size_t n) -> size_t {
      if (first) {
        first = false;
        const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(delay_ms);
        while (!cancel.load() && std::chrono::steady_clock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        if (fail_errno != 0) err = "cannot write " + path + ": " + std::strerror(fail_errno) + " (test hook)";
      }
      if (!err.empty() || cancelled) return n;  // swallowed: see above
      hash.update(data, n);
      written += static_cast<int64_t>(n);
      const char* p = static_cast<const char*>(data);
      size_t off = 0;
      while (off < n) {
        if (cancel.load()) {
          cancelled = true;
          return n;
        }
        const ssize_t w = ::write(fd, p + off, std::min<size_t>(n - off, size_t(8) << 20));
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
          err = "cannot write " + path + ": " + std::strerror(w < 0 ? errno : EIO);
          return n;
        }
        off += static_cast<size_t>(w);
      }
      return n;
    });
  } catch (const c10::Error& e) {
    if (err.empty() && !cancelled) err = "cannot serialize " + path + ": " + e.what_without_backtrace();
  }
  if (err.empty() && !cancelled && cancel.load()) cancelled = true;
  if (err.empty() && !cancelled && ::fsync(fd) != 0) err = "cannot fsync " + path + ": " + std::strerror(errno);
  if (::close(fd) != 0 && err.empty() && !cancelled) err = "cannot close " + path + ": " + std::strerror(errno);
  if (cancelled) throw SaveCancelled("abandoned while writing " + path);
  if (!err.empty()) throw std::runtime_error(err);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)  // something else removed the folder while we wrote
    throw std::runtime_error("checkpoint file " + path + " disappeared while it was written: " +
                             std::strerror(errno));
  if (static_cast<int64_t>(st.st_size) != written)
    throw std::runtime_error("checkpoint file " + path + " holds " + std::to_string(st.st_size) + " bytes, not the " +
                             std::to_string(written) + " written to it");
  return {fs::path(path).filename().string(), written, hash.hex()};
}

// What happened to one background save (reported on the main thread).
struct SaveOutcome {
  int64_t step = 0;
  std::string path;                  // published checkpoint ("" when abandoned or failed)
  std::vector<std::string> removed;  // pruned older checkpoints
  std::string warning;               // pruning trouble (not fatal)
  std::string error;                 // the save failed (a full disk): the run fails as a synchronous save would
  bool abandoned = false;
  std::string reason;                // why it was abandoned
  double write_s = 0;                // the writer's wall time
};

class AsyncCheckpointer {
 public:
  using Published = std::function<void(int64_t step, const std::string& path)>;
  using Finished = std::function<void(const SaveOutcome&)>;

  AsyncCheckpointer(double deadline_s, Published on_published, Finished on_finished)
      : deadline_s_(deadline_s), on_published_(std::move(on_published)), on_finished_(std::move(on_finished)) {}
  AsyncCheckpointer(const AsyncCheckpointer&) = delete;
  AsyncCheckpointer& operator=(const AsyncCheckpointer&) = delete;

  // On the way out of a failed run the save in flight still completes (within its deadline), so the run leaves
  // its newest valid state behind; errors are printed, never thrown.
  ~AsyncCheckpointer() {
    try {
      wait();
    } catch (const std::exception& e) {
      std::cerr << "ablate-train: checkpoint: " << e.what() << "\n";
    }
    if (thread_.joinable()) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        shutdown_ = true;
        if (!committing_) cancel_ = true;
      }
      cv_.notify_all();
      thread_.join();
    }
  }

  bool busy() const { return thread_.joinable(); }
  int64_t in_flight_step() const { return snap_ ? snap_->step : -1; }

  void start(std::unique_ptr<CheckpointSnapshot> snap) {
    if (busy()) throw std::logic_error("AsyncCheckpointer::start with a save in flight");
    snap_ = std::move(snap);
    cancel_ = false;
    committing_ = published_ = acked_ = done_ = shutdown_ = false;
    reason_.clear();
    path_.clear();
    outcome_ = SaveOutcome{};
    started_ = std::chrono::steady_clock::now();
    thread_ = std::thread([this] { run(); });
  }

  // Main thread, every step: reports a publication, enforces the deadline, collects a finished save (and throws
  // its error, if any).
  void poll() {
    if (!thread_.joinable()) return;
    bool ack = false, done = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      ack = published_ && !acked_;
      done = done_;
      if (!done_ && !committing_ && !cancel_ && deadline_s_ > 0 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count() > deadline_s_) {
        cancel_ = true;
        std::ostringstream r;
        r << "the save took longer than --checkpoint_deadline_s " << deadline_s_ << " s";
        reason_ = r.str();
      }
    }
    if (ack) {
      on_published_(snap_->step, path_);  // the rename is durable: now the worker may reference it
      {
        std::lock_guard<std::mutex> lk(mu_);
        acked_ = true;
      }
      cv_.notify_all();
    }
    if (done) {
      thread_.join();
      SaveOutcome o = std::move(outcome_);
      snap_.reset();
      on_finished_(o);
    }
  }

  // Blocks until no save is in flight (the deadline still applies); returns the seconds waited.
  double wait() {
    const auto t0 = std::chrono::steady_clock::now();
    while (thread_.joinable()) {
      poll();
      if (!thread_.joinable()) break;
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait_for(lk, std::chrono::milliseconds(20), [&] { return done_ || (published_ && !acked_); });
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

 private:
  void check_cancel() {
    if (cancel_.load()) throw SaveCancelled("abandoned");
  }
  void sleep_hook(int64_t ms) {  // ABLATE_TEST_CHECKPOINT_WRITE_DELAY_MS: a slow store
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < until) {
      check_cancel();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    check_cancel();
  }

  void run() {
    CheckpointSnapshot& s = *snap_;
    SaveOutcome o;
    o.step = s.step;
    const auto t0 = std::chrono::steady_clock::now();
    const fs::path final_dir = s.run_dir / ("checkpoint-" + std::to_string(s.step));
    const fs::path tmp = s.run_dir / ("checkpoint-" + std::to_string(s.step) + ".tmp-" + std::to_string(s.pid));
    bool published = false;
    try {
      fs::create_directories(s.run_dir);
      remove_tree(tmp.string());
      fs::create_directories(tmp);
      std::vector<ManifestEntry> entries;
      const int64_t slice = s.delay_ms / 4;
      auto archive = [&](const char* name, torch::serialize::OutputArchive& ar) {
        const std::string p = (tmp / name).string();
        const bool fail = s.enospc && std::string(name) == "optimizer.pt";
        entries.push_back(write_archive_durable(p, ar, cancel_, slice, fail ? ENOSPC : 0));
        ar = torch::serialize::OutputArchive();  // written: its host memory goes now
        check_cancel();
      };
      archive("model.pt", s.model);
      s.model_refs.clear();
      archive("optimizer.pt", s.optimizer);
      archive("rng.pt", s.rng);
      sleep_hook(slice);
      write_file_durable((tmp / "state.json").string(), s.state);
      entries.push_back(manifest_entry(tmp.string(), "state.json"));
      {
        std::lock_guard<std::mutex> lk(mu_);
        check_cancel();
        committing_ = true;  // from here on the save completes: abandoning would race the rename
      }
      write_manifest(tmp.string(), s.step, entries);  // last: its presence marks a complete checkpoint
      o.path = publish_checkpoint(tmp.string(), final_dir.string());
      published = true;
      o.write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      {
        std::unique_lock<std::mutex> lk(mu_);
        path_ = o.path;
        published_ = true;
        cv_.notify_all();
        cv_.wait(lk, [&] { return acked_ || shutdown_; });  // the event is out before older checkpoints go
        if (!acked_) o.path.clear();
      }
      if (!o.path.empty()) {
        try {
          o.removed = prune_checkpoints(s.run_dir.string(), s.keep, o.path);
        } catch (const std::exception& e) {
          o.warning = std::string("could not remove old checkpoints: ") + e.what();
        }
      }
    } catch (const SaveCancelled&) {
      o.abandoned = true;
      {
        std::lock_guard<std::mutex> lk(mu_);
        o.reason = reason_.empty() ? "the run ended" : reason_;
      }
    } catch (const std::exception& e) {
      o.error = e.what();
    }
    if (!published) {
      try {
        remove_tree(tmp.string());
      } catch (const std::exception& e) {
        o.warning = std::string("could not remove ") + tmp.string() + ": " + e.what();
      }
    }
    std::lock_guard<std::mutex> lk(mu_);
    outcome_ = std::move(o);
    done_ = true;
    cv_.notify_all();
  }

  const double deadline_s_;
  Published on_published_;
  Finished on_finished_;
  std::unique_ptr<CheckpointSnapshot> snap_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> cancel_{false};
  bool committing_ = false, published_ = false, acked_ = false, done_ = false, shutdown_ = false;
  std::string reason_, path_;
  SaveOutcome outcome_;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace

int run_training(const TrainConfig& cfg, TrainResult* result, const TrainHooks* hooks) {
  // Rank layout (RANK, WORLD_SIZE, ...: set by --nproc's launcher, the worker or torchrun-like tools).
  dist::EnvLayout layout;
  try {
    layout = dist::env_layout();
  } catch (const std::exception& e) {
    std::cerr << "ablate-train: " << e.what() << "\n";
    Events(cfg.events_fd).emit({{"event", "finished"}, {"status", "failed"}, {"failure_class", "invalid_config"},
                                {"message", e.what()}});
    return kExitInvalidConfig;
  }
  const bool rank0 = layout.rank == 0;
  // Only rank 0 reports: events, the log on stdout, checkpoints. Every rank prints its errors on stderr.
  Events events(rank0 ? cfg.events_fd : -1);
  std::ostream out(rank0 ? std::cout.rdbuf() : nullptr);
  auto fail = [&](int code, const std::string& cls, const std::string& msg) {
    dist::wait_if_hang_exit();  // a collective's watchdog is ending the process as a hang: not a crash
    std::cerr << "ablate-train: " << msg << "\n";
    events.emit({{"event", "finished"}, {"status", "failed"}, {"failure_class", cls}, {"message", msg}});
    return code;
  };
  const TrainHooks no_hooks;
  const TrainHooks& hk = hooks ? *hooks : no_hooks;
  // A frozen worker cannot stop us when its lease runs out: stop ourselves, without saving (another attempt may
  // already own the job), as soon as the deadline it last wrote has passed.
  std::unique_ptr<LeaseWatch> lease_watch;
  if (!cfg.lease_file.empty()) {
    lease_watch = std::make_unique<LeaseWatch>(cfg.lease_file, [path = cfg.lease_file] {
      std::fprintf(stderr, "ablate-train: the worker's lease deadline in %s passed without renewal (worker frozen or "
                   "gone): stopping now, without saving\n", path.c_str());
      std::fflush(stderr);
      std::_Exit(kExitLeaseExpired);
    });
  }

  try {
    cfg.validate();
    if (cfg.nproc > 1 && cfg.nproc != layout.world)
      throw ConfigError("--nproc " + std::to_string(cfg.nproc) + " but the environment says WORLD_SIZE=" +
                        std::to_string(layout.world));
    const std::string optimizer_name = canonical_optimizer_name(cfg.optimizer_type);
    // A checkpoint is verified before anything else is read or built: a corrupt one fails fast, naming the file.
    if (!cfg.resume_from.empty()) verify_checkpoint(cfg.resume_from);

    // Vocabulary: the dataset's meta.json; --print_config without --data_dir describes the seed's Qwen-vocab
    // (151936) model. Training without --data_dir reads the default data/fortunes (resolve_data_dir explains how to
    // prepare it when it is missing).
    std::unique_ptr<DataLoader> data;
    int64_t vocab = kSeedVocab;
    if (!cfg.print_config || !cfg.data_dir.empty()) {
      data = std::make_unique<DataLoader>(resolve_data_dir(cfg), cfg.batch_size, cfg.context_length, cfg.seed);
      if (layout.world > 1) data->set_shard(layout.rank, layout.world);  // this rank's rows of the global batch
      vocab = data->vocab_size();
    }
    // Family (transformer / mamba2 / deltanet / hybrid pattern), mixer settings and size: core/config.cpp.
    const ModelDims dims = resolve_model(cfg, vocab);
    const int64_t n_params = count_params(dims);
    // Auto threads: small models run fastest on one thread (their ops are too small to split, and OpenMP's
    // spinning threads collapse when the cores are shared with other jobs: measured 16k vs 0.8k tok/s on 2 busy
    // cores for tiny); larger models use every hardware thread.
    const int64_t threads = cfg.num_threads > 0 ? cfg.num_threads
                            : n_params < 5'000'000 ? 1
                                                   : std::max<int64_t>(1, std::thread::hardware_concurrency());
    at::set_num_threads(static_cast<int>(threads));

    if (cfg.print_config) {
      out << describe_model(dims);
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
      device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(layout.world > 1 ? layout.local_rank : 0));
      c10::cuda::set_device(device.index());
#endif
    }
    const Precision prec = precision_for(cfg.dtype);

    // Communicator (core/dist): a collective that makes no progress for --dist_timeout reports a hang and exits 5.
    std::unique_ptr<dist::Communicator> comm;
    DistContext dc;
    dc.rank = layout.rank;
    dc.world = layout.world;
    dc.pid0 = ::getpid();
    if (layout.world > 1) {
      dist::Options o;
      o.timeout = std::chrono::milliseconds(static_cast<int64_t>(cfg.dist_timeout * 1000));
      o.on_hang = [&events](const std::string& msg) {
        events.emit({{"event", "finished"}, {"status", "failed"}, {"failure_class", "hang"}, {"message", msg}});
      };
      const std::string backend =
          cfg.dist_backend != "auto" ? cfg.dist_backend : device.is_cuda() ? "nccl" : "cpu";
      if ((backend == "nccl") != device.is_cuda())
        throw ConfigError("--dist_backend " + backend + " does not work with tensors on " + device.str());
      comm = dist::init_from_env(backend, std::move(o));
      dc.comm = comm.get();
      dc.sharded = cfg.parallel == "zero";
      auto pid = torch::full({1}, static_cast<int64_t>(::getpid()), torch::TensorOptions().dtype(torch::kLong).device(device));
      comm->broadcast(pid, 0);
      dc.pid0 = pid.item<int64_t>();
    }

    const std::string run_name = cfg.run_name.empty() ? cfg.default_run_name() : cfg.run_name;
    const fs::path run_dir = fs::path(cfg.output_dir) / run_name;

    // Model and optimizer (named parameters, so the no-decay rule sees biases, norms and embeddings).
    torch::manual_seed(cfg.seed);
    const auto build_t0 = std::chrono::steady_clock::now();
    Transformer model(dims, cfg.rope_theta);
    model->set_gradient_checkpointing(cfg.gradient_checkpointing);  // per block, core/checkpointing.h
    model->to(device);
    core::optim::OptimConfig oc;
    oc.lr = cfg.learning_rate;
    oc.weight_decay = cfg.weight_decay;
    oc.beta1 = cfg.beta1;
    oc.beta2 = cfg.beta2;
    oc.eps = cfg.adam_eps;
    oc.precondition_frequency = cfg.precondition_frequency;
    oc.shampoo_beta = cfg.shampoo_beta;
    oc.max_precond_dim = cfg.max_precond_dim;
    core::optim::NamedParams trainable;
    for (const auto& p : model->named_parameters())
      if (p.value().requires_grad()) trainable.emplace_back(p.key(), p.value());
    // Sharded: this rank's optimizer holds its own parameters only; the others' state lives on their owners.
    std::unique_ptr<dist::ZeroSharding> zero;
    if (dc.sharded) zero = std::make_unique<dist::ZeroSharding>(*comm, trainable);
    auto optimizer = core::optim::make_optimizer(optimizer_name, zero ? zero->owned() : trainable, oc);
    const std::vector<std::string> my_opt_names = optimizer_order(zero ? zero->owned() : trainable, oc.weight_decay);
    if (zero) {
      for (int r = 0; r < dc.world; ++r) {
        core::optim::NamedParams owned_r;
        for (size_t i = 0; i < trainable.size(); ++i)
          if (zero->owner(i) == r) owned_r.push_back(trainable[i]);
        dc.optimizer_shards.push_back({{"file", "optimizer-" + std::to_string(r) + "-of-" + std::to_string(dc.world) + ".pt"},
                                       {"params", optimizer_order(owned_r, oc.weight_decay)}});
      }
    } else {
      dc.optimizer_shards = json::array({{{"file", "optimizer.pt"}, {"params", my_opt_names}}});
    }
    std::vector<torch::Tensor> params = model->parameters();
    // Model init + move to the device + optimizer state, reported in the header (large models start slowly).
    const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - build_t0).count();
    LossScaler scaler(prec.loss_scaling);

    // Resume (the checkpoint was verified above).
    int64_t start_step = 0;
    if (!cfg.resume_from.empty()) {
      const fs::path ck(cfg.resume_from);
      json st;
      try {
        std::ifstream f(ck / "state.json");
        st = json::parse(f);
      } catch (const std::exception& e) {
        throw ConfigError("checkpoint file " + (ck / "state.json").string() + " is unreadable: " + e.what());
      }
      if (st.value("dims", json()) != dims_json(dims))
        throw ConfigError("checkpoint " + cfg.resume_from + " was made for model " + st.value("dims", json()).dump() +
                          ", but this run builds " + dims_json(dims).dump());
      if (st.value("optimizer", std::string()) != optimizer_name)
        throw ConfigError("checkpoint " + cfg.resume_from + " holds the state of optimizer '" +
                          st.value("optimizer", std::string("?")) + "', but this run uses '" + optimizer_name + "'");
      const json saved_cfg = st.value("config", json::object()), now_cfg = config_json(cfg);
      for (const auto& [k, v] : now_cfg.items())
        if (k != "data_dir" && saved_cfg.contains(k) && saved_cfg[k] != v)
          std::cerr << "ablate-train: note: resuming with " << k << " = " << v.dump() << " (the checkpoint had "
                    << saved_cfg[k].dump() << "); the result will differ from an uninterrupted run\n";
      auto load_file = [&](const std::string& name, const std::function<void(const std::string&)>& fn) {
        const std::string path = (ck / name).string();
        try {
          fn(path);
        } catch (const c10::Error& e) {
          throw ConfigError("checkpoint file " + path + " could not be loaded: " + e.what_without_backtrace());
        }
      };
      load_file("model.pt", [&](const std::string& p) { torch::load(model, p, device); });
      // Checkpoints from before sharding have no optimizer_shards: one optimizer.pt over all parameters.
      const json shards = st.contains("optimizer_shards")
                              ? st["optimizer_shards"]
                              : json::array({{{"file", "optimizer.pt"}, {"params", optimizer_order(trainable, oc.weight_decay)}}});
      load_file("optimizer", [&](const std::string&) {
        load_optimizer_state(ck, shards, my_opt_names, *optimizer, device);
      });
      load_file("rng.pt", [&](const std::string& p) { restore_rng(p); });
      start_step = st.at("step").get<int64_t>();
      const json sc = st.value("loss_scaler", json::object());
      scaler.restore(sc.value("scale", LossScaler::kInitScale), sc.value("growth_tracker", int64_t(0)),
                     sc.value("skipped_steps", int64_t(0)));
      if (st.value("data_cursor", int64_t(-1)) != start_step * cfg.gradient_accumulation_steps)
        throw ConfigError("checkpoint " + cfg.resume_from + ": data cursor " + st.value("data_cursor", json()).dump() +
                          " does not match step " + std::to_string(start_step) + " x gradient_accumulation_steps " +
                          std::to_string(cfg.gradient_accumulation_steps));
      out << "resumed from " << cfg.resume_from << " at step " << start_step << "\n";
    }

    // Every rank starts from rank 0's weights (the seed already makes them equal; this makes sure). Data parallel
    // gets its gradient buckets, whose hooks start all-reduces during the last micro-batch's backward.
    std::unique_ptr<dist::GradientBuckets> ddp;
    if (comm) {
      dist::broadcast_tensors(*comm, params, 0);
      if (!dc.sharded) {
        std::vector<torch::Tensor> with_grad;
        for (const auto& [name, p] : trainable) with_grad.push_back(p);
        ddp = std::make_unique<dist::GradientBuckets>(*comm, with_grad,
                                                      static_cast<int64_t>(cfg.ddp_bucket_mb * (1 << 20)));
      }
    }

    // FLOPs per token (core/flops.h) and the device peak for MFU.
    const FlopsSpec fspec = flops_spec(dims, cfg);
    ParamShapes shapes;
    for (const auto& p : model->named_parameters()) shapes.emplace_back(p.key(), p.value().sizes().vec());
    const FlopsBreakdown fl = training_flops_per_token(fspec, matmul_params_per_token(shapes, fspec));
    const double flops_per_token = fl.total();
    const std::string dev_name = device_name(device);
    const double peak_tflops = cfg.peak_tflops >= 0 ? cfg.peak_tflops
                               : device.is_cuda()   ? default_peak_tflops(dev_name)
                                                    : 0.0;
    if (peak_tflops <= 0)
      out << "ablate-train: note: train/mfu is reported as 0: no peak FLOP/s known for " << dev_name
                << " (set --peak_tflops)\n";
    const int64_t state_bytes = optimizer->state_bytes();  // this rank's (sharded: ~1/N of the total)
    const int64_t total_state_bytes =
        dc.sharded ? static_cast<int64_t>(comm->all_reduce_scalar(double(state_bytes), dist::ReduceOp::kSum)) : state_bytes;
    const int64_t W = layout.world;  // global batch = W x batch_size sequences

    out << "ablate-train: " << dims.to_string() << " | params " << n_params << " | device " << dev_name
              << " | dtype " << cfg.dtype << " | optimizer " << optimizer_name << " (state " << state_bytes
              << " B" << (dc.sharded ? " per rank, " + std::to_string(total_state_bytes) + " B in all" : std::string())
              << ") | threads " << threads << " | tokens/step "
              << W * cfg.batch_size * cfg.context_length * cfg.gradient_accumulation_steps << " | GFLOP/token "
              << std::setprecision(4) << flops_per_token / 1e9 << " | built in " << std::setprecision(1) << std::fixed
              << build_s << " s" << std::defaultfloat;
    if (comm)
      out << " | " << W << " ranks, " << cfg.parallel << " over " << comm->backend()
          << (ddp ? ", " + std::to_string(ddp->num_buckets()) + " gradient buckets" : std::string());
    out << std::endl;  // flushed now: with a large model the first step can be minutes away
    events.emit({{"event", "started"}, {"total_steps", cfg.num_train_steps}, {"params", n_params}});
    if (result) {
      result->params = n_params;
      result->first_step = start_step + 1;
      result->optimizer_state_bytes = state_bytes;
      result->flops_per_token = flops_per_token;
      result->skipped_steps = scaler.skipped_steps();
    }

    auto forward_loss = [&](const Batch& b) {
      auto ids = b.inputs.to(device, /*non_blocking=*/true);
      auto tgt = b.targets.to(device, /*non_blocking=*/true);
      if (!prec.autocast) return model->loss(ids, tgt);
      at::autocast::set_autocast_enabled(device.type(), true);
      at::autocast::set_autocast_dtype(device.type(), prec.dtype);
      torch::Tensor l;
      try {
        l = model->loss(ids, tgt);
      } catch (...) {
        at::autocast::set_autocast_enabled(device.type(), false);
        at::autocast::clear_cache();
        throw;
      }
      at::autocast::set_autocast_enabled(device.type(), false);
      at::autocast::clear_cache();  // cast weights are per step: the fp32 masters change after each update
      return l;
    };

    auto evaluate = [&]() {
      torch::NoGradGuard ng;
      auto sum = torch::zeros({}, torch::TensorOptions().device(device));
      for (int64_t i = 0; i < cfg.eval_batches; ++i) sum += forward_loss(data->eval_batch(i, cfg.eval_batches)).detach();
      const double mean = sum.item<double>() / double(cfg.eval_batches);  // equal token counts: mean of means is exact
      return comm ? comm->all_reduce_scalar(mean, dist::ReduceOp::kAvg) : mean;  // each rank saw its rows
    };

    auto state_json = [&](int64_t step, double lr) {
      return json{{"step", step},
                  {"data_cursor", step * cfg.gradient_accumulation_steps},  // next micro-batch of the stream
                  {"tokens_seen", step * W * cfg.batch_size * cfg.context_length * cfg.gradient_accumulation_steps},
                  {"world_size", W},
                  {"parallel", comm ? cfg.parallel : std::string("none")},
                  {"schedule",
                   {{"next_step", step + 1},
                    {"last_lr", lr},
                    {"base_lr", cfg.learning_rate},
                    {"warmup_steps", cfg.warmup_steps},
                    {"total_steps", cfg.num_train_steps},
                    {"min_lr_ratio", cfg.min_lr_ratio}}},
                  {"loss_scaler", scaler_json(scaler)},
                  {"optimizer", optimizer_name},
                  {"optimizer_state_bytes", state_bytes},
                  {"dtype", cfg.dtype},
                  {"run_name", run_name},
                  {"dims", dims_json(dims)},
                  {"config", config_json(cfg)}};
    };

    double interval_loss = 0.0, last_finite_gn = 0.0, final_eval = 0.0;
    int64_t interval_steps = 0, last_eval_step = -1;
    auto interval_start = std::chrono::steady_clock::now();
    double excluded_s = 0.0;  // eval/checkpoint time, kept out of tokens_per_sec
    const int64_t GA = cfg.gradient_accumulation_steps;
    const double max_norm = cfg.max_grad_norm > 0 ? cfg.max_grad_norm : std::numeric_limits<double>::infinity();

    // Checkpoint saves: asynchronous on a single process (see AsyncCheckpointer), synchronous otherwise.
    const CheckpointTestHooks ck_hooks = CheckpointTestHooks::from_env();
    int64_t cur_step = start_step;
    double ckpt_blocked_s = 0.0;  // main-loop time spent on checkpoints (whole run)
    std::unique_ptr<AsyncCheckpointer> async_ckpt;
    bool async_note = false;  // the "saving synchronously" note was printed
    if (cfg.async_checkpoint && comm) {
      out << "checkpoints: synchronous (a multi-process save is a collective; --async_checkpoint applies to "
             "single-process runs)" << std::endl;
    } else if (!cfg.async_checkpoint) {
      out << "checkpoints: synchronous (--async_checkpoint=false)" << std::endl;
    } else {
      async_ckpt = std::make_unique<AsyncCheckpointer>(
          cfg.checkpoint_deadline_s,
          [&](int64_t ck_step, const std::string& path) {
            if (result) {
              result->last_checkpoint = path;
              result->checkpoint_events.emplace_back(ck_step, cur_step);
            }
            out << "checkpoint " << path << std::endl;
            events.emit({{"event", "checkpoint"}, {"step", ck_step}, {"path", path}});
          },
          [&](const SaveOutcome& o) {
            for (const auto& gone : o.removed) out << "removed old checkpoint " << gone << "\n";
            if (!o.warning.empty()) std::cerr << "ablate-train: warning: checkpoint " << o.step << ": " << o.warning << "\n";
            if (!o.error.empty())
              throw std::runtime_error("checkpoint at step " + std::to_string(o.step) + " failed: " + o.error);
            if (o.abandoned) {
              if (result) ++result->checkpoints_abandoned;
              const std::string msg = "checkpoint at step " + std::to_string(o.step) + " abandoned: " + o.reason +
                                      "; nothing was committed (temporary directory removed), the next checkpoint "
                                      "step tries again";
              out << msg << std::endl;
              events.emit({{"event", "checkpoint_abandoned"}, {"step", o.step}, {"reason", o.reason}});
            } else {
              if (result) ++result->checkpoints_async;
              out << "checkpoint " << o.step << " written in the background in " << std::fixed << std::setprecision(2)
                  << o.write_s << " s" << std::defaultfloat << std::endl;
            }
          });
      out << "checkpoints: asynchronous (snapshot " << std::fixed << std::setprecision(1)
          << double(snapshot_bytes(*model, *optimizer)) / (1 << 20) << std::defaultfloat << " MiB in host memory, written in the background; deadline "
          << (cfg.checkpoint_deadline_s > 0 ? std::to_string(int64_t(cfg.checkpoint_deadline_s)) + " s" : "none")
          << ")" << std::endl;
    }
    // Snapshot for the background writer, or nullptr (with the reason) when this save must be synchronous.
    auto take_snapshot = [&](int64_t step, double lr, std::string* why) -> std::unique_ptr<CheckpointSnapshot> {
      const int64_t need = snapshot_bytes(*model, *optimizer);
      const int64_t avail = mem_available_bytes();
      const int64_t budget = cfg.async_checkpoint_host_budget_gb > 0
                                 ? static_cast<int64_t>(cfg.async_checkpoint_host_budget_gb * double(1LL << 30))
                                 : avail / 2;
      if (need > budget) {
        *why = "the snapshot (" + std::to_string(need >> 20) + " MiB) exceeds the host-memory budget (" +
               std::to_string(std::max<int64_t>(budget, 0) >> 20) + " MiB: " +
               (cfg.async_checkpoint_host_budget_gb > 0 ? std::string("--async_checkpoint_host_budget_gb")
                                                        : std::string("half of MemAvailable")) + ")";
        return nullptr;
      }
      torch::NoGradGuard ng;
      for (const auto& p : model->named_parameters())
        if (!torch::isfinite(p.value()).all().item<bool>())
          throw Diverged("parameter " + p.key() + " is not finite at step " + std::to_string(step) +
                         "; no checkpoint written");
      if (auto bad = optimizer->first_nonfinite_state(); !bad.empty())
        throw Diverged("optimizer state '" + bad + "' is not finite at step " + std::to_string(step) +
                       "; no checkpoint written");
      auto snap = std::make_unique<CheckpointSnapshot>();
      std::set<const void*> seen;
      if (!snapshot_module(*model, snap->model, seen, snap->model_refs, snap->host_bytes)) {
        *why = "model tensors share storage";
        return nullptr;
      }
#if ABLATE_WITH_CUDA
      if (device.is_cuda()) c10::cuda::getCurrentCUDAStream(device.index()).synchronize();  // the pinned copies
#endif
      optimizer->save(snap->optimizer);  // host copies (core/optim/optimizer.cpp)
      snap->host_bytes += state_bytes;
      snap->rng = rng_archive();
      json st = state_json(step, lr);
      st["optimizer_shards"] = dc.optimizer_shards;
      snap->state = st.dump(2) + "\n";
      snap->step = step;
      snap->run_dir = run_dir;
      snap->pid = dc.pid0;
      snap->keep = cfg.keep_checkpoints;
      snap->delay_ms = ck_hooks.delay_for(step);
      snap->enospc = contains(ck_hooks.enospc_steps, step);
      return snap;
    };

    // Optional profile (core/profile.h); each rank writes its own directory.
    core::StepProfiler profiler(cfg.profile_start > 0 ? cfg.profile_start : start_step + 3, cfg.profile_steps,
                          run_dir / (rank0 ? std::string("profile") : "profile-rank" + std::to_string(layout.rank)),
                          device.is_cuda());
    for (int64_t step = start_step + 1; step <= cfg.num_train_steps; ++step) {
      cur_step = step;
      profiler.before_step(step);
      const double lr = lr_at_step(step, cfg.learning_rate, cfg.warmup_steps, cfg.num_train_steps, cfg.min_lr_ratio);
      optimizer->set_lr(lr);
      optimizer->zero_grad(/*set_to_none=*/true);
      // The losses are read after the backward passes: a .item() between forward and backward would make the
      // host wait for the forward and then feed the backward kernels to an idle GPU one launch at a time.
      std::vector<torch::Tensor> micro_losses;
      for (int64_t m = 0; m < GA; ++m) {
        auto loss = forward_loss(data->train_batch((step - 1) * GA + m));
        if (m == 0 && contains(hk.nan_loss_steps, step)) loss = loss * std::numeric_limits<double>::quiet_NaN();
        if (ddp && m == GA - 1) ddp->arm();  // this backward's gradients are final: reduce buckets as they fill
        (loss * (scaler.scale() / double(GA))).backward();
        micro_losses.push_back(loss.detach());
      }
      double step_loss = 0.0;
      for (const auto& loss : micro_losses) {
        const double lv = loss.item<double>();
        // A NaN/Inf loss is divergence (exit 3), whatever the precision, before any optimizer step. With several
        // ranks it is checked on the averaged loss below, so that every rank stops at the same step.
        if (!comm && !std::isfinite(lv))
          throw Diverged("loss is " + std::to_string(lv) + " at step " + std::to_string(step));
        step_loss += lv / double(GA);
      }
      if (comm) {
        step_loss = comm->all_reduce_scalar(step_loss, dist::ReduceOp::kAvg);  // the global batch's mean loss
        if (!std::isfinite(step_loss))
          throw Diverged("loss is " + std::to_string(step_loss) + " at step " + std::to_string(step));
        if (ddp) {
          ddp->finish();  // gradients averaged over the ranks
          if (step == start_step + 1)
            out << "ddp: " << ddp->launched_in_backward() << " of " << ddp->num_buckets()
                << " gradient buckets were all-reduced during backward"
                << (ddp->reduced_twice() ? " (then all again: a gradient was accumulated twice in one backward)" : "")
                << std::endl;
        }
        if (zero) zero->reduce_gradients();      // averaged gradients on their owners only
      }
      if (contains(hk.grad_overflow_steps, step)) {
        torch::NoGradGuard ng;
        for (auto& p : params)
          if (p.grad().defined()) {
            auto g = p.mutable_grad();
            g.as_strided({1}, {1}, g.storage_offset()).fill_(std::numeric_limits<double>::infinity());
            break;
          }
      }
      if (scaler.enabled()) {
        torch::NoGradGuard ng;
        const double inv = 1.0 / scaler.scale();  // a power of two: exact
        for (auto& p : params)
          if (p.grad().defined()) p.mutable_grad().mul_(inv);
      }
      // Global norm: ddp ranks hold identical averaged gradients; sharded ranks sum their squared norms.
      const double gn = zero ? zero->clip_grad_norm(max_norm) : torch::nn::utils::clip_grad_norm_(params, max_norm);
      const bool overflow = !std::isfinite(gn);
      if (overflow && !scaler.enabled())
        throw Diverged("gradient norm is " + std::to_string(gn) + " at step " + std::to_string(step) +
                       " (finite loss; --dtype " + cfg.dtype + " has no loss scaling to absorb it)");
      if (scaler.update(overflow)) {
        optimizer->step();
        if (zero) zero->gather_parameters();  // owners' new values to every rank
        last_finite_gn = gn;
      } else if (scaler.scale() < 1.0 / 16777216.0) {
        throw Diverged("fp16 loss scale fell below 2^-24 at step " + std::to_string(step) +
                       ": the gradients overflow at every scale");
      }
      {
        const auto t0 = std::chrono::steady_clock::now();  // the trace write stays out of tokens_per_sec
        profiler.after_step(step, out);
        excluded_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      if (async_ckpt && async_ckpt->busy()) {  // a background save: report it once durable, enforce its deadline
        const auto t0 = std::chrono::steady_clock::now();
        async_ckpt->poll();
        const double d = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        excluded_s += d;
        ckpt_blocked_s += d;
      }
      interval_loss += step_loss;
      ++interval_steps;
      if (result) {
        result->step_losses.push_back(step_loss);
        result->step_lrs.push_back(lr);
        result->grad_norms.push_back(gn);
        result->loss_scales.push_back(scaler.scale());
        result->skipped_steps = scaler.skipped_steps();
      }

      const bool last = step == cfg.num_train_steps;
      if (step % cfg.log_interval == 0 || last) {
        const double secs = std::max(1e-9, std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                                         interval_start).count() - excluded_s);
        const double tps = double(interval_steps * GA * W * cfg.batch_size * cfg.context_length) / secs;
        const double mean_loss = interval_loss / double(interval_steps);
        const int64_t mem = peak_memory_bytes(device);
        // tps counts every rank's tokens: the peak is W devices'.
        const double mfu = peak_tflops > 0 ? flops_per_token * tps / (W * peak_tflops * 1e12) : 0.0;
        out << "step " << step << "/" << cfg.num_train_steps << " | loss " << std::fixed << std::setprecision(4)
                  << mean_loss << " | lr " << std::scientific << std::setprecision(3) << lr << std::fixed
                  << " | tok/s " << std::setprecision(0) << tps << " | grad " << std::setprecision(3) << last_finite_gn
                  << " | mfu " << std::setprecision(4) << mfu << " | mem " << std::setprecision(1)
                  << double(mem) / (1 << 20) << " MiB | opt state " << double(state_bytes) / (1 << 20) << " MiB";
        if (scaler.enabled()) out << " | scale " << std::setprecision(0) << scaler.scale();
        out << " | skipped " << scaler.skipped_steps() << std::endl;
        json values = {{"train/loss", mean_loss},
                       {"train/lr", lr},
                       {"train/tokens_per_sec", tps},
                       {"train/grad_norm", last_finite_gn},
                       {"train/mfu", mfu},
                       {"train/peak_memory_bytes", mem},
                       {"train/optimizer_state_bytes", state_bytes},
                       {"train/skipped_steps", scaler.skipped_steps()}};
        if (scaler.enabled()) values["train/loss_scale"] = scaler.scale();
        events.emit({{"event", "metrics"}, {"step", step}, {"time_unix_ms", now_ms()}, {"values", values}});
        interval_loss = 0.0;
        interval_steps = 0;
        excluded_s = 0.0;
        interval_start = std::chrono::steady_clock::now();
      }

      if (step % cfg.eval_interval == 0 || last) {
        const auto t0 = std::chrono::steady_clock::now();
        final_eval = evaluate();
        last_eval_step = step;
        out << "eval step " << step << " | loss " << std::setprecision(4) << final_eval << " | ppl "
                  << std::setprecision(2) << std::exp(final_eval) << std::endl;
        events.emit({{"event", "metrics"},
                     {"step", step},
                     {"time_unix_ms", now_ms()},
                     {"values", {{"eval/loss", final_eval}, {"eval/perplexity", std::exp(final_eval)}}}});
        excluded_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      if (step % cfg.save_interval == 0 || last) {
        const auto t0 = std::chrono::steady_clock::now();
        std::unique_ptr<CheckpointSnapshot> snap;
        if (async_ckpt) {
          if (async_ckpt->busy()) {  // at most one save in flight: wait for the previous one (or its deadline)
            const int64_t prev = async_ckpt->in_flight_step();
            const double w = async_ckpt->wait();
            if (result) {
              ++result->checkpoint_waits;
              result->checkpoint_wait_s += w;
            }
            out << "checkpoint " << step << ": waited " << std::fixed << std::setprecision(2) << w
                << " s for the save of step " << prev << " still in flight" << std::defaultfloat << std::endl;
          }
          std::string why;
          const auto s0 = std::chrono::steady_clock::now();
          snap = take_snapshot(step, lr, &why);
          if (snap) {
            const double snap_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count();
            if (result) result->checkpoint_snapshot_s += snap_s;
            out << "checkpoint " << step << ": snapshot of " << std::fixed << std::setprecision(1)
                << double(snap->host_bytes) / (1 << 20) << " MiB in " << std::setprecision(3) << snap_s << " s; writing in the background" << std::defaultfloat << std::endl;
            async_ckpt->start(std::move(snap));
          } else if (!async_note) {
            out << "checkpoint " << step << ": saving synchronously: " << why
                << " (said once; later saves check again)" << std::endl;
            async_note = true;
          }
        }
        if (!async_ckpt || !async_ckpt->busy()) {
          const auto path = save_checkpoint(run_dir, step, model, *optimizer, state_json(step, lr), dc);
          if (rank0) {
            for (const auto& gone : prune_checkpoints(run_dir.string(), cfg.keep_checkpoints, path))
              out << "removed old checkpoint " << gone << "\n";
            if (result) {
              result->last_checkpoint = path;
              result->checkpoint_events.emplace_back(step, step);
            }
            out << "checkpoint " << path << " (written in " << std::fixed << std::setprecision(2)
                << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s)"
                << std::defaultfloat << std::endl;
            events.emit({{"event", "checkpoint"}, {"step", step}, {"path", path}});
          }
        }
        const double d = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        excluded_s += d;
        ckpt_blocked_s += d;
        if (result) result->checkpoint_blocked_s = ckpt_blocked_s;
      }
      if (hk.stop_after_step > 0 && step == hk.stop_after_step) {  // simulated interruption
        if (async_ckpt) async_ckpt->wait();
        return kExitOk;
      }
    }
    if (last_eval_step < 0) final_eval = evaluate();  // resumed at the end: still report an eval
    if (async_ckpt) {  // the last save is durable and reported before "finished"
      const double w = async_ckpt->wait();
      ckpt_blocked_s += w;
      if (result) {
        result->checkpoint_final_wait_s = w;
        result->checkpoint_blocked_s = ckpt_blocked_s;
      }
    }
    if (result) result->final_eval_loss = final_eval;
    out << "checkpoints: the training loop was blocked " << std::fixed << std::setprecision(3) << ckpt_blocked_s
        << " s in all by checkpoint saves" << (async_ckpt ? " (snapshots and waits; the writes ran in the background)" : "")
        << std::defaultfloat << std::endl;
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
