// How a finished ablate-train child maps to the CompleteJob report (docs/contracts.md §3 exit codes).
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "ablate/v1/ablate.pb.h"
#include "worker/events.h"

namespace ablate::worker {

struct ExitStatus {
  bool exited = false;  // true: normal exit with `code`; false: killed by `signal`
  int code = 0;
  int signal = 0;
};
ExitStatus FromWaitStatus(int wait_status);

struct JobResult {
  v1::Outcome outcome = v1::OUTCOME_UNSPECIFIED;
  v1::FailureClass failure_class = v1::FAILURE_CLASS_UNSPECIFIED;
  std::string message;
  int exit_code = 0;  // the child's exit code, or 128+signal
};

// The exit code decides (0 succeeded, 2 invalid_config, 3 diverged, 4 oom, else crash); the finished event only
// supplies the message, and refines a generic crash exit when it names a known class.
JobResult MapOutcome(const ExitStatus& status, const std::optional<FinishedEvent>& finished);

// "oom" -> FAILURE_CLASS_OOM, ...; nullopt for an unknown name.
std::optional<v1::FailureClass> FailureClassFromName(std::string_view name);
// Label for logs and the jobs_total{outcome} metric: succeeded | failed | cancelled.
std::string OutcomeLabel(v1::Outcome outcome);

}  // namespace ablate::worker
