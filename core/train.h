// The training engine behind ablate-train. No LibTorch in this header.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"

namespace ablate {

// What a run produced; filled for callers that want it (tests), ignored by the CLI. Vectors hold one entry per
// optimizer step run, in order (skipped fp16 steps included).
struct TrainResult {
  std::vector<double> step_losses;   // mean micro-batch loss
  std::vector<double> step_lrs;      // learning rate used
  std::vector<double> grad_norms;    // global grad norm before clipping (unscaled; inf/nan on an overflow)
  std::vector<double> loss_scales;   // fp16 loss scale after the step (1 without scaling)
  int64_t first_step = 1;            // step number of step_losses[0]
  int64_t skipped_steps = 0;         // fp16 steps skipped for overflowing gradients (whole run, resumes included)
  int64_t optimizer_state_bytes = 0;
  double flops_per_token = 0.0;      // model FLOPs per trained token (core/flops.h)
  double final_eval_loss = 0.0;
  std::string last_checkpoint;
  int64_t params = 0;
  // Checkpoint saves (core/train.cpp: asynchronous on a single process unless --async_checkpoint=false).
  std::vector<std::pair<int64_t, int64_t>> checkpoint_events;  // (checkpoint step, loop step its event went out at)
  int64_t checkpoints_async = 0;       // saves written and published by the background writer
  int64_t checkpoints_abandoned = 0;   // background saves abandoned at --checkpoint_deadline_s
  int64_t checkpoint_waits = 0;        // checkpoint steps that waited for the previous save still in flight
  double checkpoint_wait_s = 0.0;      // time those waits took
  double checkpoint_snapshot_s = 0.0;  // time spent copying state to host memory for the background writer
  double checkpoint_final_wait_s = 0.0;  // waiting for the last save at the end of the run
  double checkpoint_blocked_s = 0.0;   // all main-loop time spent on checkpoints (synchronous saves included)
};

// Test hooks (never set by the CLI).
struct TrainHooks {
  std::vector<int64_t> grad_overflow_steps;  // after backward, one gradient element becomes +inf (pre-unscale)
  std::vector<int64_t> nan_loss_steps;       // the step's first micro-batch loss becomes NaN
  int64_t stop_after_step = 0;               // > 0: return right after this step (and its checkpoint), as if killed
};

// Exit codes (docs/contracts.md §2/§3).
enum ExitCode {
  kExitOk = 0,
  kExitCrash = 1,
  kExitInvalidConfig = 2,
  kExitDiverged = 3,
  kExitOom = 4,
  kExitLeaseExpired = 75,  // --lease_file's deadline passed: the worker's lease is gone (EX_TEMPFAIL)
};

// Runs (or, with print_config, describes) a training run; emits events; returns the exit code.
int run_training(const TrainConfig& cfg, TrainResult* result = nullptr, const TrainHooks* hooks = nullptr);

// Checks <dir>/manifest.json against the files (size + sha256). Throws ConfigError naming the bad file.
// (Defined in core/checkpoint.cpp.)
void verify_checkpoint(const std::string& dir);

// Command-line entry points (core/cli.cpp). argv excludes nothing: argv[0] is the program.
int train_cli(int argc, char** argv);
int prepare_data_cli(int argc, char** argv);

}  // namespace ablate
