#include "worker/argv.h"

#include <set>

namespace ablate::worker {
namespace {

bool IsFlagName(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')) return false;
  }
  return true;
}

bool IsDatasetName(const std::string& s) {
  if (s.empty() || s == "." || s == "..") return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
          c == '.'))
      return false;
  }
  return true;
}

}  // namespace

bool BuildTrainCommand(const TrainCommandInput& in, TrainCommand* out, std::string* error) {
  // Flags the worker owns: a job may not point the child at other paths or descriptors.
  static const std::set<std::string> kReserved = {"data_dir", "output_dir", "run_name", "events_fd", "resume_from"};
  std::string dataset = "fortunes";
  TrainCommand cmd;
  cmd.argv.push_back(in.train_bin);
  for (const auto& [key, value] : in.params) {  // std::map: a stable, sorted order
    if (!IsFlagName(key)) {
      *error = "param name '" + key + "' is not a valid flag name ([A-Za-z0-9_]+)";
      return false;
    }
    if (key == "dataset") {
      dataset = value;
      continue;
    }
    if (kReserved.count(key)) {
      *error = "param '" + key + "' is set by the worker and may not appear in a job's params";
      return false;
    }
    cmd.argv.push_back("--" + key);
    cmd.argv.push_back(value);
  }
  if (!IsDatasetName(dataset)) {
    *error = "dataset '" + dataset + "' is not a plain name ([A-Za-z0-9._-]+)";
    return false;
  }
  cmd.output_dir = in.work_dir + "/job-" + std::to_string(in.job_id);
  cmd.log_path = cmd.output_dir + "/attempt-" + std::to_string(in.attempt) + ".log";
  cmd.argv.insert(cmd.argv.end(), {"--data_dir", in.data_root + "/" + dataset, "--output_dir", cmd.output_dir,
                                   "--run_name", "attempt-" + std::to_string(in.attempt), "--events_fd",
                                   std::to_string(in.events_fd)});
  if (!in.resume_checkpoint.empty()) {
    cmd.argv.push_back("--resume_from");
    cmd.argv.push_back(in.resume_checkpoint);
  }
  *out = std::move(cmd);
  return true;
}

}  // namespace ablate::worker
