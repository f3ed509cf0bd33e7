// One ablate-train child: its own process group, stdout/stderr to a log file, an events pipe on a fixed fd.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "worker/outcome.h"

namespace ablate::worker {

class ChildProcess {
 public:
  struct Options {
    std::vector<std::string> argv;
    std::string log_path;   // stdout+stderr, appended
    int events_fd = 3;      // the write end of the events pipe, as the child sees it
    std::vector<std::string> env;  // extra KEY=VALUE entries (override the worker's own environment)
  };

  // fork+exec. Returns nullptr with *error when the log cannot be opened or exec fails (reported back to the
  // parent through a close-on-exec pipe, so "no such binary" is a spawn error, not a mysterious exit 127).
  static std::unique_ptr<ChildProcess> Spawn(const Options& opts, std::string* error);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  // Read end of the events pipe; EOF once every process holding the write end is gone.
  int events_fd() const { return events_read_; }

  // Non-blocking reap. Returns the status once the child has exited.
  std::optional<ExitStatus> TryWait();
  ExitStatus Wait();
  // Signals the whole process group (the child is its leader); ESRCH is not an error.
  void SignalGroup(int sig);
  // SIGTERM the group, wait up to `grace`, then SIGKILL; returns the exit status.
  ExitStatus Stop(std::chrono::milliseconds grace);

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  int events_read_ = -1;
  std::optional<ExitStatus> status_;
};

}  // namespace ablate::worker
