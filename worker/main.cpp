// ablate-worker: node agent. Leases jobs from ablate-scheduler and runs each in an ablate-train child process.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "worker/credentials.h"
#include "worker/metrics.h"
#include "worker/util.h"
#include "worker/worker.h"

namespace {

std::string DefaultTrainBin() {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "ablate-train";
  return (self.parent_path() / "ablate-train").string();
}

std::string DefaultWorkerId() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  return std::string(host) + "-" + std::to_string(::getpid());
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ablate::worker;
  CLI::App app{
      "ablate-worker: leases jobs from ablate-scheduler and runs each one as an ablate-train child process\n"
      "(own process group, events on fd 3, log in <work_dir>/job-<id>/attempt-<n>.log).\n"
      "SIGTERM/SIGINT: drain: stop leasing, SIGTERM the running child (it may checkpoint) and give it --drain_grace_ms,\n"
      "report its checkpoint and release the job as PREEMPTED (re-queued at once, no retry budget spent), exit.\n"
      "A second signal exits at once."};
  std::string scheduler, metrics_listen;
  WorkerOptions opts;
  opts.worker_id = DefaultWorkerId();
  opts.train_bin = DefaultTrainBin();
  opts.data_root = "./data";
  opts.work_dir = "./.ablate/work";
  int poll_ms = 500;
  int kill_grace_ms = 10000;
  app.add_option("--scheduler", scheduler, "Scheduler gRPC address HOST:PORT")->required();
  app.add_option("--worker_id", opts.worker_id, "Stable id of this worker")->capture_default_str();
  app.add_option("--train_bin", opts.train_bin, "The ablate-train binary (default: next to this executable)")
      ->capture_default_str();
  app.add_option("--data_root", opts.data_root, "Directory of prepared datasets (<data_root>/<dataset>)")
      ->capture_default_str();
  app.add_option("--work_dir", opts.work_dir, "Job outputs and logs go to <work_dir>/job-<id>/")->capture_default_str();
  app.add_option("--metrics_listen", metrics_listen, "Serve Prometheus /metrics on HOST:PORT (default: off)");
  app.add_option("--poll_interval_ms", poll_ms, "Wait between LeaseJob calls when no job is runnable")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--max_jobs", opts.max_jobs, "Exit after this many jobs (0: run forever)")->capture_default_str();
  app.add_flag("--once", opts.once, "Ask for one job once, run it if there is one, then exit");
  app.add_option("--rendezvous_host", opts.rendezvous_host,
                 "Host other workers reach this node at, for rank 0 of gang-scheduled jobs (MASTER_ADDR; an IPv4 "
                 "address also becomes ABLATE_DIST_HOST); empty: the hostname")
      ->capture_default_str();
  int64_t spill_mb = 256;
  app.add_option("--metric_spill_max_mb", spill_mb,
                 "Cap of one attempt's on-disk metric spill (<work_dir>/.spill/) while the scheduler is unreachable; "
                 "points over it are dropped and counted")
      ->capture_default_str();
  app.add_option("--kill_grace_ms", kill_grace_ms, "SIGTERM -> SIGKILL grace when stopping a child")
      ->capture_default_str();
  int drain_ms = 60000, progress_ms = 0, startup_ms = 30000, outage_ms = 600000, fail_backoff_ms = 60000;
  SchedulerConnection conn;
  app.add_option("--drain_grace_ms", drain_ms, "SIGTERM -> SIGKILL grace for the child when the worker is drained")
      ->capture_default_str();
  app.add_option("--progress_timeout_ms", progress_ms,
                 "Hang detection when the scheduler sends none: kill a child with no new step for this long (0: off)")
      ->capture_default_str();
  app.add_option("--startup_window_ms", startup_ms,
                 "A child that crashes before its started event within this window is an infra failure")
      ->capture_default_str();
  app.add_option("--store_outage_tolerance_ms", outage_ms,
                 "Keep training while the scheduler reports its database down, up to this long")
      ->capture_default_str();
  app.add_option("--failure_backoff_max_ms", fail_backoff_ms, "Cap of the backoff after consecutive failed attempts")
      ->capture_default_str();
  app.add_option("--gpus", opts.gpus_override, "Advertise these GPUs instead of nvidia-smi's: COUNTxMEMG[:CC], e.g. 2x80G:9.0");
  app.add_option("--tls_ca", conn.tls_ca, "PEM CA that signed the scheduler's certificate (enables TLS)")
      ->envname("ABLATE_TLS_CA");
  app.add_option("--tls_cert", conn.tls_cert, "PEM client certificate of this worker (mTLS; its CN must be --worker_id)")
      ->envname("ABLATE_TLS_CERT");
  app.add_option("--tls_key", conn.tls_key, "PEM private key of --tls_cert")->envname("ABLATE_TLS_KEY");
  app.add_option("--tls_server_name", conn.tls_server_name,
                 "Expected name in the scheduler's certificate (default: host)");
  app.add_option("--tls_reload_interval_s", conn.tls_reload_interval_s,
                 "Re-read --tls_ca, --tls_cert and --tls_key this often; new connections use the replaced files "
                 "(certificate rotation without a restart); 0: read them once at start")
      ->envname("ABLATE_TLS_RELOAD_INTERVAL_S")->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--token_file", conn.token_file,
                 "File with this worker's bearer token: a signed short-lived one (`ablate token issue --role worker "
                 "--subject <worker id>`) or a legacy static one (`ablate certs` writes <worker id>.token); its "
                 "subject / name must be --worker_id. Re-read before a call whenever it changed (an external "
                 "refresher may rotate it; a file that cannot be used keeps the previous token), sent on every RPC, "
                 "never logged; needs --tls_ca")
      ->envname("ABLATE_WORKER_TOKEN_FILE");
  app.add_flag("--allow_insecure_token", conn.allow_insecure_token,
               "Send --token_file's token without TLS too (only behind a TLS-terminating proxy: anyone on the path "
               "can read it)");
  CLI11_PARSE(app, argc, argv);
  opts.drain_grace = std::chrono::milliseconds(drain_ms);
  opts.progress_timeout = std::chrono::milliseconds(progress_ms);
  opts.startup_window = std::chrono::milliseconds(startup_ms);
  opts.store_outage_tolerance = std::chrono::milliseconds(outage_ms);
  opts.failure_backoff_max = std::chrono::milliseconds(std::max(fail_backoff_ms, 500));
  opts.poll_interval = std::chrono::milliseconds(poll_ms);
  opts.metric_spill_max_bytes = static_cast<uint64_t>(std::max<int64_t>(spill_mb, 1)) << 20;
  if (opts.rendezvous_host.empty()) {
    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    opts.rendezvous_host = host;
  }
  opts.kill_grace = std::chrono::milliseconds(kill_grace_ms);
  // The child gets absolute paths: its own cwd is ours, but logs and reports are clearer this way.
  opts.data_root = std::filesystem::absolute(opts.data_root).lexically_normal().string();
  opts.work_dir = std::filesystem::absolute(opts.work_dir).lexically_normal().string();
  if (::access(opts.train_bin.c_str(), X_OK) != 0)
    Log("warning: train binary ", opts.train_bin, " is not executable; jobs will fail as infra errors");

  // Signals are handled on one thread via sigwait; every other thread (gRPC's included) has them blocked.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  Stopper stop;
  std::thread([&stop, sigs] {
    int sig = 0;
    sigwait(&sigs, &sig);
    Log("received ", sig == SIGTERM ? "SIGTERM" : "SIGINT", ": shutting down (again to exit at once)");
    stop.Stop();
    sigwait(&sigs, &sig);
    Log("second signal: exiting now");
    ::_exit(130);
  }).detach();

  WorkerMetrics metrics;
  MetricsServer metrics_server(&metrics);
  if (!metrics_listen.empty()) {
    std::string err;
    int port = metrics_server.Start(metrics_listen, &err);
    if (port < 0) {
      Log("error: --metrics_listen: ", err);
      return 1;
    }
    Log("metrics on http://", metrics_listen.substr(0, metrics_listen.rfind(':')), ":", port, "/metrics");
  }

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  // Several replicas: "10.0.0.1:50051,10.0.0.2:50051" -> one channel that fails over (pick_first).
  conn.target = scheduler;
  if (conn.target.find(',') != std::string::npos && conn.target.find(':') != std::string::npos &&
      conn.target.rfind("ipv4:", 0) != 0 && conn.target.rfind("dns:", 0) != 0) {
    conn.target = "ipv4:" + conn.target;
  }
  std::string auth, err;
  auto channel = BuildSchedulerChannel(conn, args, &auth, &err);
  if (!channel) {
    Log("error: ", err);
    return 2;
  }
  Log("starting ", opts.worker_id, ": scheduler=", scheduler, " auth=", auth, " train_bin=", opts.train_bin,
      " data_root=", opts.data_root, " work_dir=", opts.work_dir);
  // Heartbeats get their own connection: a separate subchannel pool keeps gRPC from sharing the one above.
  grpc::ChannelArguments hb_args = args;
  hb_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  std::string hb_auth;
  auto hb_channel = BuildSchedulerChannel(conn, hb_args, &hb_auth, &err);
  if (!hb_channel) {
    Log("error: ", err);
    return 2;
  }
  // Several replicas: one more heartbeat channel per replica, for a heartbeat that one replica answers "database
  // down" (only its own path to PostgreSQL may be broken; see Worker).
  std::vector<std::shared_ptr<grpc::Channel>> replica_channels, replica_data_channels;
  if (scheduler.find(',') != std::string::npos && scheduler.rfind("dns:", 0) != 0) {
    std::string rest = scheduler;
    if (rest.rfind("ipv4:", 0) == 0) rest = rest.substr(5);
    for (size_t pos = 0; pos <= rest.size();) {
      const size_t comma = std::min(rest.find(',', pos), rest.size());
      SchedulerConnection one = conn;
      one.target = rest.substr(pos, comma - pos);
      pos = comma + 1;
      if (one.target.empty()) continue;
      std::string one_auth;
      auto ch = BuildSchedulerChannel(one, hb_args, &one_auth, &err);
      if (!ch) {
        Log("error: ", err);
        return 2;
      }
      replica_channels.push_back(std::move(ch));
      // The other calls' channel to this replica (shares its connection with `channel`'s when that picked it).
      auto data = BuildSchedulerChannel(one, args, &one_auth, &err);
      if (!data) {
        Log("error: ", err);
        return 2;
      }
      replica_data_channels.push_back(std::move(data));
    }
  }
  Worker worker(opts, channel, &metrics, &stop, hb_channel, replica_channels, replica_data_channels);
  int rc = worker.Run();
  Log("exit");
  return rc;
}
