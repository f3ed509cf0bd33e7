#include "scheduler/store/job_store.h"

#include <algorithm>
#include <sstream>

#include "absl/status/status.h"

namespace ablate::scheduler {
namespace {
constexpr std::pair<JobState, std::string_view> kJobNames[] = {
    {JobState::kQueued, "queued"},       {JobState::kLeased, "leased"}, {JobState::kRunning, "running"},
    {JobState::kSucceeded, "succeeded"}, {JobState::kFailed, "failed"}, {JobState::kCancelled, "cancelled"}};
constexpr std::pair<SweepState, std::string_view> kSweepNames[] = {{SweepState::kActive, "active"},
                                                                   {SweepState::kSucceeded, "succeeded"},
                                                                   {SweepState::kFailed, "failed"},
                                                                   {SweepState::kCancelled, "cancelled"}};
constexpr std::pair<FailureClass, std::string_view> kFailureNames[] = {
    {FailureClass::kUnspecified, ""},  {FailureClass::kOom, "oom"},     {FailureClass::kDiverged, "diverged"},
    {FailureClass::kCrash, "crash"},   {FailureClass::kHang, "hang"},   {FailureClass::kInfra, "infra"},
    {FailureClass::kInvalidConfig, "invalid_config"}, {FailureClass::kUnschedulable, "unschedulable"}};
}  // namespace

std::string_view JobStateName(JobState s) {
  for (auto& [k, v] : kJobNames) if (k == s) return v;
  return "unknown";
}
std::optional<JobState> JobStateFromName(std::string_view s) {
  for (auto& [k, v] : kJobNames) if (v == s) return k;
  return std::nullopt;
}
std::string_view SweepStateName(SweepState s) {
  for (auto& [k, v] : kSweepNames) if (k == s) return v;
  return "unknown";
}
std::optional<SweepState> SweepStateFromName(std::string_view s) {
  for (auto& [k, v] : kSweepNames) if (v == s) return k;
  return std::nullopt;
}
std::string_view FailureClassName(FailureClass c) {
  for (auto& [k, v] : kFailureNames) if (k == c) return v;
  return "";
}
FailureClass FailureClassFromName(std::string_view s) {
  for (auto& [k, v] : kFailureNames) if (v == s) return k;
  return FailureClass::kUnspecified;
}
bool IsTerminal(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled;
}
bool IsRetryable(FailureClass c) { return c != FailureClass::kInvalidConfig && c != FailureClass::kUnschedulable; }


RetryPolicy RetryPolicy::Legacy(int max_attempts) {
  RetryPolicy p;
  for (auto& [c, n] : p.max_retries) n = c == FailureClass::kInvalidConfig ? 0 : 1 << 20;
  p.max_retries[FailureClass::kOom] = 1 << 20;
  p.max_retries[FailureClass::kDiverged] = 1 << 20;
  p.max_failed_attempts = max_attempts;
  p.backoff_base_ms = 0;
  p.backoff_max_ms = 0;
  p.quarantine_after = 0;
  return p;
}

absl::StatusOr<RetryPolicy> RetryPolicy::Parse(const std::string& spec, RetryPolicy base) {
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    auto eq = item.find('=');
    if (eq == std::string::npos) {
      return absl::InvalidArgumentError("retry policy '" + item + "': expected class=N (e.g. crash=2)");
    }
    std::string name = item.substr(0, eq), num = item.substr(eq + 1);
    FailureClass c = FailureClassFromName(name);
    if (c == FailureClass::kUnspecified && name != "unspecified") {
      return absl::InvalidArgumentError("retry policy: unknown failure class '" + name +
                                        "' (expected oom|diverged|crash|hang|infra|invalid_config)");
    }
    char* end = nullptr;
    long n = std::strtol(num.c_str(), &end, 10);
    if (num.empty() || *end || n < 0 || n > 1000) {
      return absl::InvalidArgumentError("retry policy: " + name + "=" + num + ": expected an integer 0..1000");
    }
    if (c == FailureClass::kInvalidConfig && n != 0) {
      return absl::InvalidArgumentError("retry policy: invalid_config is never retried");
    }
    if (c == FailureClass::kUnschedulable) {
      return absl::InvalidArgumentError(
          "retry policy: unschedulable is decided by the scheduler, never retried (see --gang_unformable_after)");
    }
    base.max_retries[c] = static_cast<int>(n);
  }
  return base;
}

int64_t RetryBackoffMs(const RetryPolicy& p, FailureClass c, int n) {
  if (c != FailureClass::kCrash && c != FailureClass::kHang && c != FailureClass::kUnspecified) return 0;
  if (p.backoff_base_ms <= 0 || n <= 0) return 0;
  int64_t d = p.backoff_base_ms;
  for (int i = 1; i < n && d < p.backoff_max_ms; ++i) d *= 2;
  return std::min(d, p.backoff_max_ms);
}

}  // namespace ablate::scheduler
