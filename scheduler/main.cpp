// ablate-scheduler: `serve` (gRPC + /metrics + lease reaper) and `migrate`.
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
                                 {"max_attempts", std::to_string(cfg.max_attempts)}});
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
