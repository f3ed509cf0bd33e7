#include "scheduler/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <httplib.h>

#include "absl/status/status.h"
#include "scheduler/rpc/sweep_service.h"
#include "scheduler/rpc/worker_service.h"
#include "scheduler/store/pg/migrate.h"
#include "scheduler/store/pg/leader.h"
#include "scheduler/store/pg/pg_job_store.h"
#include "scheduler/sweep/cron.h"
#include "scheduler/sweep/grid.h"
#include "scheduler/util/call_budget.h"
#include "scheduler/util/log.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>

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

  RetryPolicy policy;
  policy.max_failed_attempts = config.max_attempts;
  policy.backoff_base_ms = config.retry_backoff_ms;
  policy.backoff_max_ms = std::max(config.retry_backoff_ms, config.retry_backoff_max_ms);
  policy.quarantine_after = config.quarantine_after;
  policy.quarantine_s = config.quarantine_s;
  auto parsed = RetryPolicy::Parse(config.retry_policy, policy);
  if (!parsed.ok()) return parsed.status();

  // Security: TLS when a certificate is given; workers' client certificates verified against tls_client_ca.
  auto read_file = [](const std::string& path, const char* flag) -> absl::StatusOr<std::string> {
    std::ifstream in(path);
    if (!in) return absl::InvalidArgumentError(std::string(flag) + " " + path + ": cannot read");
    std::stringstream ss;
    ss << in.rdbuf();
    if (ss.str().find("-----BEGIN ") == std::string::npos) {
      return absl::InvalidArgumentError(std::string(flag) + " " + path + ": not a PEM file");
    }
    return ss.str();
  };
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  std::shared_ptr<grpc::experimental::FileWatcherCertificateProvider> tls_provider;
  const bool token_auth = !config.tokens_file.empty() || !config.token_signing_key_file.empty();
  if (!config.tls_cert.empty() || !config.tls_key.empty()) {
    if (config.tls_cert.empty() || config.tls_key.empty()) {
      return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
    }
    if (config.tls_reload_interval_s < 0) return absl::InvalidArgumentError("--tls_reload_interval_s: must be >= 0");
    // Read once here in any case, so that a wrong path fails the start instead of every handshake.
    auto cert = read_file(config.tls_cert, "--tls_cert");
    if (!cert.ok()) return cert.status();
    auto key = read_file(config.tls_key, "--tls_key");
    if (!key.ok()) return key.status();
    absl::StatusOr<std::string> ca = std::string();
    if (!config.tls_client_ca.empty()) {
      ca = read_file(config.tls_client_ca, "--tls_client_ca");
      if (!ca.ok()) return ca.status();
    }
    // Workers must present a certificate signed by the client CA; people authenticate with bearer tokens instead,
    // so a certificate is verified when present (an expired one, or one of an unknown CA, fails the handshake)
    // rather than required of every connection.
    if (config.tls_reload_interval_s > 0) {
      // Hot reload (F23): gRPC's file watcher re-reads the key, certificate and client CA bundle every interval;
      // new handshakes use what it read last, established connections are left alone.
      tls_provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
          config.tls_key, config.tls_cert, config.tls_client_ca,
          static_cast<unsigned int>(config.tls_reload_interval_s));
      grpc::experimental::TlsServerCredentialsOptions opts(tls_provider);
      opts.watch_identity_key_cert_pairs();
      if (!config.tls_client_ca.empty()) {
        opts.watch_root_certs();
        opts.set_cert_request_type(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
      } else {
        opts.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
      }
      creds = grpc::experimental::TlsServerCredentials(opts);
    } else {
      grpc::SslServerCredentialsOptions opts(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
      if (!config.tls_client_ca.empty()) {
        opts.pem_root_certs = *ca;
        opts.client_certificate_request = GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
      }
      opts.pem_key_cert_pairs.push_back({*key, *cert});
      creds = grpc::SslServerCredentials(opts);
    }
    if (!creds) return absl::InvalidArgumentError("cannot make the TLS server credentials (see the log above)");
  } else if (token_auth || !config.tls_client_ca.empty()) {
    return absl::InvalidArgumentError("--tokens_file/--token_signing_key_file/--tls_client_ca need TLS (--tls_cert, "
                                      "--tls_key): bearer tokens must never travel in plaintext");
  }
  if (!config.revoked_tokens_file.empty() && config.token_signing_key_file.empty()) {
    return absl::InvalidArgumentError("--revoked_tokens_file lists ids of signed tokens: it needs "
                                      "--token_signing_key_file");
  }
  bool auth_on = token_auth || !config.tls_client_ca.empty();
  rpc::AuthOptions auth_opts;
  auth_opts.enabled = auth_on;
  auth_opts.tokens_file = config.tokens_file;
  auth_opts.revoked_tokens_file = config.revoked_tokens_file;
  auth_opts.signing_key_file = config.token_signing_key_file;
  auto auth = rpc::Authenticator::Create(auth_opts);
  if (!auth.ok()) return auth.status();
  if (!auth_on) LogWarn("authentication_disabled", {{"hint", "pass --tls_cert/--tls_key with --token_signing_key_file "
                                                              "and --tls_client_ca in production"}});
  if (!config.tokens_file.empty()) {
    LogInfo("static_tokens_enabled", {{"note", "--tokens_file holds legacy static bearer tokens that never expire; "
                                               "prefer signed short-lived tokens (--token_signing_key_file)"}});
  }

  {
    std::stringstream ks(config.extra_train_keys);
    for (std::string k; std::getline(ks, k, ',');) {
      if (!k.empty()) sweep::ExtraTrainKeys().insert(k);
    }
  }
  std::unique_ptr<SchedulerServer> s(new SchedulerServer(config));
  if (s->config_.replica_id.empty()) {
    char host[256] = {0};
    ::gethostname(host, sizeof host - 1);
    s->config_.replica_id = std::string(host) + "-" + std::to_string(::getpid());
  }
  s->auth_ = std::move(*auth);
  s->tls_provider_ = tls_provider;
  auto pg_store = std::make_unique<pg::PgJobStore>(config.db_dsn, config.db_pool_size);
  pg_store->set_gang_form_timeout_s(config.gang_form_timeout_s);
  pg_store->set_gang_unformable_after(config.gang_unformable_after);
  // An expiry pass held up longer than this reaps nothing (F17/F18): the holders could not renew meanwhile either.
  pg_store->set_reap_stall_limit_ms(std::max(1000, config.lease_ttl_s * 1000 / 4));
  s->store_ = std::move(pg_store);
  s->metrics_ = std::make_unique<metrics::SchedulerMetrics>(&s->registry_);
  s->ctx_ = rpc::ServiceContext{};
  s->ctx_.store = s->store_.get();
  s->ctx_.metrics = s->metrics_.get();
  s->ctx_.lease_ttl_s = config.lease_ttl_s;
  s->ctx_.max_attempts = config.max_attempts;
  s->ctx_.max_cells = config.max_cells;
  s->ctx_.shutting_down = &s->shutting_down_;
  s->ctx_.policy = *parsed;
  s->ctx_.heartbeat_interval_ms =
      config.heartbeat_interval_ms > 0 ? config.heartbeat_interval_ms : std::max(100, config.lease_ttl_s * 1000 / 6);
  s->ctx_.progress_timeout_ms = config.progress_timeout_s * 1000;
  s->ctx_.max_stream_s = config.max_stream_s;
  s->ctx_.max_metric_batch_bytes = config.max_metric_batch_bytes;
  s->ctx_.auth = s->auth_.get();
  s->ctx_.max_rpc_ms = config.max_rpc_ms;
  s->ctx_.store_unavailable_at_ms = &s->store_unavailable_at_ms_;
  s->client_gate_ = std::make_unique<CallGate>(
      config.max_client_calls < 0 ? std::max(1, config.db_pool_size / 2) : config.max_client_calls);
  s->ctx_.client_gate = s->client_gate_.get();
  s->sweep_service_ = std::make_unique<rpc::SweepServiceImpl>(&s->ctx_);
  s->worker_service_ = std::make_unique<rpc::WorkerServiceImpl>(&s->ctx_);

  grpc::EnableDefaultHealthCheckService(true);
  if (!auth_on) grpc::reflection::InitProtoReflectionServerBuilderPlugin();  // no unauthenticated schema browsing
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config.listen, creds, &s->grpc_port_);
  builder.SetMaxReceiveMessageSize(config.max_message_bytes);
  builder.SetMaxSendMessageSize(config.max_send_bytes);
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
      // Healthy = the database answers, within 2 s.
      CallBudget budget(std::chrono::milliseconds(2000));
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

  s->reaper_thread_ = std::thread([self = s.get()] { self->LeaderLoop(); });
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

