// The training engine behind ablate-train. No LibTorch in this header.
#pragma once
#include <string>
#include <vector>

#include "core/config.h"

namespace ablate {

// What a run produced; filled for callers that want it (tests), ignored by the CLI.
struct TrainResult {
  std::vector<double> step_losses;  // mean micro-batch loss of every optimizer step run (in order)
  int64_t first_step = 1;           // step number of step_losses[0]
  double final_eval_loss = 0.0;
  std::string last_checkpoint;
  int64_t params = 0;
};

// Exit codes (docs/contracts.md §2/§3).
enum ExitCode { kExitOk = 0, kExitCrash = 1, kExitInvalidConfig = 2, kExitDiverged = 3, kExitOom = 4 };

// Runs (or, with print_config, describes) a training run; emits events; returns the exit code.
int run_training(const TrainConfig& cfg, TrainResult* result = nullptr);

// Checks <dir>/manifest.json against the files (size + sha256). Throws ConfigError naming the bad file.
void verify_checkpoint(const std::string& dir);

// Command-line entry points (core/cli.cpp). argv excludes nothing: argv[0] is the program.
int train_cli(int argc, char** argv);
int prepare_data_cli(int argc, char** argv);

}  // namespace ablate
