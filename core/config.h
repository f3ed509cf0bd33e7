// Run configuration, model sizing and the LR schedule. No LibTorch here: cheap to include and to test.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace ablate {

// Invalid user input: the message is shown as-is and the process exits with code 2.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Work the engine recognises but cannot run yet (Mamba2 blocks, NSA, SOAP, ...): also exit code 2.
struct NotImplementedError : ConfigError {
  using ConfigError::ConfigError;
};

// Everything that fixes the shape of a model: the family, its block pattern and every mixer's hyper-parameters.
// Layer i is a block of type layer_type(i) = pattern[i % pattern.size()]: 'A' attention (dense SDPA, or NSA when
// attn_type == "nsa"), 'M' Mamba2, 'D' Gated DeltaNet. Every block is pre-norm RMSNorm -> mixer -> residual ->
// RMSNorm -> SwiGLU(intermediate) -> residual.
struct ModelDims {
  std::string name;       // preset name or the size string it came from
  int64_t d = 0;          // hidden size
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate = 0;
  int64_t vocab_size = 0;      // tokenizer vocabulary (targets are < this)
  int64_t padded_vocab = 0;    // embedding / head rows, a multiple of 64
  // Family: "transformer" (pattern "A"), "mamba2" ("M"), "deltanet" ("D") or "hybrid" (a --block_pattern).
  std::string family = "transformer";
  std::string pattern = "A";
  std::string attn_type = "dense";  // canonical: dense | nsa (fsa is an alias of nsa)
  bool hybrid_init = false;         // seed 6.4 scaled init (hybrids) instead of plain N(0, 0.02) (seed 2.7)
  // Mamba2 mixer (seed 4.2).
  int64_t mamba_d_state = 128, mamba_d_conv = 4, mamba_expand = 2, mamba_headdim = 64;
  // Gated DeltaNet mixer (seed 5): heads = d / gdn_head_dim.
  int64_t gdn_head_dim = 64, gdn_expand_v = 2, gdn_conv_size = 4;
  // NSA (paper defaults): selection block l', selected blocks n, window w, compression block l and stride d.
  int64_t nsa_block_size = 64, nsa_num_selected_blocks = 16, nsa_window_size = 512, nsa_cmp_block_size = 32,
          nsa_cmp_stride = 16;
  // Not shape: which implementation runs. fused_kernels: the hand-written RMSNorm(+residual), RoPE and SwiGLU
  // (core/ops) instead of LibTorch composites (--kernel_type liger|triton vs baseline); fused_loss: the fused
  // linear + cross-entropy kernel instead of the chunked composite (--ce_kernel_type liger vs baseline).
  bool fused_kernels = true, fused_loss = true;

  char layer_type(int64_t i) const { return pattern[static_cast<size_t>(i) % pattern.size()]; }
  int64_t repeats() const { return n_layers / static_cast<int64_t>(pattern.size()); }
  std::string to_string() const;
};

