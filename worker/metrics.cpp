#include "worker/metrics.h"

#include <cstdio>

#include <httplib.h>

#include <sstream>

namespace ablate::worker {

void WorkerMetrics::JobFinished(const std::string& outcome) {
  std::lock_guard<std::mutex> lk(mu_);
  ++jobs_[outcome];
}

std::string WorkerMetrics::Render() const {
  std::ostringstream os;
  os << "# HELP ablate_worker_jobs_total Job attempts this worker finished, by outcome.\n"
     << "# TYPE ablate_worker_jobs_total counter\n";
  {
    std::lock_guard<std::mutex> lk(mu_);
    // Always show the common outcomes, so rate() works from the first scrape.
    std::map<std::string, int64_t> all = {{"succeeded", 0}, {"failed", 0}, {"cancelled", 0}, {"lease_lost", 0}};
    for (const auto& [k, v] : jobs_) all[k] = v;
    for (const auto& [k, v] : all) os << "ablate_worker_jobs_total{outcome=\"" << k << "\"} " << v << "\n";
  }
  auto one = [&](const char* name, const char* type, const char* help, int64_t v) {
    os << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n" << name << " " << v << "\n";
  };
  one("ablate_worker_child_running", "gauge", "1 while an ablate-train child is running.", child_running.load());
  one("ablate_worker_heartbeats_total", "counter", "Heartbeats acknowledged by the scheduler.", heartbeats.load());
  one("ablate_worker_heartbeat_failures_total", "counter", "Heartbeats that failed.", heartbeat_failures.load());
  one("ablate_worker_heartbeat_failovers_total", "counter",
      "Heartbeats renewed by another scheduler replica after the first answered 'database down'.",
      heartbeat_failovers.load());
  one("ablate_worker_replica_switches_total", "counter",
      "Times the worker's other calls moved to another scheduler replica (after 'database down', or unreachable).",
      replica_switches.load());
  one("ablate_worker_metric_points_sent_total", "counter", "Metric points written to the scheduler stream.",
      points_sent.load());
  one("ablate_worker_metric_points_dropped_total", "counter",
      "Metric points dropped (over the spill cap, lease lost, or refused by the scheduler).", points_dropped.load());
  one("ablate_worker_malformed_event_lines_total", "counter", "Lines on the events pipe that were not valid events.",
      malformed_event_lines.load());
  one("ablate_worker_self_fences_total", "counter",
      "Attempts stopped because the lease could not be renewed within its TTL (monotonic clock).", self_fences.load());
  one("ablate_worker_hangs_detected_total", "counter", "Children killed for making no step progress.",
      hangs_detected.load());
  one("ablate_worker_checkpoint_verify_failures_total", "counter",
      "Checkpoints whose manifest did not verify (not recorded / not resumed from).", checkpoint_verify_failures.load());
  one("ablate_worker_checkpoints_reported_total", "counter", "Verified checkpoints recorded by the scheduler.",
      checkpoints_reported.load());
  one("ablate_worker_drains_total", "counter", "Attempts released because the worker was drained (SIGTERM).",
      drains.load());
  one("ablate_worker_quarantined", "gauge", "1 while the scheduler keeps this worker in quarantine.",
      quarantined.load());
  // GPU state, when nvidia-smi answers (bounded labels: the GPU index).
  if (FILE* f = ::popen("command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=index,utilization.gpu,"
                        "memory.used --format=csv,noheader,nounits 2>/dev/null", "r")) {
    char line[256];
    std::string util, mem;
    while (std::fgets(line, sizeof line, f)) {
      int idx = 0;
      double u = 0, m = 0;
      if (std::sscanf(line, "%d, %lf, %lf", &idx, &u, &m) == 3) {
        util += "ablate_worker_gpu_utilization_ratio{gpu=\"" + std::to_string(idx) + "\"} " + std::to_string(u / 100) + "\n";
        mem += "ablate_worker_gpu_memory_used_bytes{gpu=\"" + std::to_string(idx) + "\"} " +
               std::to_string(static_cast<int64_t>(m * 1024 * 1024)) + "\n";
      }
    }
    ::pclose(f);
    if (!util.empty()) {
      os << "# HELP ablate_worker_gpu_utilization_ratio GPU utilization (nvidia-smi).\n"
         << "# TYPE ablate_worker_gpu_utilization_ratio gauge\n" << util
         << "# HELP ablate_worker_gpu_memory_used_bytes GPU memory in use (nvidia-smi).\n"
         << "# TYPE ablate_worker_gpu_memory_used_bytes gauge\n" << mem;
    }
  }
  return os.str();
}

MetricsServer::MetricsServer(const WorkerMetrics* metrics) : metrics_(metrics) {}

MetricsServer::~MetricsServer() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

int MetricsServer::Start(const std::string& host_port, std::string* error) {
  auto colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    *error = "expected HOST:PORT, got '" + host_port + "'";
    return -1;
  }
  std::string host = host_port.substr(0, colon);
  int port = 0;
  try {
    port = std::stoi(host_port.substr(colon + 1));
  } catch (...) {
    *error = "bad port in '" + host_port + "'";
    return -1;
  }
  server_ = std::make_unique<httplib::Server>();
  server_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_->Render(), "text/plain; version=0.0.4");
  });
  int bound = port == 0 ? server_->bind_to_any_port(host) : (server_->bind_to_port(host, port) ? port : -1);
  if (bound < 0) {
    *error = "cannot listen on " + host_port;
    return -1;
  }
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return bound;
}

}  // namespace ablate::worker
