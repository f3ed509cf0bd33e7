// Command-line parsing for ablate-train (CLI11). Accepts `--flag value` and `--flag=value`, plus the seed's
// single-dash aliases -lr, -wd, -clip, -attn.
#include <CLI/CLI.hpp>
#include <iostream>

#include "core/prepare_data.h"
#include "core/train.h"

namespace ablate {
namespace {

// CLI11 only allows one-letter short names, so the seed's multi-letter single-dash aliases are rewritten.
std::vector<std::string> normalise_args(int argc, char** argv) {
  static const std::vector<std::pair<std::string, std::string>> aliases = {
      {"-lr", "--learning_rate"}, {"-wd", "--weight_decay"}, {"-clip", "--max_grad_norm"}, {"-attn", "--attn_type"}};
  std::vector<std::string> out;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    for (const auto& [from, to] : aliases) {
      if (a == from) a = to;
      else if (a.rfind(from + "=", 0) == 0) a = to + a.substr(from.size());
    }
    out.push_back(a);
  }
  std::reverse(out.begin(), out.end());  // CLI11's parse(vector) expects reversed order
  return out;
}

}  // namespace

int train_cli(int argc, char** argv) {
  TrainConfig c;
  CLI::App app{"ablate-train: train one ablation cell (dense Transformer, byte-level data).\n"
               "Also: ablate-train prepare-data --input PATH... --output DIR"};
  app.option_defaults()->always_capture_default();
  // Model
  app.add_option("--model_size", c.model_size, "tiny|mini|small or a size like 100M, 0.6B, 1B, 8B");
  app.add_option("--block_pattern", c.block_pattern, "string over A (attention), M (Mamba2), D (DeltaNet); only A runs");
  app.add_option("--block_repeats", c.block_repeats, "pattern repeats; -1 = automatic (layers from the size)");
  app.add_option("--attn_type,--attention_type", c.attn_type, "dense (nsa/fsa: not implemented yet)");
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
  app.add_flag("--gradient_checkpointing", c.gradient_checkpointing, "accepted; currently a no-op");
  // I/O
  app.add_option("--data_dir", c.data_dir, "prepared dataset (train.bin, val.bin, meta.json)");
  app.add_option("--output_dir", c.output_dir, "runs go to <output_dir>/<run_name>");
  app.add_option("--run_name", c.run_name, "default: {model_size}_{arch}_{optimizer}_ctx{context_length}");
  app.add_option("--resume_from", c.resume_from, "checkpoint directory to continue from");
  app.add_option("--log_interval", c.log_interval, "optimizer steps between train metrics");
  app.add_option("--eval_interval", c.eval_interval, "optimizer steps between evaluations (and at the end)");
  app.add_option("--eval_batches", c.eval_batches, "batches in the fixed eval set");
  app.add_option("--save_interval", c.save_interval, "optimizer steps between checkpoints (and at the end)");
  app.add_option("--keep_checkpoints", c.keep_checkpoints, "newest checkpoints kept (0 = all)");
  app.add_option("--peak_tflops", c.peak_tflops,
                 "device peak TFLOP/s for train/mfu; < 0 = auto: 989 (bf16 dense) on an H100/H200, else 0 and MFU "
                 "is reported as 0");
  app.add_option("--seed", c.seed, "seed for init and data order");
  app.add_option("--device", c.device, "auto|cpu|cuda");
  app.add_option("--events_fd", c.events_fd, "file descriptor for JSON-lines events");
  app.add_option("--num_threads", c.num_threads, "CPU threads (0 = auto: 1 for models under 5M params, else all)");
  app.add_flag("--print_config", c.print_config, "print dims and the exact parameter count, then exit");
  // Seed flags accepted for compatibility; they only matter for blocks/attention/optimizers not built yet.
  std::string s_ignored;
  int64_t i_ignored = 0;
  for (const char* n : {"--mamba_type", "--kernel_type", "--ce_kernel_type", "--dataset_name", "--dataset_subset"})
    app.add_option(n, s_ignored, "accepted for seed compatibility; no effect")->group("Compatibility");
  for (const char* n : {"--mamba_d_state", "--mamba_d_conv", "--mamba_expand", "--mamba_headdim", "--nsa_block_size",
                        "--nsa_window_size", "--nsa_num_selected_blocks"})
    app.add_option(n, i_ignored, "accepted for seed compatibility; no effect")->group("Compatibility");

  try {
    app.parse(normalise_args(argc, argv));
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return kExitOk;
  } catch (const CLI::ParseError& e) {
    std::cerr << "ablate-train: " << e.what() << "\n(run ablate-train --help for the flags)\n";
    return kExitInvalidConfig;
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
    app.parse(normalise_args(argc, argv));
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
