// Small pieces the worker's threads share: an interruptible stop flag, stderr logging, retried RPCs.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>

namespace ablate::worker {

// Set once (SIGTERM/SIGINT); every wait in the worker goes through SleepFor so shutdown is prompt.
class Stopper {
 public:
  void Stop();
  bool stopped() const { return stopped_.load(); }
  // Sleeps up to d; returns false when woken because of Stop().
  bool SleepFor(std::chrono::milliseconds d);

 private:
  std::atomic<bool> stopped_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

// One line per event on stderr, with a UTC timestamp; whole lines even from several threads.
void LogLine(const std::string& line);
template <typename... Args>
void Log(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  LogLine(os.str());
}

// The lease deadline for the trainer (ablate-train --lease_file, core/lease_watch.h): one line
// "monotonic_deadline_ns <N>" with N in steady_clock (CLOCK_MONOTONIC) nanoseconds, written to path.tmp and renamed
// over path so the trainer never reads half a line. False with *error set on failure.
bool WriteLeaseDeadline(const std::string& path, std::chrono::steady_clock::time_point deadline, std::string* error);

// Jittered exponential backoff: attempt 0 -> ~base, doubling up to cap, times a factor in [0.5, 1.5).
std::chrono::milliseconds Backoff(int attempt, std::chrono::milliseconds base = std::chrono::milliseconds(200),
                                  std::chrono::milliseconds cap = std::chrono::milliseconds(5000));

// Runs `call` with a fresh ClientContext carrying a `timeout` deadline. Retries only UNAVAILABLE (the scheduler
// restarting or not yet up), with jittered backoff, until it succeeds, another status comes back, `give_up_after`
// has passed (0: never give up), or `stop` is set. Always makes at least one attempt.
grpc::Status CallWithRetry(const std::string& what, const std::function<grpc::Status(grpc::ClientContext*)>& call,
                           std::chrono::milliseconds timeout, Stopper* stop,
                           std::chrono::milliseconds give_up_after = std::chrono::milliseconds(0));

}  // namespace ablate::worker
