#include "worker/metrics.h"

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
  one("ablate_worker_metric_points_sent_total", "counter", "Metric points written to the scheduler stream.",
      points_sent.load());
  one("ablate_worker_metric_points_dropped_total", "counter",
      "Metric points dropped (queue full, or undeliverable at job end).", points_dropped.load());
  one("ablate_worker_malformed_event_lines_total", "counter", "Lines on the events pipe that were not valid events.",
      malformed_event_lines.load());
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
