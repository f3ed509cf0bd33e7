#include "scheduler/metrics/registry.h"

#include <cmath>
#include <charconv>
#include <cstdio>

namespace ablate::scheduler::metrics {
namespace {

std::string Escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string Fmt(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[40];
  auto res = std::to_chars(buf, buf + sizeof buf, v);  // shortest text that round-trips: 0.1, not 0.10000000000000001
  return std::string(buf, res.ptr);
}

std::string LabelText(const std::vector<std::string>& names, const Labels& values, const std::string& extra = "") {
  std::string s;
  for (size_t i = 0; i < names.size() && i < values.size(); ++i) {
    s += (s.empty() ? "" : ",") + names[i] + "=\"" + Escape(values[i]) + "\"";
  }
  if (!extra.empty()) s += (s.empty() ? "" : ",") + extra;
  return s.empty() ? "" : "{" + s + "}";
}

}  // namespace

Family::Family(std::string name, std::string help, Type type, std::vector<std::string> label_names,
               std::vector<double> buckets)
    : name_(std::move(name)), help_(std::move(help)), type_(type), label_names_(std::move(label_names)),
      buckets_(std::move(buckets)) {}

Family::Series& Family::Get(const Labels& labels) {
  auto [it, inserted] = series_.try_emplace(labels);
  if (inserted && type_ == Type::kHistogram) it->second.bucket_counts.assign(buckets_.size(), 0);
  return it->second;
}

void Family::Inc(const Labels& labels, double v) {
  std::lock_guard<std::mutex> lock(mu_);
  Get(labels).value += v;
}

void Family::Set(const Labels& labels, double v) {
  std::lock_guard<std::mutex> lock(mu_);
  Get(labels).value = v;
}

void Family::Observe(const Labels& labels, double v) {
  std::lock_guard<std::mutex> lock(mu_);
  Series& s = Get(labels);
  for (size_t i = 0; i < buckets_.size(); ++i) {
    if (v <= buckets_[i]) ++s.bucket_counts[i];  // stored per bucket; made cumulative when rendered
  }
  s.sum += v;
  ++s.count;
}

void Family::ReplaceAll(const std::map<Labels, double>& values) {
  std::lock_guard<std::mutex> lock(mu_);
  series_.clear();
  for (const auto& [l, v] : values) series_[l].value = v;
}

double Family::Value(const Labels& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = series_.find(labels);
  return it == series_.end() ? 0 : it->second.value;
}

void Family::Render(std::string* out) const {
  const char* type = type_ == Type::kCounter ? "counter" : type_ == Type::kGauge ? "gauge" : "histogram";
  *out += "# HELP " + name_ + " " + help_ + "\n# TYPE " + name_ + " " + type + "\n";
  std::lock_guard<std::mutex> lock(mu_);
  // An unlabelled counter or gauge is always shown, at 0 before its first change.
  if (series_.empty() && label_names_.empty() && type_ != Type::kHistogram) *out += name_ + " 0\n";
  for (const auto& [labels, s] : series_) {
    if (type_ != Type::kHistogram) {
      *out += name_ + LabelText(label_names_, labels) + " " + Fmt(s.value) + "\n";
      continue;
    }
    for (size_t i = 0; i < buckets_.size(); ++i) {
      // bucket_counts[i] already counts every observation <= buckets_[i], i.e. it is cumulative.
      *out += name_ + "_bucket" + LabelText(label_names_, labels, "le=\"" + Fmt(buckets_[i]) + "\"") + " " +
              std::to_string(s.bucket_counts[i]) + "\n";
    }
    *out += name_ + "_bucket" + LabelText(label_names_, labels, "le=\"+Inf\"") + " " + std::to_string(s.count) + "\n";
    *out += name_ + "_sum" + LabelText(label_names_, labels) + " " + Fmt(s.sum) + "\n";
    *out += name_ + "_count" + LabelText(label_names_, labels) + " " + std::to_string(s.count) + "\n";
  }
}

Family* Registry::Counter(const std::string& name, const std::string& help, std::vector<std::string> labels) {
  std::lock_guard<std::mutex> lock(mu_);
  families_.push_back(std::make_unique<Family>(name, help, Family::Type::kCounter, std::move(labels)));
  return families_.back().get();
}

Family* Registry::Gauge(const std::string& name, const std::string& help, std::vector<std::string> labels) {
  std::lock_guard<std::mutex> lock(mu_);
  families_.push_back(std::make_unique<Family>(name, help, Family::Type::kGauge, std::move(labels)));
  return families_.back().get();
}

Family* Registry::Histogram(const std::string& name, const std::string& help, std::vector<std::string> labels,
                            std::vector<double> buckets) {
  std::lock_guard<std::mutex> lock(mu_);
  families_.push_back(
      std::make_unique<Family>(name, help, Family::Type::kHistogram, std::move(labels), std::move(buckets)));
  return families_.back().get();
}

std::string Registry::Render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& f : families_) f->Render(&out);
  return out;
}

