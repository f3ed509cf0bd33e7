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

  absl::StatusOr<CreateSweepResult> CreateSweep(const NewSweep& sweep) override;
  absl::StatusOr<SweepRecord> GetSweep(int64_t sweep_id) override;
  absl::StatusOr<std::vector<SweepRecord>> ListSweeps(int32_t limit) override;
  absl::StatusOr<int32_t> CancelSweep(int64_t sweep_id) override;
  absl::StatusOr<std::vector<JobRecord>> ListJobs(int64_t sweep_id) override;
  absl::StatusOr<JobRecord> GetJob(int64_t job_id) override;
  absl::StatusOr<std::map<int64_t, double>> MaxMetric(int64_t sweep_id, const std::string& metric) override;

  absl::Status UpsertWorker(const WorkerInfo& worker) override;
  absl::StatusOr<std::optional<LeaseGrant>> LeaseNextJob(const std::string& worker_id, int lease_ttl_s) override;
  absl::StatusOr<HeartbeatResult> Heartbeat(const std::string& worker_id, const Lease& lease, int64_t step,
                                            int lease_ttl_s) override;
  absl::StatusOr<AppendMetricsResult> AppendMetrics(const Lease& lease,
                                                    const std::vector<MetricSample>& points) override;
  absl::Status RecordCheckpoint(const Lease& lease, int64_t step, const std::string& path) override;
  absl::StatusOr<JobState> CompleteJob(const Lease& lease, Outcome outcome, FailureClass failure_class,
                                       const std::string& message, int32_t exit_code, int max_attempts) override;
  absl::StatusOr<ExpireResult> ExpireLeases(int max_attempts) override;

  absl::StatusOr<std::map<std::string, int64_t>> CountJobsByState() override;
  absl::StatusOr<std::map<std::string, int64_t>> CountSweepsByState() override;
  absl::StatusOr<int64_t> CountWorkersSeenWithin(int seconds) override;
  absl::StatusOr<std::vector<RunningJobMetric>> LatestMetricsOfRunningJobs(int max_series) override;

 private:
  PgPool pool_;
};

}  // namespace ablate::scheduler::pg
