// ablate-scheduler: `serve` (gRPC + /metrics + lease reaper) and `migrate`.
#include <algorithm>
#include <CLI/CLI.hpp>

#include <csignal>
#include <cstdio>
#include <iostream>
#include <pthread.h>
#include <thread>

#include "scheduler/server.h"
#include "scheduler/store/pg/migrate.h"
#include "scheduler/util/log.h"

using namespace ablate::scheduler;

int main(int argc, char** argv) {
  // Block SIGINT/SIGTERM in every thread (gRPC's included); one thread below waits for them with sigwait.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  CLI::App app{"ablate-scheduler: sweep expansion, job queue, leases and metrics ingest for Ablate"};
  app.require_subcommand(1);
  SchedulerConfig cfg;

  auto* serve = app.add_subcommand("serve", "Serve SweepService and WorkerService over gRPC, /metrics over HTTP");
  serve->add_option("--db", cfg.db_dsn, "libpq DSN of the PostgreSQL database")->envname("ABLATE_DB")->required();
  serve->add_option("--listen", cfg.listen, "gRPC host:port (port 0: pick a free one)")
      ->envname("ABLATE_LISTEN")->capture_default_str();
  serve->add_option("--metrics_listen", cfg.metrics_listen, "HTTP host:port for /metrics and /healthz (0: free port; "
                    "empty: off)")->envname("ABLATE_METRICS_LISTEN")->capture_default_str();
  serve->add_option("--lease_ttl_s", cfg.lease_ttl_s, "seconds a lease lives without a heartbeat")
      ->envname("ABLATE_LEASE_TTL_S")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--max_attempts", cfg.max_attempts, "attempts per job before it stays failed")
      ->envname("ABLATE_MAX_ATTEMPTS")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--db_pool_size", cfg.db_pool_size, "PostgreSQL connections")
      ->envname("ABLATE_DB_POOL_SIZE")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--max_cells", cfg.max_cells, "largest grid a sweep may expand to")
      ->envname("ABLATE_MAX_CELLS")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--heartbeat_interval_ms", cfg.heartbeat_interval_ms,
                    "worker heartbeat interval told to workers (0: lease TTL / 6)")
      ->envname("ABLATE_HEARTBEAT_INTERVAL_MS")->capture_default_str();
  serve->add_option("--reaper_interval_ms", cfg.reaper_interval_ms,
                    "leader tick: lease reaper, cron, readiness probe")
      ->envname("ABLATE_REAPER_INTERVAL_MS")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--progress_timeout_s", cfg.progress_timeout_s,
                    "hang detection: a child with no new step for this long is killed (class hang)")
      ->envname("ABLATE_PROGRESS_TIMEOUT_S")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--gang_form_timeout_s", cfg.gang_form_timeout_s,
                    "a multi-rank job whose gang is not complete this long releases its pending slots and waits as "
                    "long before forming again")
      ->envname("ABLATE_GANG_FORM_TIMEOUT_S")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--gang_unformable_after", cfg.gang_unformable_after,
                    "a multi-rank job fails (class unschedulable) after this many formation deadlines in a row at "
                    "which fewer live workers that fit it were registered than it has ranks; 0: retry forever")
      ->envname("ABLATE_GANG_UNFORMABLE_AFTER")->check(CLI::NonNegativeNumber)->capture_default_str();
  serve->add_option("--retry_policy", cfg.retry_policy,
                    "retries per failure class, e.g. crash=2,hang=2,infra=5,oom=0,diverged=0 (defaults shown)")
      ->envname("ABLATE_RETRY_POLICY");
  serve->add_option("--retry_backoff_ms", cfg.retry_backoff_ms, "first retry backoff for crash/hang (doubles)")
      ->envname("ABLATE_RETRY_BACKOFF_MS")->capture_default_str();
  serve->add_option("--retry_backoff_max_ms", cfg.retry_backoff_max_ms, "backoff cap")
      ->envname("ABLATE_RETRY_BACKOFF_MAX_MS")->capture_default_str();
  serve->add_option("--quarantine_after", cfg.quarantine_after,
                    "quarantine a worker after this many consecutive crash/hang/infra failures (0: never)")
      ->envname("ABLATE_QUARANTINE_AFTER")->capture_default_str();
  serve->add_option("--quarantine_s", cfg.quarantine_s, "quarantine duration")
      ->envname("ABLATE_QUARANTINE_S")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--max_stream_s", cfg.max_stream_s, "streaming calls (WatchSweep, ReportMetrics) end after this")
      ->envname("ABLATE_MAX_STREAM_S")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--max_rpc_ms", cfg.max_rpc_ms,
                    "cap on every RPC handler's time, database work included, whatever deadline the client sent "
                    "(a slow or unreachable database then answers UNAVAILABLE); 0: the per-method defaults "
                    "(Heartbeat 5 s, SubmitSweep/ExtendSweep 30 s, others 10 s; streams per message)")
      ->envname("ABLATE_MAX_RPC_MS")->check(CLI::NonNegativeNumber)->capture_default_str();
  serve->add_option("--max_client_calls", cfg.max_client_calls,
                    "client calls (submit, list, get, compare, cancel, schedules; not watch streams) running at "
                    "once; more wait for a slot up to half their deadline, then get RESOURCE_EXHAUSTED, so workers' "
                    "heartbeats always find a database connection; -1: half of --db_pool_size (at least 1); 0: no "
                    "limit")
      ->envname("ABLATE_MAX_CLIENT_CALLS")->check(CLI::Range(-1, 1 << 20))->capture_default_str();
  serve->add_option("--max_message_bytes", cfg.max_message_bytes, "largest request accepted (RESOURCE_EXHAUSTED above)")
      ->envname("ABLATE_MAX_MESSAGE_BYTES")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--max_metric_batch_bytes", cfg.max_metric_batch_bytes, "largest metric batch")
      ->envname("ABLATE_MAX_METRIC_BATCH_BYTES")->check(CLI::PositiveNumber)->capture_default_str();
  serve->add_option("--extra_train_keys", cfg.extra_train_keys,
                    "comma list of extra `train:` settings passed to the trainer verbatim (custom trainers)")
      ->envname("ABLATE_EXTRA_TRAIN_KEYS");
  serve->add_option("--replica_id", cfg.replica_id, "name of this replica in leader election (default host-pid)")
      ->envname("ABLATE_REPLICA_ID");
  serve->add_option("--tls_cert", cfg.tls_cert, "PEM certificate of the gRPC port (enables TLS)")
      ->envname("ABLATE_TLS_CERT");
  serve->add_option("--tls_key", cfg.tls_key, "PEM private key of --tls_cert")->envname("ABLATE_TLS_KEY");
  serve->add_option("--tls_client_ca", cfg.tls_client_ca,
                    "PEM CA that signs worker client certificates (mTLS; enables authorization)")
      ->envname("ABLATE_TLS_CLIENT_CA");
  serve->add_option("--tls_reload_interval_s", cfg.tls_reload_interval_s,
                    "re-read --tls_cert, --tls_key and --tls_client_ca this often (certificate rotation without a "
                    "restart; new connections use the new files); 0: read them once at start")
      ->envname("ABLATE_TLS_RELOAD_INTERVAL_S")->check(CLI::NonNegativeNumber)->capture_default_str();
  serve->add_option("--token_signing_key_file", cfg.token_signing_key_file,
                    "accept signed short-lived bearer tokens (JWS HS256, `ablate token issue`) verified with these "
                    "keys: one per line, each >= 32 bytes (`ablate token keygen`); re-read when it changes "
                    "(enables authorization)")
      ->envname("ABLATE_TOKEN_SIGNING_KEY_FILE");
  serve->add_option("--revoked_tokens_file", cfg.revoked_tokens_file,
                    "ids (jti) of revoked signed tokens, one per line; re-read when it changes (at most once a second)")
      ->envname("ABLATE_REVOKED_TOKENS_FILE");
  serve->add_option("--tokens_file", cfg.tokens_file,
                    "legacy static bearer tokens (they never expire): lines `<user|admin|worker> <name> <token or "
                    "sha256:hex>`; re-read when it changes (enables authorization)")
      ->envname("ABLATE_TOKENS_FILE");
  bool no_migrate = false;
  serve->add_flag("--no_migrate", no_migrate, "don't apply migrations at startup (refuse to serve if behind)");

  std::string migrate_dsn;
  auto* migrate = app.add_subcommand("migrate", "Apply pending schema migrations and exit");
  migrate->add_option("--db", migrate_dsn, "libpq DSN of the PostgreSQL database")->envname("ABLATE_DB")->required();

  CLI11_PARSE(app, argc, argv);

  if (migrate->parsed()) {
    LogInfo("migrate_start", {{"db", RedactDsn(migrate_dsn)}});
    auto r = pg::Migrate(migrate_dsn);
    if (!r.ok()) {
      LogError("migrate_failed", {{"error", r.status().ToString()}});
      return 1;
    }
    LogInfo("migrate_done", {{"applied", std::to_string(r->applied)},
                             {"schema_version", std::to_string(r->schema_version)}});
    return 0;
  }

  cfg.migrate_on_start = !no_migrate;
  LogInfo("scheduler_starting", {{"db", RedactDsn(cfg.db_dsn)}, {"listen", cfg.listen},
                                 {"metrics_listen", cfg.metrics_listen},
                                 {"lease_ttl_s", std::to_string(cfg.lease_ttl_s)},
                                 {"max_attempts", std::to_string(cfg.max_attempts)},
                                 {"db_pool_size", std::to_string(cfg.db_pool_size)},
                                 {"max_client_calls", cfg.max_client_calls < 0
                                                          ? std::to_string(std::max(1, cfg.db_pool_size / 2))
                                                          : cfg.max_client_calls == 0 ? "unlimited"
                                                                                      : std::to_string(cfg.max_client_calls)},
                                 {"tls", cfg.tls_cert.empty() ? "off" : "on"},
                                 {"client_ca", cfg.tls_client_ca.empty() ? "off" : "on"},
                                 {"tokens_file", cfg.tokens_file.empty() ? "off" : "on"},
                                 {"signed_tokens", cfg.token_signing_key_file.empty() ? "off" : "on"},
                                 {"revoked_tokens_file", cfg.revoked_tokens_file.empty() ? "off" : "on"},
                                 {"tls_reload_interval_s", std::to_string(cfg.tls_reload_interval_s)}});
  auto server = SchedulerServer::Start(cfg);
  if (!server.ok()) {
    LogError("scheduler_start_failed", {{"error", server.status().ToString()}});
    return 1;
  }
  // The one line on stdout: `ablate up` and the tests parse the ports from it.
  std::printf("listening grpc=%s metrics=%s\n", (*server)->grpc_address().c_str(),
              cfg.metrics_listen.empty() ? "off" : (*server)->metrics_address().c_str());
  std::fflush(stdout);
  LogInfo("scheduler_listening", {{"grpc", (*server)->grpc_address()}, {"metrics", (*server)->metrics_address()}});

  std::thread signals([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    LogInfo("shutdown_requested", {{"signal", sig == SIGINT ? "SIGINT" : "SIGTERM"}});
    (*server)->Shutdown();
  });
  (*server)->Wait();
  signals.join();
  LogInfo("scheduler_stopped");
  return 0;
}
