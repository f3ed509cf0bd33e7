#include "scheduler/store/job_store.h"

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
    {FailureClass::kInvalidConfig, "invalid_config"}};
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
bool IsRetryable(FailureClass c) { return c != FailureClass::kInvalidConfig; }

}  // namespace ablate::scheduler
