#include "worker/outcome.h"

#include <sys/wait.h>

#include <cstring>

namespace ablate::worker {

ExitStatus FromWaitStatus(int ws) {
  ExitStatus s;
  if (WIFEXITED(ws)) {
    s.exited = true;
    s.code = WEXITSTATUS(ws);
  } else if (WIFSIGNALED(ws)) {
    s.signal = WTERMSIG(ws);
  }
  return s;
}

std::optional<v1::FailureClass> FailureClassFromName(std::string_view name) {
  if (name == "oom") return v1::FAILURE_CLASS_OOM;
  if (name == "diverged") return v1::FAILURE_CLASS_DIVERGED;
  if (name == "crash") return v1::FAILURE_CLASS_CRASH;
  if (name == "hang") return v1::FAILURE_CLASS_HANG;
  if (name == "infra") return v1::FAILURE_CLASS_INFRA;
  if (name == "invalid_config") return v1::FAILURE_CLASS_INVALID_CONFIG;
  return std::nullopt;
}

std::string OutcomeLabel(v1::Outcome outcome) {
  switch (outcome) {
    case v1::OUTCOME_SUCCEEDED: return "succeeded";
    case v1::OUTCOME_FAILED: return "failed";
    case v1::OUTCOME_CANCELLED: return "cancelled";
    default: return "unspecified";
  }
}

JobResult MapOutcome(const ExitStatus& status, const std::optional<FinishedEvent>& finished) {
  JobResult r;
  const std::string event_msg = finished ? finished->message : std::string();
  if (!status.exited) {
    r.outcome = v1::OUTCOME_FAILED;
    r.failure_class = v1::FAILURE_CLASS_CRASH;
    r.exit_code = 128 + status.signal;
    const char* name = ::strsignal(status.signal);
    r.message = "ablate-train killed by signal " + std::to_string(status.signal) + " (" + (name ? name : "?") + ")";
    if (!event_msg.empty()) r.message += ": " + event_msg;
    return r;
  }
  r.exit_code = status.code;
  switch (status.code) {
    case 0:
      r.outcome = v1::OUTCOME_SUCCEEDED;
      r.message = event_msg;
      return r;
    case 2: r.failure_class = v1::FAILURE_CLASS_INVALID_CONFIG; break;
    case 3: r.failure_class = v1::FAILURE_CLASS_DIVERGED; break;
    case 4: r.failure_class = v1::FAILURE_CLASS_OOM; break;
    case 5: r.failure_class = v1::FAILURE_CLASS_HANG; break;  // a collective made no progress (docs/distributed.md)
    default: {
      r.failure_class = v1::FAILURE_CLASS_CRASH;
      // A generic exit code with a finished event that names a class (e.g. an OOM caught late): trust the class.
      if (finished && !finished->succeeded) {
        if (auto fc = FailureClassFromName(finished->failure_class)) r.failure_class = *fc;
      }
    }
  }
  r.outcome = v1::OUTCOME_FAILED;
  r.message = !event_msg.empty() ? event_msg : "ablate-train exited with code " + std::to_string(status.code);
  return r;
}

}  // namespace ablate::worker
