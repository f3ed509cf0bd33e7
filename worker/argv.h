// The ablate-train command line for one job attempt (docs/contracts.md §2).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ablate::worker {

struct TrainCommand {
  std::vector<std::string> argv;  // argv[0] is the train binary
  std::string output_dir;         // <work_dir>/job-<id>
  std::string log_path;           // <output_dir>/<run name>.log (run name: attempt-<n>, see ClaimRunName)
};

struct TrainCommandInput {
  std::string train_bin;
  std::map<std::string, std::string> params;  // the job's params (flag name without dashes -> value)
  int64_t job_id = 0;
  int32_t attempt = 1;
  std::string data_root;
  std::string work_dir;
  std::string resume_checkpoint;  // empty: start fresh
  int events_fd = 3;
  std::string run_name;           // empty: attempt-<n>
};

// Builds the command, or returns false with *error set when the params cannot be passed safely (a flag name
// that is not [A-Za-z0-9_]+, a dataset name that would escape data_root). Such a job is an invalid config.
bool BuildTrainCommand(const TrainCommandInput& in, TrainCommand* out, std::string* error);

// The run directory of one lease grant under output_dir (<work_dir>/job-<id>): "attempt-<n>", unless that directory
// belongs to another grant of the same attempt number. After a database failover rolled the job back, the attempt
// and epoch numbers are handed out again (RELIABILITY F16) while the old holder's trainer may still be writing (and
// pruning checkpoints) there; the new grant then runs in "attempt-<n>-<8 hex digits of SHA-256(nonce)>". The owner
// is recorded in <dir>/.lease (that digest, not the nonce), created atomically; ranks of one gang share the grant,
// so they agree on the name. Creates the directory. Returns the name, or "" with *error set.
std::string ClaimRunName(const std::string& output_dir, int32_t attempt, const std::string& lease_nonce,
                         std::string* error);

}  // namespace ablate::worker
