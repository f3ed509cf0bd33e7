#include "core/profile.h"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <vector>


namespace ablate::core {
namespace {

namespace prof = torch::autograd::profiler;
namespace impl = torch::profiler::impl;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void device_sync(bool cuda) {
  if (cuda) torch::cuda::synchronize();
}

struct Row {
  double total_ns = 0;
  int64_t calls = 0;
};

}  // namespace

StepProfiler::StepProfiler(int64_t first_step, int64_t num_steps, std::filesystem::path out_dir, bool cuda)
    : first_(first_step), last_(num_steps > 0 ? first_step + num_steps - 1 : -1), dir_(std::move(out_dir)),
      cuda_(cuda) {}

StepProfiler::~StepProfiler() {
  if (active_) {
    try {
      prof::disableProfiler();
    } catch (...) {
    }
  }
}

void StepProfiler::before_step(int64_t step) {
  if (last_ < 0 || step != first_ || active_) return;
  device_sync(cuda_);
  std::set<impl::ActivityType> acts = {impl::ActivityType::CPU};
  if (cuda_) acts.insert(impl::ActivityType::CUDA);
  const impl::ProfilerConfig cfg(impl::ProfilerState::KINETO);
  prof::prepareProfiler(cfg, acts);
  prof::enableProfiler(cfg, acts);
  active_ = true;
  start_s_ = now_s();
}

void StepProfiler::after_step(int64_t step, std::ostream& out) {
  if (active_ && step == last_) finish(out);
}

void StepProfiler::finish(std::ostream& out) {
  device_sync(cuda_);
  const double wall_s = now_s() - start_s_;
  auto result = prof::disableProfiler();
  active_ = false;
  std::filesystem::create_directories(dir_);
  const auto trace = dir_ / "trace.json";
  result->save(trace.string());

  // CUDA: kernels and copies on the device (exclusive by nature). CPU: ops' inclusive times (nested ops overlap).
  const bool on_device = cuda_;
  std::map<std::string, Row> rows;
  double busy_ns = 0;
  for (const auto& e : result->events()) {
    const bool dev = e.deviceType() == c10::DeviceType::CUDA;
    if (dev != on_device) continue;
    auto& r = rows[e.name()];
    r.total_ns += double(e.durationNs());
    ++r.calls;
    busy_ns += double(e.durationNs());
  }
  std::vector<std::pair<std::string, Row>> sorted(rows.begin(), rows.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.second.total_ns > b.second.total_ns; });

  std::ostringstream s;
  const int64_t steps = last_ - first_ + 1;
  char line[512];
  std::snprintf(line, sizeof line, "profile of steps %lld-%lld: %.1f ms wall per step; %s %.1f ms per step (%.0f %% of wall)\n",
                static_cast<long long>(first_), static_cast<long long>(last_), 1e3 * wall_s / double(steps),
                on_device ? "CUDA kernels busy" : "CPU ops (inclusive, overlapping)", busy_ns / 1e6 / double(steps),
                100.0 * busy_ns / 1e9 / std::max(wall_s, 1e-9));
  s << line;
  std::snprintf(line, sizeof line, "%10s %6s %8s %10s  %s\n", "ms/step", "%", "calls", "us/call", "name");
  s << line;
  const size_t top = std::min<size_t>(sorted.size(), 30);
  for (size_t i = 0; i < top; ++i) {
    const auto& [name, r] = sorted[i];
    std::string n = name.size() > 140 ? name.substr(0, 137) + "..." : name;
    std::snprintf(line, sizeof line, "%10.3f %6.1f %8lld %10.1f  %s\n", r.total_ns / 1e6 / double(steps),
                  100.0 * r.total_ns / std::max(busy_ns, 1.0), static_cast<long long>(r.calls / steps),
                  r.total_ns / 1e3 / double(std::max<int64_t>(r.calls, 1)), n.c_str());
    s << line;
  }
  if (sorted.size() > top) s << "(" << sorted.size() - top << " more names; all of them in " << trace.string() << ")\n";
  s << "trace: " << trace.string() << "\n";
  std::ofstream(dir_ / "summary.txt") << s.str();
  out << s.str() << std::flush;
}

}  // namespace ablate::core