SchedulerMetrics::SchedulerMetrics(Registry* r)
    : jobs(r->Gauge("ablate_jobs", "Jobs by state (from the database).", {"state"})),
      sweeps(r->Gauge("ablate_sweeps", "Sweeps by state (from the database).", {"state"})),
      leases_granted(r->Counter("ablate_scheduler_leases_granted_total", "Job leases handed to workers.")),
      leases_expired(r->Counter("ablate_scheduler_leases_expired_total", "Leases that ran out without completion.")),
      points_ingested(r->Counter("ablate_scheduler_metric_points_ingested_total",
                                 "Metric points newly stored (duplicates of retried batches not counted).")),
      rpc_total(r->Counter("ablate_scheduler_rpc_total", "RPCs handled, by method and gRPC status code.",
                           {"method", "code"})),
      rpc_duration(r->Histogram("ablate_scheduler_rpc_duration_seconds", "RPC handling time.", {"method"},
                                {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10})),
      workers_alive(r->Gauge("ablate_workers_alive", "Workers seen within two lease TTLs.")),
      job_latest(r->Gauge("ablate_job_latest", "Latest value of each metric of running jobs (capped series).",
                          {"job_id", "metric"})),
      store_errors(r->Counter("ablate_scheduler_store_errors_total", "Failed store operations.", {"op"})),
      fenced_writes(r->Counter("ablate_scheduler_fenced_writes_total",
                               "Worker writes rejected because their lease was not current (stale epoch/nonce).",
                               {"method"})),
      dispatch_latency(r->Histogram("ablate_scheduler_dispatch_latency_seconds",
                                    "Time from job creation to its first lease.", {},
                                    {0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600})),
      checkpoints(r->Counter("ablate_scheduler_checkpoints_recorded_total", "Checkpoints recorded (fenced).")),
      attempts_finished(r->Counter("ablate_scheduler_attempts_finished_total",
                                   "Attempts reported by workers, by outcome and failure class.",
                                   {"outcome", "failure_class"})),
      retries(r->Counter("ablate_scheduler_retries_total", "Failed attempts re-queued, by failure class.",
                         {"failure_class"})),
      quarantines(r->Counter("ablate_scheduler_worker_quarantines_total", "Workers put into quarantine.")),
      gangs_unschedulable(r->Counter("ablate_scheduler_gangs_unschedulable_total",
                                     "Gang jobs failed because the fleet cannot hold all their ranks (unschedulable).")),
      workers_quarantined(r->Gauge("ablate_workers_quarantined", "Workers currently quarantined.")),
      is_leader(r->Gauge("ablate_scheduler_is_leader", "1 while this replica holds the leader lock.")),
      leader_epoch(r->Gauge("ablate_scheduler_leader_epoch", "Leader term this replica holds (0: follower).")),
      schedule_fires(r->Counter("ablate_scheduler_schedule_fires_total", "Sweeps started by cron schedules.")),
      store_up(r->Gauge("ablate_scheduler_store_up", "1 when the database answered the last readiness probe.")),
      store_latency(r->Histogram("ablate_scheduler_store_probe_seconds", "Database readiness probe round trip.", {},
                                 {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1})) {}

}  // namespace ablate::scheduler::metrics
