#include "core/lease_watch.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace ablate {

std::optional<std::chrono::steady_clock::time_point> read_lease_deadline(const std::string& path) {
  std::ifstream f(path);
  std::string key;
  long long ns = 0;
  if (!(f >> key >> ns) || key != "monotonic_deadline_ns") return std::nullopt;
  return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns));
}

void write_lease_deadline(const std::string& path, std::chrono::steady_clock::time_point deadline) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << "monotonic_deadline_ns "
      << std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch()).count() << "\n";
    if (!f.flush()) throw std::runtime_error("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + path);
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