// One thread per replica: readiness probe, leader election, and — only while leading — the lease reaper and the
// cron. The reaper waits one lease TTL after this replica becomes leader (a restart, a failover, or the database
// coming back, which drops the lock session), and one TTL after this replica last saw the store unavailable (a
// call answered UNAVAILABLE, a failed probe, an expiry pass held up by a stall: a locked table, F17; a half-open
// connection, F18): leases that could not be renewed meanwhile get a grace period instead of being reaped at once
// (F09, F14). Every step has a time budget (CallBudget), so a database that does not answer never stalls the loop:
// readiness turns NOT_SERVING within about 2 s, and a leader whose lock session does not answer stops leading.
void SchedulerServer::LeaderLoop() {
  using std::chrono::milliseconds;
  pg::LeaderElector elector(config_.db_dsn, config_.replica_id);
  const auto ttl = std::chrono::seconds(config_.lease_ttl_s);
  auto reap_after = std::chrono::steady_clock::now();
  bool paused = false;  // reaping held back for a store outage (logged once per pause)
  auto note_unavailable = [this] { store_unavailable_at_ms_.store(rpc::SteadyNowMs()); };
  std::unique_lock<std::mutex> lock(mu_);
  while (!shutting_down_.load()) {
    cv_.wait_for(lock, std::chrono::milliseconds(config_.reaper_interval_ms));
    if (shutting_down_.load()) break;
    lock.unlock();
    // Readiness: gRPC health says NOT_SERVING while the database does not answer (within 2 s).
    auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<int64_t> probe;
    {
      CallBudget budget(milliseconds(2000));
      probe = store_->CountWorkersSeenWithin(1);
    }
    metrics_->store_latency->Observe({}, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    metrics_->store_up->Set({}, probe.ok() ? 1 : 0);
    if (!probe.ok()) note_unavailable();
    if (grpc_server_ && grpc_server_->GetHealthCheckService()) {
      grpc_server_->GetHealthCheckService()->SetServingStatus(probe.ok());
    }
    bool became = false, lost = false;
    std::string err;
    int64_t epoch;
    {
      CallBudget budget(milliseconds(std::clamp(config_.lease_ttl_s * 500, 1000, 5000)));
      epoch = elector.Tick(&became, &lost, &err);
    }
    leader_epoch_ = epoch;
    metrics_->is_leader->Set({}, epoch > 0 ? 1 : 0);
    metrics_->leader_epoch->Set({}, static_cast<double>(epoch));
    if (became) {
      reap_after = std::chrono::steady_clock::now() + std::chrono::seconds(config_.lease_ttl_s);
      LogInfo("leader_acquired", {{"epoch", std::to_string(epoch)}, {"replica", config_.replica_id},
                                  {"reaper_grace_s", std::to_string(config_.lease_ttl_s)}});
    }
    if (lost) LogWarn("leader_lost", {{"replica", config_.replica_id}, {"error", err}});
    const auto now = std::chrono::steady_clock::now();
    const int64_t unavailable_ms = store_unavailable_at_ms_.load();
    const auto grace_until = unavailable_ms > 0
                                 ? std::chrono::steady_clock::time_point(milliseconds(unavailable_ms)) + ttl
                                 : std::chrono::steady_clock::time_point::min();
    if (epoch > 0 && now < grace_until && !paused) {
      paused = true;
      LogInfo("reaping_paused", {{"reason", "store unavailable"}, {"grace_s", std::to_string(config_.lease_ttl_s)}});
    }
    if (epoch > 0 && now >= reap_after && now >= grace_until) {
      if (paused) {
        paused = false;
        LogInfo("reaping_resumed", {{"epoch", std::to_string(epoch)}});
      }
      absl::StatusOr<ExpireResult> r;
      {
        CallBudget budget(std::chrono::seconds(10));
        r = store_->Expire(ctx_.policy, epoch);
      }
      if (!r.ok()) {
        if (absl::IsUnavailable(r.status())) note_unavailable();
        metrics_->store_errors->Inc({"expire_leases"});
        LogWarn("expire_leases_failed", {{"error", r.status().ToString()}});
      } else if (int n = r->requeued + r->failed + r->cancelled; n > 0) {
        metrics_->leases_expired->Inc({}, n);
        metrics_->retries->Inc({"infra"}, r->requeued);
        LogInfo("leases_expired", {{"requeued", std::to_string(r->requeued)}, {"failed", std::to_string(r->failed)},
                                   {"cancelled", std::to_string(r->cancelled)}, {"epoch", std::to_string(epoch)}});
        for (const auto& w : r->quarantined_workers) {
          metrics_->quarantines->Inc();
          LogWarn("worker_quarantined", {{"worker_id", w}, {"after", "lease expired"}});
        }
      }
    }
    if (epoch > 0) {
      CallBudget budget(std::chrono::seconds(10));
      FireSchedules();
    }
    lock.lock();
  }
  lock.unlock();
  elector.Release();
  lock.lock();
}

// Missed-run policy: when several due times of a schedule have passed (the scheduler was down), only the most
// recent one fires; the older ones are counted as skipped. Each (schedule, due time) fires at most once: the
// sweep's idempotency key is derived from the pair, and schedule_runs has it as its primary key.
void SchedulerServer::FireSchedules() {
  auto due = store_->DueSchedules(config_.now_override_unix_ms);
  if (!due.ok()) {
    metrics_->store_errors->Inc({"due_schedules"});
    return;
  }
  int64_t now_ms = config_.now_override_unix_ms > 0
                       ? config_.now_override_unix_ms
                       : std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch()).count();
  for (const auto& sch : *due) {
    auto cron = sweep::ParseCron(sch.cron);
    if (!cron.ok()) {
      LogWarn("schedule_invalid", {{"schedule_id", std::to_string(sch.id)}, {"error", cron.status().ToString()}});
      continue;
    }
    int64_t fire = sch.next_due_unix_ms, next = -1;
    int32_t skipped = 0;
    for (int i = 0; i < 1000000; ++i) {
      next = sweep::CronNext(*cron, fire / 1000);
      if (next < 0 || next * 1000 > now_ms) break;
      fire = next * 1000;
      ++skipped;
    }
    if (next < 0) next = fire / 1000 + int64_t{10} * 366 * 86400;  // never again (in practice)
    int64_t sweep_id = 0;
    auto exp = sweep::ParseAndExpand(sch.spec_yaml, config_.max_cells);
    if (!exp.ok()) {
      LogWarn("schedule_spec_invalid", {{"schedule_id", std::to_string(sch.id)}, {"error", exp.status().ToString()}});
    } else {
      NewSweep ns;
      ns.name = exp->spec.name;
      ns.spec_yaml = sch.spec_yaml;
      ns.idempotency_key = "schedule:" + std::to_string(sch.id) + ":" + std::to_string(fire);
      ns.spec_hash = exp->spec_hash;
      ns.factor_names = exp->factor_names;
      for (const auto& c : exp->cells) {
        ns.jobs.push_back({c.cell_index, c.factors, c.params, c.config_hash, c.total_steps, c.mem_estimate_bytes, c.gpus});
      }
      auto created = store_->CreateSweep(ns);
      if (!created.ok()) {
        LogWarn("schedule_fire_failed", {{"schedule_id", std::to_string(sch.id)},
                                         {"error", created.status().ToString()}});
        continue;  // retried at the next tick; the idempotency key keeps it to one sweep
      }
      sweep_id = created->sweep.id;
    }
    auto rec = store_->RecordScheduleRun(sch.id, fire, sweep_id, sch.next_due_unix_ms, next * 1000, skipped);
    if (rec.ok() && *rec) {
      metrics_->schedule_fires->Inc();
      LogInfo("schedule_fired", {{"schedule_id", std::to_string(sch.id)}, {"due_unix_ms", std::to_string(fire)},
                                 {"sweep_id", std::to_string(sweep_id)}, {"skipped", std::to_string(skipped)}});
    }
  }
}

std::string SchedulerServer::ScrapeMetrics() {
  std::lock_guard<std::mutex> scrape(scrape_mu_);  // one DB refresh at a time
  CallBudget budget(std::chrono::seconds(5));      // a scrape never hangs on the database
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
  if (auto q = store_->CountQuarantinedWorkers(); q.ok()) {
    metrics_->workers_quarantined->Set({}, static_cast<double>(*q));
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
