// The trainer's side of the worker's lease (RELIABILITY F03): the worker (ablate-worker) writes the moment its
// lease runs out without renewal to a file, and keeps moving it while renewals succeed; the trainer stops itself
// when that moment has passed. This covers what the worker's own self-fence cannot: a worker frozen (SIGSTOP, a
// stuck host process) while its child trains on, which would overlap the attempt the scheduler hands out next.
//
// File: one line "monotonic_deadline_ns <N>\n", N = CLOCK_MONOTONIC nanoseconds (std::chrono::steady_clock on
// Linux: one clock for every process on the host). Written atomically (temporary file, rename).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

namespace ablate {

// The deadline in a lease file; nullopt when the file is missing, unreadable or not in the format above.
// (The writer is the worker's: WriteLeaseDeadline in worker/util.h.)
std::optional<std::chrono::steady_clock::time_point> read_lease_deadline(const std::string& path);

// Polls `path` every `poll`; calls on_expired() once, from its own thread, when a deadline was read and
// steady_clock::now() is past it. A missing or unreadable file is not an expiry (the last good deadline stands).
class LeaseWatch {
 public:
  LeaseWatch(std::string path, std::function<void()> on_expired,
             std::chrono::milliseconds poll = std::chrono::milliseconds(500));
  ~LeaseWatch();  // stops the thread
  LeaseWatch(const LeaseWatch&) = delete;
  LeaseWatch& operator=(const LeaseWatch&) = delete;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ablate
