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
// kUnschedulable is the scheduler's own verdict (a gang that cannot form on the fleet); workers never report it.
enum class FailureClass { kUnspecified, kOom, kDiverged, kCrash, kHang, kInfra, kInvalidConfig, kUnschedulable };
enum class Outcome { kSucceeded, kFailed, kCancelled, kPreempted };

// Names used in the database and in metric labels ("queued", "running", ..., "invalid_config").
std::string_view JobStateName(JobState s);
std::optional<JobState> JobStateFromName(std::string_view s);
std::string_view SweepStateName(SweepState s);
std::optional<SweepState> SweepStateFromName(std::string_view s);
std::string_view FailureClassName(FailureClass c);
FailureClass FailureClassFromName(std::string_view s);
bool IsTerminal(JobState s);
// invalid_config and unschedulable are never retried; every other class (including unspecified) may be.
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
  std::string lease_nonce;  // random per lease; part of the fence (an epoch reissued after failover never matches)
  int32_t rank = 0;         // gang-scheduled jobs: the rank this lease is for (all ranks share the token above)
};

// Retry policy per failure class (docs/control-plane.md has the table). A failed attempt is re-queued while
// its class has retries left and the job's failed attempts stay under max_failed_attempts; crash and hang
// wait an exponential backoff first; infra (lease lost, spawn failed, node fault) is re-queued at once.
// Preemptions (drain) never count.
struct RetryPolicy {
  std::map<FailureClass, int> max_retries = {
      {FailureClass::kCrash, 2}, {FailureClass::kHang, 2}, {FailureClass::kInfra, 5},
      {FailureClass::kOom, 0},   {FailureClass::kDiverged, 0}, {FailureClass::kInvalidConfig, 0},
      {FailureClass::kUnspecified, 2}};
  int max_failed_attempts = 8;
  int64_t backoff_base_ms = 10000;
  int64_t backoff_max_ms = 600000;
  int quarantine_after = 3;   // consecutive crash/hang/infra failures of one worker; 0 = never
  int quarantine_s = 600;
  int MaxRetries(FailureClass c) const {
    auto it = max_retries.find(c);
    return it == max_retries.end() ? 0 : it->second;
  }
  // The pre-0002 behaviour: every class but invalid_config retried until max_attempts, no backoff.
  static RetryPolicy Legacy(int max_attempts);
  // "crash=2,hang=2,infra=5,oom=0,diverged=0": overrides of max_retries.
  static absl::StatusOr<RetryPolicy> Parse(const std::string& spec, RetryPolicy base);
};
// Backoff before retry number `n` (1-based) of a class that backs off.
int64_t RetryBackoffMs(const RetryPolicy& p, FailureClass c, int n);

// What a worker offers when it asks for a job: its free GPUs (index, memory), or none (CPU worker: its host
// memory counts as one device).
struct Capacity {
  struct Gpu {
    int32_t index = 0;
    int64_t memory_bytes = 0;
  };
  std::vector<Gpu> gpus;
  int64_t host_memory_bytes = 0;
  bool unlimited = false;  // tests and legacy callers: anything fits
  // host:port this worker's child would listen on as rank 0 of a gang (MASTER_ADDR:MASTER_PORT of every rank).
  std::string rendezvous_addr;
};

struct NewJob {
  int32_t cell_index = 0;
  std::vector<std::pair<std::string, std::string>> factors;
  std::map<std::string, std::string> params;
  std::string config_hash;
  int64_t total_steps = 0;
  int64_t mem_estimate_bytes = 0;  // per GPU
  int32_t gpus = 1;
  int32_t ranks = 1;  // > 1: gang-scheduled on `ranks` distinct workers
};

struct NewSweep {
  std::string name;
  std::string spec_yaml;
  std::string idempotency_key;
  std::string spec_hash;                  // same key + different spec_hash → kAlreadyExists
  std::vector<std::string> factor_names;  // for CompareSweep
  std::vector<NewJob> jobs;
  bool reuse_succeeded = true;  // cells whose config_hash already succeeded are stored as reused, not run
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
  int64_t reused_from = 0;
  int64_t mem_estimate_bytes = 0;
  int32_t gpus = 1;
  int64_t not_before_unix_ms = 0;
  std::string lease_nonce;
  int32_t ranks = 1;
};

