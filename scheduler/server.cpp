#include "scheduler/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <httplib.h>

#include "absl/status/status.h"
#include "scheduler/rpc/sweep_service.h"
#include "scheduler/rpc/worker_service.h"
#include "scheduler/store/pg/migrate.h"
#include "scheduler/store/pg/pg_job_store.h"
#include "scheduler/util/log.h"

namespace ablate::scheduler {

absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& addr) {
  auto colon = addr.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError("address '" + addr + "': expected host:port, e.g. 127.0.0.1:50051");
  }
  std::string host = addr.substr(0, colon), port_s = addr.substr(colon + 1);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  char* end = nullptr;
  long port = std::strtol(port_s.c_str(), &end, 10);
  if (port_s.empty() || *end != '\0' || port < 0 || port > 65535) {
    return absl::InvalidArgumentError("address '" + addr + "': port must be 0..65535, got '" + port_s + "'");
  }
  return std::make_pair(host, static_cast<int>(port));
}

SchedulerServer::SchedulerServer(SchedulerConfig config) : config_(std::move(config)) {}

SchedulerServer::~SchedulerServer() { Shutdown(); }

absl::StatusOr<std::unique_ptr<SchedulerServer>> SchedulerServer::Start(const SchedulerConfig& config) {
  if (config.lease_ttl_s <= 0) return absl::InvalidArgumentError("lease_ttl_s: must be > 0");
  if (config.max_attempts <= 0) return absl::InvalidArgumentError("max_attempts: must be > 0");
  auto grpc_addr = SplitHostPort(config.listen);
  if (!grpc_addr.ok()) return grpc_addr.status();

  if (config.migrate_on_start) {
    auto m = pg::Migrate(config.db_dsn);
    if (!m.ok()) return m.status();
  }
  if (auto st = pg::CheckSchemaCurrent(config.db_dsn); !st.ok()) return st;

  std::unique_ptr<SchedulerServer> s(new SchedulerServer(config));
  s->store_ = std::make_unique<pg::PgJobStore>(config.db_dsn, config.db_pool_size);
  s->metrics_ = std::make_unique<metrics::SchedulerMetrics>(&s->registry_);
  s->ctx_ = rpc::ServiceContext{s->store_.get(), s->metrics_.get(), config.lease_ttl_s, config.max_attempts,
                                config.max_cells, &s->shutting_down_};
  s->sweep_service_ = std::make_unique<rpc::SweepServiceImpl>(&s->ctx_);
  s->worker_service_ = std::make_unique<rpc::WorkerServiceImpl>(&s->ctx_);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config.listen, grpc::InsecureServerCredentials(), &s->grpc_port_);
  builder.SetMaxReceiveMessageSize(config.max_message_bytes);
  builder.SetMaxSendMessageSize(config.max_message_bytes);
  builder.RegisterService(s->sweep_service_.get());
  builder.RegisterService(s->worker_service_.get());
  s->grpc_server_ = builder.BuildAndStart();
  if (!s->grpc_server_ || s->grpc_port_ == 0) {
    return absl::UnavailableError("cannot listen for gRPC on " + config.listen + " (address in use or invalid?)");
  }

  if (!config.metrics_listen.empty()) {
    auto http_addr = SplitHostPort(config.metrics_listen);
    if (!http_addr.ok()) return http_addr.status();
    s->http_ = std::make_unique<httplib::Server>();
    SchedulerServer* self = s.get();
    s->http_->Get("/metrics", [self](const httplib::Request&, httplib::Response& res) {
      res.set_content(self->ScrapeMetrics(), "text/plain; version=0.0.4; charset=utf-8");
    });
    s->http_->Get("/healthz", [self](const httplib::Request&, httplib::Response& res) {
      // Healthy = the database answers.
      auto c = self->store_->CountWorkersSeenWithin(1);
      res.status = c.ok() ? 200 : 503;
      res.set_content(c.ok() ? "ok\n" : "database unavailable: " + std::string(c.status().message()) + "\n",
                      "text/plain");
    });
    int port = http_addr->second == 0 ? s->http_->bind_to_any_port(http_addr->first)
                                      : (s->http_->bind_to_port(http_addr->first, http_addr->second)
                                             ? http_addr->second : -1);
    if (port <= 0) return absl::UnavailableError("cannot listen for HTTP on " + config.metrics_listen);
    s->metrics_port_ = port;
    s->http_thread_ = std::thread([self] { self->http_->listen_after_bind(); });
  }

  s->reaper_thread_ = std::thread([self = s.get()] { self->ReaperLoop(); });
  return s;
}

