// The worker's own Prometheus metrics (service health, low cardinality: no job ids in labels).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace httplib {
class Server;
}

namespace ablate::worker {

class WorkerMetrics {
 public:
  void JobFinished(const std::string& outcome);  // succeeded | failed | cancelled | lease_lost | interrupted
  std::atomic<int64_t> child_running{0};
  std::atomic<int64_t> heartbeats{0};
  std::atomic<int64_t> heartbeat_failures{0};
  std::atomic<int64_t> replica_switches{0};     // ReplicaRouter moves
  std::atomic<int64_t> heartbeat_failovers{0};  // renewed by another replica after "database down" from the first
  std::atomic<int64_t> points_sent{0};
  std::atomic<int64_t> points_dropped{0};
  std::atomic<int64_t> malformed_event_lines{0};
  std::atomic<int64_t> self_fences{0};
  std::atomic<int64_t> hangs_detected{0};
  std::atomic<int64_t> checkpoint_verify_failures{0};
  std::atomic<int64_t> checkpoints_reported{0};
  std::atomic<int64_t> drains{0};
  std::atomic<int64_t> quarantined{0};

  // Prometheus text exposition format 0.0.4.
  std::string Render() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, int64_t> jobs_;
};

// Serves GET /metrics on host:port (port 0: any free port) from a background thread.
class MetricsServer {
 public:
  explicit MetricsServer(const WorkerMetrics* metrics);
  ~MetricsServer();
  // Returns the bound port, or -1 with *error.
  int Start(const std::string& host_port, std::string* error);

 private:
  const WorkerMetrics* metrics_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace ablate::worker