struct CreateSweepResult {
  SweepRecord sweep;
  bool created = false;
};

struct LeaseGrant {
  JobRecord job;
  Lease lease;
  std::string resume_checkpoint;  // latest reported checkpoint of this job, "" if none
  std::vector<std::pair<int64_t, std::string>> checkpoints;  // (step, path), newest first
  std::vector<int32_t> assigned_gpus;
  // Gangs (job.ranks > 1): this worker's rank (also in lease.rank), the world size and rank 0's rendezvous address.
  int32_t rank = 0;
  int32_t world_size = 1;
  std::string master_addr;
};

// A gang job the scheduler failed because it cannot form (class unschedulable): see PgJobStore::set_gang_unformable_after.
struct UnschedulableGang {
  int64_t job_id = 0;
  int64_t sweep_id = 0;
  int32_t ranks = 0;
  int64_t live_workers = 0;  // live registered workers that could hold one of its ranks, at the last deadline
  int32_t deadlines = 0;     // formation deadlines missed in a row with too few of them
  std::string reason;        // the job's last_error
};

struct LeaseAttempt {
  std::optional<LeaseGrant> grant;
  int64_t quarantined_until_unix_ms = 0;  // > 0: the worker is quarantined, no grant
  std::vector<UnschedulableGang> unschedulable;  // gangs this call failed (for the log; any caller may see them)
};

struct CompleteResult {
  JobState state = JobState::kQueued;
  bool worker_quarantined = false;
  int64_t retry_in_ms = 0;
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
  std::vector<std::string> quarantined_workers;
};

struct ExtendResult {
  int32_t added = 0;
  int32_t reused = 0;
  int32_t already_present = 0;
};

struct ScheduleRecord {
  int64_t id = 0;
  std::string name;
  std::string cron;
  std::string spec_yaml;
  int64_t next_due_unix_ms = 0;
  int64_t last_fired_unix_ms = 0;
  int64_t last_sweep_id = 0;
  int64_t created_unix_ms = 0;
  int32_t fired_count = 0;
  int32_t skipped_count = 0;
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
  // Every point of one job (names empty: all names), one per (name, step): the newest attempt's. Ordered by
  // name, then step. (Default: unimplemented, for stores that don't keep history.)
  virtual absl::StatusOr<std::vector<MetricSample>> JobMetrics(int64_t job_id, const std::vector<std::string>& names) {
    (void)job_id;
    (void)names;
    return absl::UnimplementedError("JobMetrics is not implemented by this store");
  }

  // Queued job → cancelled; a leased/running one is flagged (its worker stops it at the next heartbeat).
  // Returns false when the job was already terminal.
  virtual absl::StatusOr<bool> CancelJob(int64_t job_id) = 0;
  // Adds the cells of `sweep` that the sweep lacks (by config_hash); see ExtendSweepRequest.
  virtual absl::StatusOr<ExtendResult> ExtendSweep(int64_t sweep_id, const NewSweep& sweep) = 0;