std::string SchedulerServer::grpc_address() const {
  auto hp = SplitHostPort(config_.listen);
  return (hp.ok() ? hp->first : "") + ":" + std::to_string(grpc_port_);
}

std::string SchedulerServer::metrics_address() const {
  auto hp = SplitHostPort(config_.metrics_listen);
  return (hp.ok() ? hp->first : "") + ":" + std::to_string(metrics_port_);
}

void SchedulerServer::ReaperLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!shutting_down_.load()) {
    cv_.wait_for(lock, std::chrono::milliseconds(config_.reaper_interval_ms));
    if (shutting_down_.load()) break;
    lock.unlock();
    auto r = store_->ExpireLeases(config_.max_attempts);
    if (!r.ok()) {
      metrics_->store_errors->Inc({"expire_leases"});
      LogWarn("expire_leases_failed", {{"error", r.status().ToString()}});
    } else if (int n = r->requeued + r->failed + r->cancelled; n > 0) {
      metrics_->leases_expired->Inc({}, n);
      LogInfo("leases_expired", {{"requeued", std::to_string(r->requeued)}, {"failed", std::to_string(r->failed)},
                                 {"cancelled", std::to_string(r->cancelled)}});
    }
    lock.lock();
  }
}

std::string SchedulerServer::ScrapeMetrics() {
  std::lock_guard<std::mutex> scrape(scrape_mu_);  // one DB refresh at a time
  if (auto jobs = store_->CountJobsByState(); jobs.ok()) {
    std::map<metrics::Labels, double> v;
    for (JobState s : kAllJobStates) v[{std::string(JobStateName(s))}] = 0;  // every state, zero-filled
    for (const auto& [k, n] : *jobs) v[{k}] = static_cast<double>(n);
    metrics_->jobs->ReplaceAll(v);
  } else {
    metrics_->store_errors->Inc({"count_jobs"});
  }
  if (auto sweeps = store_->CountSweepsByState(); sweeps.ok()) {
    std::map<metrics::Labels, double> v;
    for (SweepState s : kAllSweepStates) v[{std::string(SweepStateName(s))}] = 0;
    for (const auto& [k, n] : *sweeps) v[{k}] = static_cast<double>(n);
    metrics_->sweeps->ReplaceAll(v);
  } else {
    metrics_->store_errors->Inc({"count_sweeps"});
  }
  if (auto w = store_->CountWorkersSeenWithin(2 * config_.lease_ttl_s); w.ok()) {
    metrics_->workers_alive->Set({}, static_cast<double>(*w));
  }
  // job_id labels only for running jobs and at most max_job_series series: bounded cardinality.
  if (auto latest = store_->LatestMetricsOfRunningJobs(config_.max_job_series); latest.ok()) {
    std::map<metrics::Labels, double> v;
    for (const auto& m : *latest) v[{std::to_string(m.job_id), m.name}] = m.value;
    metrics_->job_latest->ReplaceAll(v);
  }
  return registry_.Render();
}

void SchedulerServer::Shutdown() {
  if (shutdown_started_.exchange(true)) {  // a second caller waits for the first to finish
    Wait();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_.store(true);
    cv_.notify_all();
  }
  if (grpc_server_) grpc_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  if (http_) http_->stop();
  if (http_thread_.joinable()) http_thread_.join();
  if (reaper_thread_.joinable()) reaper_thread_.join();
  if (grpc_server_) grpc_server_->Wait();
  std::lock_guard<std::mutex> lock(mu_);
  stopped_ = true;
  cv_.notify_all();
}

void SchedulerServer::Wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return stopped_; });
}

}  // namespace ablate::scheduler
