// Command-line parsing for ablate-train (CLI11). Accepts `--flag value` and `--flag=value`, plus the seed's
// single-dash aliases -lr, -wd, -clip, -attn.
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>

#include "core/cli.h"
#include "core/dist/launcher.h"
#include "core/prepare_data.h"
#include "core/train.h"

namespace ablate {
namespace {

// CLI11 only allows one-letter short names, so the seed's multi-letter single-dash aliases are rewritten.
std::vector<std::string> normalise_args(const std::vector<std::string>& in) {
  static const std::vector<std::pair<std::string, std::string>> aliases = {
      {"-lr", "--learning_rate"}, {"-wd", "--weight_decay"}, {"-clip", "--max_grad_norm"}, {"-attn", "--attn_type"}};
  std::vector<std::string> out;
  for (std::string a : in) {
    for (const auto& [from, to] : aliases) {
      if (a == from) a = to;
      else if (a.rfind(from + "=", 0) == 0) a = to + a.substr(from.size());
    }
    out.push_back(a);
  }
  return out;
}

}  // namespace

int parse_train_args(const std::vector<std::string>& args, TrainConfig& c, std::ostream& out, std::ostream& err) {
  CLI::App app{
      "ablate-train: train one ablation cell (Transformer, NSA, Mamba2, Gated DeltaNet or a hybrid; byte-level "
      "data).\nAlso: ablate-train prepare-data --input PATH... --output DIR\n\n"
      "Model type: a --block_pattern gives the hybrid (letters M = Mamba2, D = Gated DeltaNet, A = attention, "
      "case-insensitive, repeated to depth); otherwise --mamba_type mamba2 gives pure Mamba2, --mamba_type deltanet "
      "pure Gated DeltaNet, and --mamba_type none (the default) the Transformer. The seed defaulted to mamba2, so "
      "its 'dense' runs silently trained Mamba2 (seed bug 14.2.1); here a Transformer needs no extra flag.\n"
      "--attn_type applies to the Transformer and to the A blocks of hybrids (the seed ignored it for hybrids).\n"
      "Sizes: d over powers of two 256..16384 and L from the seed's size bands (4-30 below 0.5B, 8-46 up to 5B, "
      "24-128 above; hybrids: whole pattern repeats), chosen so the exact parameter count of the built model is "
      "closest to --model_size; H = d/64, KV = min(8, H), MLP width ceil64(8d/3) for every family (the seed's "
      "Transformer built 2d, so it came out 5-15% smaller than its name); --print_config shows the result.\n"
      "Vocabulary: the dataset's meta.json; --print_config without --data_dir uses the seed's 151936 (Qwen); the "
      "byte-level datasets made by prepare-data have 257 tokens, padded to 320 rows."};
  app.option_defaults()->always_capture_default();
  // Model
  app.add_option("--model_size", c.model_size,
                 "tiny|mini|small (test presets), the seed table SMALL|MEDIUM|LARGE|XLARGE (seed 1.4: 0.6B/4B/8B/32B "
                 "shapes), or a size like 100M, 0.6B, 1B, 2.5B, 4B, 8B");
  app.add_option("--block_pattern", c.block_pattern,
                 "hybrid stack: letters M (Mamba2), D (Gated DeltaNet), A (attention), e.g. MDMA; repeated to depth");
  app.add_option("--block_repeats", c.block_repeats, "pattern repeats; -1 = automatic (from the size search)");
  app.add_option("--mamba_type", c.mamba_type,
                 "none (Transformer; default) | mamba2 | deltanet: the pure model when no --block_pattern is given");
  app.add_option("--attn_type,--attention_type", c.attn_type,
                 "dense (causal SDPA) | nsa = native_sparse_attention (Native Sparse Attention: compressed, selected "
                 "and sliding-window branches) | fsa = flash_sparse_attention (FSA is NSA with a different kernel "
                 "loop order; built as nsa for now, same function)");
  app.add_option("--nsa_block_size", c.nsa_block_size, "NSA selection block l' (paper 64)");
  app.add_option("--nsa_num_selected_blocks", c.nsa_num_selected_blocks,
                 "NSA selected blocks per query n, incl. the initial and 2 local blocks (paper 16; the seed CLI had 32)");
  app.add_option("--nsa_window_size", c.nsa_window_size, "NSA sliding window w (paper 512; the seed had 64)");
  app.add_option("--nsa_cmp_block_size", c.nsa_cmp_block_size, "NSA compression block l (paper 32)");
  app.add_option("--nsa_cmp_stride", c.nsa_cmp_stride, "NSA compression stride d (paper 16)");
  app.add_option("--mamba_d_state", c.mamba_d_state, "Mamba2 state size N");
  app.add_option("--mamba_d_conv", c.mamba_d_conv, "Mamba2 causal conv width");
  app.add_option("--mamba_expand", c.mamba_expand, "Mamba2 inner width = expand x d");
  app.add_option("--mamba_headdim", c.mamba_headdim, "Mamba2 head dim (must divide expand x d)");
  app.add_option("--optimizer_type", c.optimizer_type,
                 "adamw|adamw8bit|adamw4bit|soap|soap8bit|soap4bit|shampoo (aliases adamw_8bit, adamw_4bit, soap_8bit, "
                 "soap_4bit)");
  app.add_option("--rope_theta", c.rope_theta, "RoPE base");
  app.add_option("--context_length", c.context_length, "tokens per training sequence");
  // Optimisation
  app.add_option("--batch_size", c.batch_size, "sequences per micro-batch");
  app.add_option("--gradient_accumulation_steps", c.gradient_accumulation_steps, "micro-batches per optimizer step");
  app.add_option("--num_train_steps", c.num_train_steps, "optimizer steps");
  app.add_option("--warmup_steps", c.warmup_steps, "linear warmup steps");
  app.add_option("--learning_rate", c.learning_rate, "peak learning rate (alias -lr)");
  app.add_option("--min_lr_ratio", c.min_lr_ratio, "final LR as a fraction of the peak (cosine)");
  app.add_option("--weight_decay", c.weight_decay, "AdamW weight decay (alias -wd)");
  app.add_option("--max_grad_norm", c.max_grad_norm, "global grad-norm clip, <= 0 disables (alias -clip)");
  app.add_option("--dtype", c.dtype,
                 "float32 | bfloat16 (fp32 master weights and optimizer, bf16 autocast compute) | float16 (fp16 "
                 "autocast + dynamic loss scaling, overflowing steps skipped). CPU uses LibTorch's CPU autocast: "
                 "matmuls/attention in the low dtype, norms, softmax and the loss in fp32");
  app.add_option("--beta1", c.beta1, "Adam/SOAP first-moment decay");
  app.add_option("--beta2", c.beta2, "Adam/SOAP second-moment decay");
  app.add_option("--adam_eps", c.adam_eps, "Adam/SOAP epsilon");
  app.add_option("--precondition_frequency", c.precondition_frequency,
                 "SOAP eigenbasis / Shampoo root refresh interval in steps (the seed CLI defaulted to 5)");
  app.add_option("--shampoo_beta", c.shampoo_beta, "EMA factor of the SOAP/Shampoo Kronecker factors");
  app.add_option("--max_precond_dim", c.max_precond_dim, "SOAP/Shampoo: longer sides are not preconditioned");
  app.add_flag("--gradient_checkpointing", c.gradient_checkpointing,
               "recompute each block's activations in backward instead of keeping them (less memory, ~1/3 more "
               "compute)");
  // I/O
  app.add_option("--data_dir", c.data_dir,
                 "prepared dataset (train.bin, val.bin, meta.json; make one with ablate-train prepare-data); "
                 "default data/fortunes");
  app.add_option("--output_dir", c.output_dir, "runs go to <output_dir>/<run_name>");
  app.add_option("--run_name", c.run_name, "default: {model_size}_{arch}_{optimizer}_ctx{context_length}");
  app.add_option("--resume_from", c.resume_from, "checkpoint directory to continue from");
  app.add_option("--log_interval", c.log_interval, "optimizer steps between train metrics");
  app.add_option("--eval_interval", c.eval_interval, "optimizer steps between evaluations (and at the end)");
  app.add_option("--eval_batches", c.eval_batches, "batches in the fixed eval set");
  app.add_option("--save_interval", c.save_interval, "optimizer steps between checkpoints (and at the end)");
  app.add_option("--keep_checkpoints", c.keep_checkpoints, "newest checkpoints kept (0 = all)");
  app.add_option("--async_checkpoint", c.async_checkpoint,
                 "true (default): a single-process run copies its state to host memory at a checkpoint step and "
                 "writes the checkpoint in a background thread while training goes on (the \"checkpoint\" event "
                 "once it is durable; one save in flight, the next checkpoint step waits for it); false: the "
                 "training loop writes it. Multi-process runs always save synchronously; a snapshot larger than "
                 "the host-memory budget is saved synchronously too");
  app.add_option("--checkpoint_deadline_s", c.checkpoint_deadline_s,
                 "a background save not committed after this many seconds is abandoned (temporary directory "
                 "removed, \"checkpoint_abandoned\" event, nothing committed); the next checkpoint step tries "
                 "again. 0 = no deadline");
  app.add_option("--async_checkpoint_host_budget_gb", c.async_checkpoint_host_budget_gb,
                 "host memory (GiB) a background save's snapshot may take; 0 = half of MemAvailable at the save");
  app.add_option("--peak_tflops", c.peak_tflops,
                 "device peak TFLOP/s for train/mfu; < 0 = auto: 989 (bf16 dense) on an H100/H200, else 0 and MFU "
                 "is reported as 0");
  app.add_option("--profile_steps", c.profile_steps,
                 "profile this many optimizer steps (Kineto/CUPTI): a table of CUDA kernels (CPU ops on CPU) by "
                 "time in the log, <run>/profile/trace.json for chrome://tracing; 0 = off");
  app.add_option("--profile_start", c.profile_start,
                 "first profiled step; 0 = the third step this process runs (after warm-up)");
  app.add_option("--seed", c.seed, "seed for init and data order");
  app.add_option("--device", c.device, "auto|cpu|cuda");
  app.add_option("--events_fd", c.events_fd, "file descriptor for JSON-lines events");
  app.add_option("--lease_file", c.lease_file,
                 "set by ablate-worker: a file holding the worker's lease deadline (monotonic clock); the run stops "
                 "at once, without saving, exit code 75, when the deadline passes unrenewed (a frozen worker)");
  app.add_option("--num_threads", c.num_threads, "CPU threads (0 = auto: 1 for models under 5M params, else all)");
  // Multi-process training (docs/distributed.md).
  app.add_option("--nproc", c.nproc,
                 "processes (ranks) to start on this machine: each trains on batch_size sequences of a global batch of "
                 "nproc x batch_size (the same sequences one process with that batch size would take); ranks get "
                 "RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT like torchrun, only rank 0 logs, writes events "
                 "and checkpoints, and the run fails if any rank fails. Started by a launcher that already set "
                 "WORLD_SIZE, ablate-train runs as that rank instead. With ABLATE_NNODES=M and ABLATE_NODE_RANK=k "
                 "(and MASTER_ADDR/MASTER_PORT of node 0) this machine is node k of M: ranks k x nproc + local of "
                 "M x nproc")
      ->group("Distributed");
  app.add_option("--parallel", c.parallel,
                 "ddp: every rank keeps the whole optimizer, gradients are averaged by bucketed all-reduce overlapped "
                 "with backward | zero: each parameter (and its optimizer state, quantized or not) belongs to one "
                 "rank: gradients are reduce-scattered to their owners, owners step, parameters are all-gathered "
                 "(ZeRO-2; optimizer memory per rank ~1/N)")
      ->group("Distributed");
  app.add_option("--dist_backend", c.dist_backend, "auto (nccl on CUDA, cpu otherwise) | cpu (TCP ring) | nccl")
      ->group("Distributed");
  app.add_option("--dist_timeout", c.dist_timeout,
                 "seconds a collective may make no progress before the communicator is aborted and the run exits "
                 "with code 5 (failure class hang)")
      ->group("Distributed");
  app.add_option("--ddp_bucket_mb", c.ddp_bucket_mb, "gradient bucket size of --parallel ddp, MiB")
      ->group("Distributed");
  app.add_flag("--print_config", c.print_config,
               "print the family, pattern, dims and exact per-mixer and total parameter counts, then exit");
  app.add_option("--kernel_type", c.kernel_type,
                 "liger|triton (default liger): the fused RMSNorm(+residual), RoPE, SwiGLU kernels (core/ops); "
                 "baseline: LibTorch composites (the seed's names; triton is an alias of liger here)");
  app.add_option("--ce_kernel_type", c.ce_kernel_type,
                 "liger: the fused linear + cross-entropy kernel; baseline: the chunked LibTorch composite "
                 "(default: follows --kernel_type)");
  std::string dataset_name, dataset_subset;
  app.add_option("--dataset_name", dataset_name, "accepted and ignored: no network; data comes from --data_dir")
      ->group("Compatibility");
  app.add_option("--dataset_subset", dataset_subset, "accepted and ignored: no network; data comes from --data_dir")
      ->group("Compatibility");

  try {
    const auto norm = normalise_args(args);
    app.parse(std::vector<std::string>(norm.rbegin(), norm.rend()));  // CLI11 wants the reversed order
  } catch (const CLI::CallForHelp&) {
    out << app.help();
    return kExitOk;
  } catch (const CLI::ParseError& e) {
    err << "ablate-train: " << e.what() << "\n(run ablate-train --help for the flags)\n";
    return kExitInvalidConfig;
  }
  try {
    c.optimizer_type = canonical_optimizer_name(c.optimizer_type);  // adamw_8bit -> adamw8bit, ...
    c.validate_model();
  } catch (const ConfigError& e) {
    err << "ablate-train: " << e.what() << "\n";
    return kExitInvalidConfig;
  }
  if (!dataset_name.empty() || !dataset_subset.empty())
    err << "ablate-train: note: --dataset_name/--dataset_subset are ignored (no network); reading "
        << (c.data_dir.empty() ? std::string(kDefaultDataDir) : c.data_dir) << "\n";
  return -1;
}

int train_cli(int argc, char** argv) {
  TrainConfig c;
  const std::vector<std::string> args(argv + 1, argv + argc);
  const int rc = parse_train_args(args, c, std::cout, std::cerr);
  if (rc >= 0) return rc;
  const char* ws = std::getenv("WORLD_SIZE");
  if (c.nproc > 1 && !(ws && *ws)) {
    try {
      c.validate();
    } catch (const ConfigError& e) {
      std::cerr << "ablate-train: " << e.what() << "\n";
      return kExitInvalidConfig;
    }
    try {
      return dist::launch_local(static_cast<int>(c.nproc), dist::strip_flag(args, "--nproc"));
    } catch (const std::exception& e) {  // a malformed node layout (ABLATE_NNODES, ...) or no port: nothing started
      std::cerr << "ablate-train: " << e.what() << "\n";
      return kExitInvalidConfig;
    }
  }
  return run_training(c);
}

int prepare_data_cli(int argc, char** argv) {
  CLI::App app{"ablate-train prepare-data: byte-level tokenization of text files into train/val token files"};
  std::vector<std::string> inputs;
  std::string output;
  double val_fraction = 0.05;
  app.add_option("--input", inputs, "text files or directories (recursed; .dat/.u8/binary skipped)")->required();
  app.add_option("--output", output, "output directory")->required();
  app.add_option("--val_fraction", val_fraction, "fraction of documents for val.bin")->capture_default_str();
  try {
    const auto args = normalise_args(std::vector<std::string>(argv + 1, argv + argc));
    app.parse(std::vector<std::string>(args.rbegin(), args.rend()));
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return kExitOk;
  } catch (const CLI::ParseError& e) {
    std::cerr << "ablate-train prepare-data: " << e.what() << "\n";
    return kExitInvalidConfig;
  }
  try {
    const auto s = prepare_data(inputs, output, val_fraction);
    std::cout << "prepare-data: " << s.files << " files, " << s.documents << " documents -> train " << s.train_docs
              << " docs / " << s.train_tokens << " tokens, val " << s.val_docs << " docs / " << s.val_tokens
              << " tokens (skipped " << s.skipped.size() << " index/binary files); wrote " << output
              << "/{train.bin,val.bin,meta.json}\n";
    return kExitOk;
  } catch (const ConfigError& e) {
    std::cerr << "ablate-train prepare-data: " << e.what() << "\n";
    return kExitInvalidConfig;
  } catch (const std::exception& e) {
    std::cerr << "ablate-train prepare-data: " << e.what() << "\n";
    return kExitCrash;
  }
}

}  // namespace ablate