constexpr int64_t ceil_to(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// "0.6B" -> 600000000, "100M" -> 100000000, "1.5b", "2500K", "12345". Throws ConfigError.
int64_t parse_size_string(const std::string& s);

// Exact parameter counts of what core/model.cpp builds (tests compare them with built modules).
int64_t attention_params(const ModelDims& m);  // q/k/v/o, plus NSA's compression MLPs, position embeddings, gates
int64_t mamba2_mixer_params(const ModelDims& m);    // = Mamba2MixerImpl::expected_num_parameters
int64_t deltanet_mixer_params(const ModelDims& m);  // = GatedDeltaNetMixerImpl::expected_num_parameters
int64_t mixer_params(const ModelDims& m, char type);
int64_t block_params(const ModelDims& m, char type);  // mixer + SwiGLU 3*d*I + two norms 2*d
// Whole model: embedding + untied head (padded_vocab x d each) + blocks + final norm.
int64_t count_params(const ModelDims& m);

// Dense Transformer dims for a preset (tiny|mini|small), a seed table name (SMALL|MEDIUM|LARGE|XLARGE, seed 1.4)
// or a size string resolved by the dimension search. Kept for callers that only want a Transformer.
ModelDims resolve_model_size(const std::string& size, int64_t vocab_size);

struct TrainConfig;
// The model a run builds: family from --block_pattern / --mamba_type, mixer settings from the flags, d and L from
// --model_size (search per family, see config.cpp). Throws ConfigError.
ModelDims resolve_model(const TrainConfig& cfg, int64_t vocab_size);

// Human-readable --print_config text: family, pattern, dims, per-block and total parameter counts.
std::string describe_model(const ModelDims& m);

// Vocabulary used by --print_config without --data_dir: the seed's Qwen tokenizer.
constexpr int64_t kSeedVocab = 151936;

// Dataset directory when --data_dir is not given (the seed streamed fineweb-edu; there is no network here).
constexpr const char* kDefaultDataDir = "data/fortunes";
// --data_dir or the default, checked: throws ConfigError explaining how to prepare it when meta.json is missing.
std::string resolve_data_dir(const TrainConfig& cfg);

// LR for 1-based optimizer step s: linear warmup lr*s/W (first step is lr/W, not 0), then cosine from lr
// down to min_lr_ratio*lr at s == total_steps.
double lr_at_step(int64_t step, double base_lr, int64_t warmup, int64_t total_steps, double min_lr_ratio);

// Canonical optimizer name (aliases adamw_8bit, adamw_4bit, soap_8bit, soap_4bit; case-insensitive). Throws
// ConfigError listing the valid names.
std::string canonical_optimizer_name(const std::string& name);

struct TrainConfig {
  // model
  std::string model_size = "tiny";
  std::string block_pattern;
  int64_t block_repeats = -1;
  std::string attn_type = "dense";
  std::string mamba_type = "none";  // none | mamba2 | deltanet (used when block_pattern is empty)
  std::string optimizer_type = "adamw";
  double rope_theta = 500000.0;
  int64_t context_length = 256;
  // Mixer settings (seed 9.1 flags; NSA defaults are the paper's).
  int64_t mamba_d_state = 128, mamba_d_conv = 4, mamba_expand = 2, mamba_headdim = 64;
  int64_t nsa_block_size = 64, nsa_num_selected_blocks = 16, nsa_window_size = 512, nsa_cmp_block_size = 32,
          nsa_cmp_stride = 16;
  // Accepted for seed compatibility, no effect (validated so typos are caught).
  std::string kernel_type = "liger";
  std::string ce_kernel_type;
  // optimisation
  int64_t batch_size = 8;
  int64_t gradient_accumulation_steps = 1;
  int64_t num_train_steps = 200;
  int64_t warmup_steps = 20;
  double learning_rate = 3e-3;
  double min_lr_ratio = 0.1;
  double weight_decay = 0.1;
  double max_grad_norm = 1.0;
  std::string dtype = "float32";
  bool gradient_checkpointing = false;
  // Optimizer (core/optim), precision, checkpoint and metrics settings of the training loop (core/train.cpp).
  double beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8;
  int64_t precondition_frequency = 10;  // SOAP/Shampoo refresh interval (the seed CLI defaulted to 5)
  double shampoo_beta = 0.95;           // EMA of the Kronecker factors (SOAP/Shampoo)
  int64_t max_precond_dim = 8192;       // longer sides are not preconditioned
  int64_t keep_checkpoints = 3;         // newest complete checkpoints kept; 0 keeps all
  bool async_checkpoint = true;         // single-process runs write checkpoints in a background thread
  double checkpoint_deadline_s = 1800;  // a background save still unfinished after this is abandoned; 0 = none
  double async_checkpoint_host_budget_gb = 0;  // host memory a snapshot may take; 0 = half of MemAvailable
  double peak_tflops = -1;              // device peak for MFU; < 0: auto (989 for H100/H200 on CUDA, else 0)
  int64_t profile_steps = 0;            // > 0: profile that many steps (core/profile.h), trace under <run>/profile
  int64_t profile_start = 0;            // first profiled step; 0: the third step of this process (after warm-up)
  // I/O
  std::string data_dir;
  std::string output_dir = "./outputs";
  std::string run_name;
  std::string resume_from;
  int64_t log_interval = 10;
  int64_t eval_interval = 100;
  int64_t eval_batches = 8;
  int64_t save_interval = 1000;
  uint64_t seed = 42;
  std::string device = "auto";
  int events_fd = -1;
  std::string lease_file;  // set by ablate-worker: stop when the worker's lease deadline in it passes (lease_watch.h)
  bool print_config = false;
  int64_t num_threads = 0;  // 0: auto (1 for models under 5M params, else all hardware threads)
  // Multi-process training (core/dist, docs/distributed.md). The rank layout comes from the environment (RANK,
  // WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); --nproc N > 1 without WORLD_SIZE starts N local ranks.
  int64_t nproc = 1;
  std::string parallel = "ddp";       // ddp (replicated optimizer) | zero (sharded optimizer state, ZeRO-2)
  std::string dist_backend = "auto";  // auto (nccl on CUDA, else cpu) | cpu | nccl
  double dist_timeout = 600;          // seconds a collective may make no progress before the run fails as a hang
  double ddp_bucket_mb = 25;          // gradient bucket size of ddp

  // Checks ranges and names; throws ConfigError / NotImplementedError.
  void validate() const;
  // The model part of validate(): pattern letters, attention/mamba types, mixer settings, model size.
  void validate_model() const;
  // Seed's naming: {model_size}_{arch}_{optimizer}_ctx{context_length}.
  std::string default_run_name() const;
};

}  // namespace ablate
