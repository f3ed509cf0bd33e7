// JobStore: the scheduler's persistence, in domain verbs. No libpq and no proto here, so the RPC layer and
// tests depend only on this file. Every method is thread-safe.
//
// Lease fencing: every worker write carries a Lease and is accepted only while (job_id, attempt, lease_epoch)
// is the job's current lease and the job is leased or running; otherwise kFailedPrecondition.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace ablate::scheduler {

enum class JobState { kQueued, kLeased, kRunning, kSucceeded, kFailed, kCancelled };
enum class SweepState { kActive, kSucceeded, kFailed, kCancelled };
enum class FailureClass { kUnspecified, kOom, kDiverged, kCrash, kHang, kInfra, kInvalidConfig };
enum class Outcome { kSucceeded, kFailed, kCancelled };

// Names used in the database and in metric labels ("queued", "running", ..., "invalid_config").
std::string_view JobStateName(JobState s);
std::optional<JobState> JobStateFromName(std::string_view s);
std::string_view SweepStateName(SweepState s);
std::optional<SweepState> SweepStateFromName(std::string_view s);
std::string_view FailureClassName(FailureClass c);
FailureClass FailureClassFromName(std::string_view s);
bool IsTerminal(JobState s);
// invalid_config is never retried; every other class (including unspecified) may be.
bool IsRetryable(FailureClass c);

inline const std::vector<JobState> kAllJobStates = {JobState::kQueued,    JobState::kLeased, JobState::kRunning,
                                                    JobState::kSucceeded, JobState::kFailed, JobState::kCancelled};
inline const std::vector<SweepState> kAllSweepStates = {SweepState::kActive, SweepState::kSucceeded,
                                                        SweepState::kFailed, SweepState::kCancelled};

struct Lease {
  int64_t job_id = 0;
  int32_t attempt = 0;
  int64_t lease_epoch = 0;
  int64_t expires_unix_ms = 0;
};

struct NewJob {
  int32_t cell_index = 0;
  std::vector<std::pair<std::string, std::string>> factors;
  std::map<std::string, std::string> params;
  std::string config_hash;
  int64_t total_steps = 0;
};

struct NewSweep {
  std::string name;
  std::string spec_yaml;
  std::string idempotency_key;
  std::string spec_hash;                  // same key + different spec_hash → kAlreadyExists
  std::vector<std::string> factor_names;  // for CompareSweep
  std::vector<NewJob> jobs;
};

struct SweepRecord {
  int64_t id = 0;
  std::string name;
  SweepState state = SweepState::kActive;
  std::string spec_yaml;
  std::string idempotency_key;
  int64_t created_unix_ms = 0;
  std::map<std::string, int32_t> job_counts;  // by job state name
  int32_t total_jobs = 0;
  std::vector<std::string> factor_names;
  bool cancel_requested = false;
};

struct JobRecord {
  int64_t id = 0;
  int64_t sweep_id = 0;
  int32_t cell_index = 0;
  JobState state = JobState::kQueued;
  int32_t attempt = 0;
  int64_t lease_epoch = 0;
  int64_t lease_expires_unix_ms = 0;
  std::string worker_id;
  std::map<std::string, std::string> factors;
  std::map<std::string, std::string> params;
  std::string config_hash;
  std::string last_error;
  FailureClass failure_class = FailureClass::kUnspecified;
  int64_t created_unix_ms = 0;
  int64_t started_unix_ms = 0;
  int64_t finished_unix_ms = 0;
  int64_t latest_step = 0;
  int64_t total_steps = 0;
  bool cancel_requested = false;
  std::map<std::string, double> latest_metrics;  // filled by ListJobs/GetJob
};

struct CreateSweepResult {
  SweepRecord sweep;
  bool created = false;
};

struct LeaseGrant {
  JobRecord job;
  Lease lease;
  std::string resume_checkpoint;  // latest reported checkpoint of this job, "" if none
};

struct HeartbeatResult {
  Lease lease;
  bool cancel_requested = false;
};

struct MetricSample {
  int64_t step = 0;
  std::string name;
  double value = 0;
  int64_t time_unix_ms = 0;
};

struct AppendMetricsResult {
  int64_t accepted = 0;  // points in the batch (the lease was current)
  int64_t inserted = 0;  // new rows; duplicates of a retried batch are ignored
};

struct WorkerInfo {
  std::string worker_id;
  std::string hostname;
  std::string resources_json;
  std::string version;
};

struct ExpireResult {
  int requeued = 0;
  int failed = 0;
  int cancelled = 0;
};

struct RunningJobMetric {
  int64_t job_id = 0;
  std::string name;
  double value = 0;
};

class JobStore {
 public:
  virtual ~JobStore() = default;

  // Sweep + all its jobs in one transaction. An existing idempotency key returns that sweep (created=false),
  // or kAlreadyExists when its spec differs.
  virtual absl::StatusOr<CreateSweepResult> CreateSweep(const NewSweep& sweep) = 0;
  virtual absl::StatusOr<SweepRecord> GetSweep(int64_t sweep_id) = 0;
  virtual absl::StatusOr<std::vector<SweepRecord>> ListSweeps(int32_t limit) = 0;
  // Queued jobs → cancelled; leased/running ones flagged (the next heartbeat says cancel_requested).
  // Returns the number of jobs cancelled or flagged.
  virtual absl::StatusOr<int32_t> CancelSweep(int64_t sweep_id) = 0;
  virtual absl::StatusOr<std::vector<JobRecord>> ListJobs(int64_t sweep_id) = 0;
  virtual absl::StatusOr<JobRecord> GetJob(int64_t job_id) = 0;
  // Per job of the sweep: the max value of `metric` over all its points.
  virtual absl::StatusOr<std::map<int64_t, double>> MaxMetric(int64_t sweep_id, const std::string& metric) = 0;

  virtual absl::Status UpsertWorker(const WorkerInfo& worker) = 0;
  // The oldest queued job, claimed atomically; nullopt when none is runnable.
  virtual absl::StatusOr<std::optional<LeaseGrant>> LeaseNextJob(const std::string& worker_id, int lease_ttl_s) = 0;
  virtual absl::StatusOr<HeartbeatResult> Heartbeat(const std::string& worker_id, const Lease& lease, int64_t step,
                                                    int lease_ttl_s) = 0;
  virtual absl::StatusOr<AppendMetricsResult> AppendMetrics(const Lease& lease,
                                                            const std::vector<MetricSample>& points) = 0;
  virtual absl::Status RecordCheckpoint(const Lease& lease, int64_t step, const std::string& path) = 0;
  // Returns the job's state afterwards (kQueued when a failed attempt will be retried).
  virtual absl::StatusOr<JobState> CompleteJob(const Lease& lease, Outcome outcome, FailureClass failure_class,
                                               const std::string& message, int32_t exit_code, int max_attempts) = 0;
  // Leased/running jobs whose lease ran out: back to queued, or failed (hang) after max_attempts.
  virtual absl::StatusOr<ExpireResult> ExpireLeases(int max_attempts) = 0;

  // For /metrics.
  virtual absl::StatusOr<std::map<std::string, int64_t>> CountJobsByState() = 0;
  virtual absl::StatusOr<std::map<std::string, int64_t>> CountSweepsByState() = 0;
  virtual absl::StatusOr<int64_t> CountWorkersSeenWithin(int seconds) = 0;
  virtual absl::StatusOr<std::vector<RunningJobMetric>> LatestMetricsOfRunningJobs(int max_series) = 0;
};

}  // namespace ablate::scheduler