  virtual absl::Status UpsertWorker(const WorkerInfo& worker) = 0;
  virtual absl::Status SetQuarantine(const std::string& worker_id, bool quarantined, int duration_s,
                                     const std::string& reason) = 0;
  // The oldest runnable queued job that fits `free` (gpus ≤ free GPUs, per-GPU memory estimate ≤ the smallest of
  // them), claimed atomically with a fresh lease (epoch+1, new nonce) and its attempt row; none when nothing fits
  // or the worker is quarantined. Gang jobs (ranks > 1) come first: the worker takes (or renews) a pending slot
  // of the oldest forming gang and gets no grant until the gang is complete; the call that fills the last slot
  // leases the job once for all ranks, and every member receives its rank's grant on its next call.
  virtual absl::StatusOr<LeaseAttempt> LeaseJobFor(const std::string& worker_id, const Capacity& free,
                                                   int lease_ttl_s) = 0;
  absl::StatusOr<std::optional<LeaseGrant>> LeaseNextJob(const std::string& worker_id, int lease_ttl_s) {
    Capacity any;
    any.unlimited = true;
    auto r = LeaseJobFor(worker_id, any, lease_ttl_s);
    if (!r.ok()) return r.status();
    return std::move(r->grant);
  }
  virtual absl::StatusOr<HeartbeatResult> Heartbeat(const std::string& worker_id, const Lease& lease, int64_t step,
                                                    int lease_ttl_s) = 0;
  virtual absl::StatusOr<AppendMetricsResult> AppendMetrics(const Lease& lease,
                                                            const std::vector<MetricSample>& points) = 0;
  // The workers that hold `lease` now: the job's worker and, for a gang, every rank's worker of that attempt.
  // Empty when the lease is not current (a write with it is fenced anyway).
  virtual absl::StatusOr<std::vector<std::string>> LeaseHolders(const Lease& lease) = 0;
  virtual absl::Status RecordCheckpoint(const Lease& lease, int64_t step, const std::string& path) = 0;
  // Returns the job's state afterwards (kQueued when a failed attempt will be retried), per `policy`.
  virtual absl::StatusOr<CompleteResult> Complete(const Lease& lease, Outcome outcome, FailureClass failure_class,
                                                  const std::string& message, int32_t exit_code, int64_t last_step,
                                                  const RetryPolicy& policy) = 0;
  absl::StatusOr<JobState> CompleteJob(const Lease& lease, Outcome outcome, FailureClass failure_class,
                                       const std::string& message, int32_t exit_code, int max_attempts) {
    auto r = Complete(lease, outcome, failure_class, message, exit_code, -1, RetryPolicy::Legacy(max_attempts));
    if (!r.ok()) return r.status();
    return r->state;
  }
  // Leased/running jobs whose lease ran out: back to queued (class infra), or failed when the budget is spent.
  // leader_epoch > 0: only while that epoch is still the leader's (a deposed leader's reaper changes nothing).
  virtual absl::StatusOr<ExpireResult> Expire(const RetryPolicy& policy, int64_t leader_epoch) = 0;
  absl::StatusOr<ExpireResult> ExpireLeases(int max_attempts) { return Expire(RetryPolicy::Legacy(max_attempts), 0); }

  // Cron schedules (the cron expression is validated by the caller).
  virtual absl::StatusOr<ScheduleRecord> CreateSchedule(const std::string& name, const std::string& cron,
                                                        const std::string& spec_yaml, int64_t next_due_unix_ms) = 0;
  virtual absl::StatusOr<std::vector<ScheduleRecord>> ListSchedules() = 0;
  virtual absl::Status DeleteSchedule(int64_t schedule_id) = 0;
  // Schedules whose next_due ≤ now (database time, or now_override_unix_ms when > 0).
  virtual absl::StatusOr<std::vector<ScheduleRecord>> DueSchedules(int64_t now_override_unix_ms) = 0;
  // Records that (schedule, due) fired as sweep_id and moves next_due from `expected_next_due` to `new_next_due`
  // (compare-and-set). false when another replica/restart already recorded that due time.
  virtual absl::StatusOr<bool> RecordScheduleRun(int64_t schedule_id, int64_t due_unix_ms, int64_t sweep_id,
                                                 int64_t expected_next_due_unix_ms, int64_t new_next_due_unix_ms,
                                                 int32_t skipped) = 0;

  // For /metrics.
  virtual absl::StatusOr<std::map<std::string, int64_t>> CountJobsByState() = 0;
  virtual absl::StatusOr<std::map<std::string, int64_t>> CountSweepsByState() = 0;
  virtual absl::StatusOr<int64_t> CountWorkersSeenWithin(int seconds) = 0;
  virtual absl::StatusOr<std::vector<RunningJobMetric>> LatestMetricsOfRunningJobs(int max_series) = 0;
  virtual absl::StatusOr<int64_t> CountQuarantinedWorkers() = 0;
};

}  // namespace ablate::scheduler
