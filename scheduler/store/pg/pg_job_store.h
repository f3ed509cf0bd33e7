// JobStore on PostgreSQL (libpq). Parameterized SQL only; every fenced write checks the lease in the same
// statement that writes.
#pragma once
#include <memory>
#include <string>

#include "scheduler/store/job_store.h"
#include "scheduler/store/pg/pg_conn.h"

namespace ablate::scheduler::pg {

class PgJobStore final : public JobStore {
 public:
  PgJobStore(std::string dsn, int pool_size);
  // A forming gang not complete this long after its oldest pending slot was taken releases its slots and is not
  // offered again for as long (its members take other jobs meanwhile). Set before serving.
  void set_gang_form_timeout_s(int s) { gang_form_timeout_s_ = s; }
  // A gang that reaches this many formation deadlines in a row, each time with fewer live registered workers that
  // could hold one of its ranks than it has ranks, fails (class unschedulable) instead of forming again; 0: never.
  void set_gang_unformable_after(int n) { gang_unformable_after_ = n; }
  // Expire reaps nothing when the database held it up longer than this before handing out the expired leases (a
  // locked table, a stall: F17/F18): it answers kUnavailable instead, and the leader gives every lease a grace, since
  // their holders could not renew meanwhile either. 0: no such check.
  void set_reap_stall_limit_ms(int ms) { reap_stall_limit_ms_ = ms; }

  absl::StatusOr<CreateSweepResult> CreateSweep(const NewSweep& sweep) override;
  absl::StatusOr<SweepRecord> GetSweep(int64_t sweep_id) override;
  absl::StatusOr<std::vector<SweepRecord>> ListSweeps(int32_t limit) override;
  absl::StatusOr<int32_t> CancelSweep(int64_t sweep_id) override;
  absl::StatusOr<std::vector<JobRecord>> ListJobs(int64_t sweep_id) override;
  absl::StatusOr<JobRecord> GetJob(int64_t job_id) override;
  absl::StatusOr<std::map<int64_t, double>> MaxMetric(int64_t sweep_id, const std::string& metric) override;
  absl::StatusOr<std::vector<MetricSample>> JobMetrics(int64_t job_id, const std::vector<std::string>& names) override;

  absl::StatusOr<bool> CancelJob(int64_t job_id) override;
  absl::StatusOr<ExtendResult> ExtendSweep(int64_t sweep_id, const NewSweep& sweep) override;
  absl::Status UpsertWorker(const WorkerInfo& worker) override;
  absl::Status SetQuarantine(const std::string& worker_id, bool quarantined, int duration_s,
                             const std::string& reason) override;
  absl::StatusOr<LeaseAttempt> LeaseJobFor(const std::string& worker_id, const Capacity& free,
                                           int lease_ttl_s) override;
  absl::StatusOr<HeartbeatResult> Heartbeat(const std::string& worker_id, const Lease& lease, int64_t step,
                                            int lease_ttl_s) override;
  absl::StatusOr<AppendMetricsResult> AppendMetrics(const Lease& lease,
                                                    const std::vector<MetricSample>& points) override;
  absl::StatusOr<std::vector<std::string>> LeaseHolders(const Lease& lease) override;
  absl::Status RecordCheckpoint(const Lease& lease, int64_t step, const std::string& path) override;
  absl::StatusOr<CompleteResult> Complete(const Lease& lease, Outcome outcome, FailureClass failure_class,
                                          const std::string& message, int32_t exit_code, int64_t last_step,
                                          const RetryPolicy& policy) override;
  absl::StatusOr<ExpireResult> Expire(const RetryPolicy& policy, int64_t leader_epoch) override;
  absl::StatusOr<ScheduleRecord> CreateSchedule(const std::string& name, const std::string& cron,
                                                const std::string& spec_yaml, int64_t next_due_unix_ms) override;
  absl::StatusOr<std::vector<ScheduleRecord>> ListSchedules() override;
  absl::Status DeleteSchedule(int64_t schedule_id) override;
  absl::StatusOr<std::vector<ScheduleRecord>> DueSchedules(int64_t now_override_unix_ms) override;
  absl::StatusOr<bool> RecordScheduleRun(int64_t schedule_id, int64_t due_unix_ms, int64_t sweep_id,
                                         int64_t expected_next_due_unix_ms, int64_t new_next_due_unix_ms,
                                         int32_t skipped) override;
  absl::StatusOr<int64_t> CountQuarantinedWorkers() override;

  absl::StatusOr<std::map<std::string, int64_t>> CountJobsByState() override;
  absl::StatusOr<std::map<std::string, int64_t>> CountSweepsByState() override;
  absl::StatusOr<int64_t> CountWorkersSeenWithin(int seconds) override;
  absl::StatusOr<std::vector<RunningJobMetric>> LatestMetricsOfRunningJobs(int max_series) override;

 private:
  PgPool pool_;
  int gang_form_timeout_s_ = 120;
  int gang_unformable_after_ = 3;
  int reap_stall_limit_ms_ = 0;
};

}  // namespace ablate::scheduler::pg
