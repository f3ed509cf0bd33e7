#include "core/lease_watch.h"

#include <fstream>

namespace ablate {

std::optional<std::chrono::steady_clock::time_point> read_lease_deadline(const std::string& path) {
  std::ifstream f(path);
  std::string key;
  long long ns = 0;
  if (!(f >> key >> ns) || key != "monotonic_deadline_ns") return std::nullopt;
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
}

LeaseWatch::LeaseWatch(std::string path, std::function<void()> on_expired, std::chrono::milliseconds poll)
    : thread_([this, path = std::move(path), on_expired = std::move(on_expired), poll] {
        std::optional<std::chrono::steady_clock::time_point> deadline;
        std::unique_lock<std::mutex> lk(mu_);
        while (!cv_.wait_for(lk, poll, [this] { return stop_; })) {
          if (auto d = read_lease_deadline(path)) deadline = d;
          if (deadline && std::chrono::steady_clock::now() > *deadline) {
            lk.unlock();
            on_expired();
            return;
          }
        }
      }) {}

LeaseWatch::~LeaseWatch() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

}  // namespace ablate
