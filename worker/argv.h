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
  std::string log_path;           // <output_dir>/attempt-<n>.log
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
};

// Builds the command, or returns false with *error set when the params cannot be passed safely (a flag name
// that is not [A-Za-z0-9_]+, a dataset name that would escape data_root). Such a job is an invalid config.
bool BuildTrainCommand(const TrainCommandInput& in, TrainCommand* out, std::string* error);

}  // namespace ablate::worker
