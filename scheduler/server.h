// SchedulerServer: wires store, gRPC services, the lease reaper and the /metrics HTTP endpoint.
// main.cpp and the RPC tests both start it; port 0 picks free ports (read them back with grpc_port()).
#pragma once
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "scheduler/metrics/registry.h"
#include "scheduler/rpc/convert.h"
#include "scheduler/util/call_gate.h"
#include "scheduler/store/job_store.h"

namespace grpc { class Server; }
namespace httplib { class Server; }

namespace ablate::scheduler {

struct SchedulerConfig {
  std::string db_dsn;
  std::string listen = "127.0.0.1:50051";          // gRPC host:port
  std::string metrics_listen = "127.0.0.1:9464";   // HTTP host:port; empty disables
  int lease_ttl_s = 15;
  int max_attempts = 8;                            // failed attempts per job (all classes); preemptions don't count
  int db_pool_size = 8;
  int reaper_interval_ms = 1000;
  int max_cells = 10000;
  int max_message_bytes = 1024 * 1024;             // largest request (a sweep file must fit); responses may be larger
  int max_send_bytes = 64 * 1024 * 1024;
  int max_metric_batch_bytes = 256 * 1024;
  int max_job_series = 256;                        // cap on ablate_job_latest series
  bool migrate_on_start = true;
  int heartbeat_interval_ms = 0;                   // 0: lease TTL / 6 (six heartbeats may be lost)
  int progress_timeout_s = 600;                    // hang detection: no new step for this long
  int gang_form_timeout_s = 120;                   // a gang incomplete this long releases its slots (and waits)
  int gang_unformable_after = 3;                   // ... and fails (unschedulable) after this many such deadlines in
                                                   // a row with too few live workers that fit it; 0: never
  int max_stream_s = 600;                          // streaming calls end after this (clients reconnect)
  int max_rpc_ms = 0;                              // F36: every RPC handler's time (database work included) at most
                                                   // this, whatever the client's deadline; 0: per-method defaults
  int max_client_calls = -1;                       // F13: client calls (SweepService, streams excepted) running at
                                                   // once; -1: half the database pool (at least 1); 0: no limit
  std::string retry_policy;                        // "crash=2,hang=2,infra=5,oom=0,diverged=0" overrides
  int retry_backoff_ms = 10000;
  int retry_backoff_max_ms = 600000;
  int quarantine_after = 3;
  int quarantine_s = 600;
  int64_t now_override_unix_ms = 0;                // tests: the cron "now"
  std::string replica_id;                          // leader-election holder name; default host-pid
  std::string extra_train_keys;                    // comma list of extra train: keys passed through
  // Security: TLS for the gRPC port; client certificates (workers) verified against tls_client_ca; bearer tokens
  // (legacy static ones in tokens_file; signed, short-lived ones verified with token_signing_key_file and
  // revocable by jti in revoked_tokens_file). The three token files are re-read when they change (at most once a
  // second); the certificate, key and client CA files every tls_reload_interval_s (0: read once at start).
  std::string tls_cert, tls_key, tls_client_ca, tokens_file;
  std::string token_signing_key_file, revoked_tokens_file;
  int tls_reload_interval_s = 60;
};

class SchedulerServer {
 public:
  static absl::StatusOr<std::unique_ptr<SchedulerServer>> Start(const SchedulerConfig& config);
  ~SchedulerServer();

  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  std::string grpc_address() const;     // host:port actually bound
  std::string metrics_address() const;
  // Stops accepting RPCs, lets running ones finish (up to a few seconds), stops the reaper and HTTP.
  void Shutdown();
  void Wait();  // until Shutdown() has completed
  JobStore* store() { return store_.get(); }
  metrics::SchedulerMetrics* metrics() { return metrics_.get(); }
  // Refreshes the DB-backed gauges and renders the exposition text (what GET /metrics returns).
  std::string ScrapeMetrics();

 private:
  explicit SchedulerServer(SchedulerConfig config);
  void LeaderLoop();
  void FireSchedules();

  SchedulerConfig config_;
  std::unique_ptr<JobStore> store_;
  metrics::Registry registry_;
  std::unique_ptr<metrics::SchedulerMetrics> metrics_;
  std::atomic<bool> shutting_down_{false};
  std::atomic<bool> shutdown_started_{false};
  // Steady-clock ms when this replica last saw the store unavailable (a call answered UNAVAILABLE, a failed
  // readiness probe, an expiry pass held up by a stall): the reaper gives leases a grace of one TTL after it.
  std::atomic<int64_t> store_unavailable_at_ms_{0};
  std::unique_ptr<CallGate> client_gate_;  // F13: bounds the client calls so workers' calls keep connections
  rpc::ServiceContext ctx_;
  std::unique_ptr<grpc::Service> sweep_service_, worker_service_;
  std::unique_ptr<rpc::Authenticator> auth_;
  std::shared_ptr<void> tls_provider_;  // the certificate file watcher (kept alive with the server)
  int64_t leader_epoch_ = 0;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<httplib::Server> http_;
  std::thread http_thread_, reaper_thread_;
  int grpc_port_ = 0, metrics_port_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopped_ = false;
  std::mutex scrape_mu_;
};

// "host:port" → (host, port); port must be 0..65535.
absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& addr);

}  // namespace ablate::scheduler
