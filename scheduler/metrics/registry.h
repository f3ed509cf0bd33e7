// A tiny Prometheus registry (text exposition format 0.0.4): counters, gauges and histograms with labels.
// Debian has no prometheus-cpp; this is the subset the scheduler needs. Thread-safe.
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace ablate::scheduler::metrics {

using Labels = std::vector<std::string>;  // values, in the family's label-name order

class Family {
 public:
  enum class Type { kCounter, kGauge, kHistogram };
  Family(std::string name, std::string help, Type type, std::vector<std::string> label_names,
         std::vector<double> buckets = {});

  void Inc(const Labels& labels = {}, double v = 1);        // counter or gauge
  void Set(const Labels& labels, double v);                 // gauge
  void Observe(const Labels& labels, double v);             // histogram
  // Replaces every series of a gauge at once (values read from the database on each scrape).
  void ReplaceAll(const std::map<Labels, double>& values);
  double Value(const Labels& labels = {}) const;            // for tests
  void Render(std::string* out) const;

 private:
  struct Series {
    double value = 0;
    std::vector<uint64_t> bucket_counts;
    double sum = 0;
    uint64_t count = 0;
  };
  Series& Get(const Labels& labels);

  const std::string name_, help_;
  const Type type_;
  const std::vector<std::string> label_names_;
  const std::vector<double> buckets_;
  mutable std::mutex mu_;
  std::map<Labels, Series> series_;
};

class Registry {
 public:
  Family* Counter(const std::string& name, const std::string& help, std::vector<std::string> labels = {});
  Family* Gauge(const std::string& name, const std::string& help, std::vector<std::string> labels = {});
  Family* Histogram(const std::string& name, const std::string& help, std::vector<std::string> labels,
                    std::vector<double> buckets);
  std::string Render() const;

 private:
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_;
};

// Every scheduler metric, in one place.
struct SchedulerMetrics {
  explicit SchedulerMetrics(Registry* r);
  Family* jobs;                   // ablate_jobs{state}
  Family* sweeps;                 // ablate_sweeps{state}
  Family* leases_granted;         // ablate_scheduler_leases_granted_total
  Family* leases_expired;         // ablate_scheduler_leases_expired_total
  Family* points_ingested;        // ablate_scheduler_metric_points_ingested_total
  Family* rpc_total;              // ablate_scheduler_rpc_total{method,code}
  Family* rpc_duration;           // ablate_scheduler_rpc_duration_seconds{method}
  Family* workers_alive;          // ablate_workers_alive
  Family* job_latest;             // ablate_job_latest{job_id,metric}, running jobs only, capped
  Family* store_errors;           // ablate_scheduler_store_errors_total{op}
  Family* fenced_writes;          // ablate_scheduler_fenced_writes_total{method}
  Family* dispatch_latency;       // ablate_scheduler_dispatch_latency_seconds
  Family* checkpoints;            // ablate_scheduler_checkpoints_recorded_total
  Family* attempts_finished;      // ablate_scheduler_attempts_finished_total{outcome,failure_class}
  Family* retries;                // ablate_scheduler_retries_total{failure_class}
  Family* quarantines;            // ablate_scheduler_worker_quarantines_total
  Family* gangs_unschedulable;    // ablate_scheduler_gangs_unschedulable_total
  Family* workers_quarantined;    // ablate_workers_quarantined
  Family* is_leader;              // ablate_scheduler_is_leader
  Family* leader_epoch;           // ablate_scheduler_leader_epoch
  Family* schedule_fires;         // ablate_scheduler_schedule_fires_total
  Family* store_up;               // ablate_scheduler_store_up
  Family* store_latency;          // ablate_scheduler_store_probe_seconds
};

}  // namespace ablate::scheduler::metrics
