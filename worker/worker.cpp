#include "worker/worker.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "worker/argv.h"
#include "worker/checkpoint.h"
#include "worker/child.h"
#include "worker/events.h"
#include "worker/outcome.h"
#include "worker/spill.h"

namespace ablate::worker {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
// ablate-train's exit code when the deadline in --lease_file passed (core/train.h kExitLeaseExpired; docs/contracts.md).
constexpr int kTrainerLeaseExpiredExit = 75;

int64_t MonoMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string Describe(const grpc::Status& s) {
  return std::to_string(static_cast<int>(s.error_code())) + " " + s.error_message();
}

// Lease lost / job gone: the scheduler fences our writes. Stop the child, never report it as completed.
bool IsFenced(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::FAILED_PRECONDITION || s.error_code() == grpc::StatusCode::NOT_FOUND;
}

// <work_dir>/.spill/<worker id>/job-<id>-a<attempt>: one attempt's undelivered metric points (worker/spill.h) and
// its lease (lease.pb), so that a restarted worker can still deliver them. Empty without a work dir.
std::string SpillRoot(const WorkerOptions& o) {
  return o.work_dir.empty() ? std::string() : o.work_dir + "/.spill/" + o.worker_id;
}

MetricSpill::Options SpillOptions(const WorkerOptions& o) {
  MetricSpill::Options so;
  so.max_bytes = o.metric_spill_max_bytes;
  return so;
}

// One ReportMetrics client stream for `points` (chunks of 500), ended by the scheduler's ack. deadline: 0 = the
// RPC timeout.
grpc::Status SendPoints(ReplicaRouter& router, const WorkerOptions& o, const v1::Lease& lease,
                        const std::vector<v1::MetricPoint>& points, size_t chunk,
                        std::chrono::milliseconds deadline = std::chrono::milliseconds(0)) {
  v1::WorkerService::Stub* stub = router.Pick();
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + (deadline.count() > 0 ? deadline : o.rpc_timeout));
  v1::ReportMetricsResponse ack;
  auto writer = stub->ReportMetrics(&ctx, &ack);
  bool ok = true;
  for (size_t i = 0; i < points.size() && ok; i += chunk) {
    v1::MetricBatch mb;
    mb.set_worker_id(o.worker_id);
    *mb.mutable_lease() = lease;
    for (size_t j = i; j < std::min(points.size(), i + chunk); ++j) *mb.add_points() = points[j];
    ok = writer->Write(mb);
  }
  if (ok) writer->WritesDone();
  grpc::Status s = writer->Finish();
  router.Report(stub, s, !s.ok() && HasStoreTrailer(ctx));
  if (s.ok() && !ok) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "metric stream broke");
  return s;
}

// Errors that no retry can change (the request itself is refused): the undeliverable data is dropped and counted
// instead of holding it (and the worker) forever.
bool IsPermanentRejection(const grpc::Status& s) {
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::UNIMPLEMENTED:
      return true;
    default:
      return false;
  }
}

// A finished attempt's completion is stored next to its spill (complete.pb, a CompleteJobRequest) until the
// scheduler accepts it, so that neither a long outage nor a worker restart loses the report or the points before it.
constexpr const char* kCompletionFile = "complete.pb";

// Writes dir/name through a temporary file, fsync and rename (and fsyncs the directory).
bool WriteFileDurably(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string tmp = dir + "/." + name + ".tmp", path = dir + "/" + name;
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  bool ok = ::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    return false;
  }
  if (int d = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); d >= 0) {
    ::fsync(d);
    ::close(d);
  }
  return true;
}

bool ReadFileBytes(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  out->assign((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return true;
}

grpc::Status HeartbeatOnce(ReplicaRouter& router, const WorkerOptions& o, const v1::Lease& lease,
                           int64_t step) {
  v1::HeartbeatRequest req;
  req.set_worker_id(o.worker_id);
  *req.mutable_lease() = lease;
  req.set_step(step);
  v1::HeartbeatResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::min<std::chrono::milliseconds>(o.rpc_timeout, 5s));
  return router.Call(&ctx, [&](v1::WorkerService::Stub* stub) { return stub->Heartbeat(&ctx, req, &resp); });
}

enum class Delivery { kDone, kFenced, kRejected, kKept };

// Sleeps d; once the worker is stopping, still sleeps (the caller bounds its own retries then).
void PauseFor(Stopper* stop, std::chrono::milliseconds d) {
  if (stop->stopped() || !stop->SleepFor(d)) std::this_thread::sleep_for(std::min<std::chrono::milliseconds>(d, 200ms));
}

// Sends a finished attempt's completion. While the scheduler (or its database) does not answer it renews the lease
// between tries (nobody can take the lease while the database is down; once it is back this keeps it ours) and
// retries: until accepted or fenced, or max_failures tries in a row (0: no limit), or `after_stop` past a stop.
Delivery DeliverCompletion(ReplicaRouter& router, const WorkerOptions& o, WorkerMetrics* metrics,
                           Stopper* stop, const v1::CompleteJobRequest& req, std::chrono::milliseconds hb_interval,
                           int max_failures, std::chrono::milliseconds after_stop) {
  const v1::Lease& lease = req.lease();
  std::optional<Clock::time_point> stopped_at;
  for (int failures = 0;;) {
    v1::CompleteJobResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + o.rpc_timeout);
    grpc::Status s =
        router.Call(&ctx, [&](v1::WorkerService::Stub* stub) { return stub->CompleteJob(&ctx, req, &resp); });
    if (s.ok()) {
      Log("job ", lease.job_id(), " attempt ", lease.attempt(), " completed: ", OutcomeLabel(req.outcome()),
          req.failure_class() != v1::FAILURE_CLASS_UNSPECIFIED ? " (" + v1::FailureClass_Name(req.failure_class()) + ")"
                                                               : std::string(),
          " -> job state ", v1::JobState_Name(resp.state()));
      metrics->JobFinished(OutcomeLabel(req.outcome()));
      return Delivery::kDone;
    }
    if (IsFenced(s)) {
      Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": completion rejected, lease lost (",
          s.error_message(), ")");
      metrics->JobFinished("lease_lost");
      return Delivery::kFenced;
    }
    if (IsPermanentRejection(s)) {
      Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": completion refused: ", Describe(s));
      metrics->JobFinished("unreported");
      return Delivery::kRejected;
    }
    ++failures;
    if (failures == 1 || failures % 10 == 0)
      Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": CompleteJob failed: ", Describe(s),
          "; keeping the lease and the report, retrying");
    if (max_failures > 0 && failures >= max_failures) return Delivery::kKept;
    if (stop->stopped()) {
      if (!stopped_at) stopped_at = Clock::now();
      if (Clock::now() - *stopped_at >= after_stop) return Delivery::kKept;
    }
    grpc::Status h = HeartbeatOnce(router, o, lease, -1);
    if (IsFenced(h)) {
      Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": lease lost while reporting (", h.error_message(),
          ")");
      metrics->JobFinished("lease_lost");
      return Delivery::kFenced;
    }
    PauseFor(stop, Backoff(failures, 200ms, std::max<std::chrono::milliseconds>(hb_interval, 200ms)));
  }
}

// What ReplaySpills left on disk because the scheduler could not be reached.
struct Leftovers {
  int kept = 0;           // attempt directories kept
  int kept_finished = 0;  // of them, finished attempts whose completion is still to be delivered
};

// Delivers what earlier runs of this worker (or an earlier try of this run) left under its spill root: each attempt
// directory's points in order with that attempt's lease, then, for a finished attempt (complete.pb), its completion,
// renewing the lease meanwhile so that it stays ours while the backlog drains. Accepted while the lease is current;
// fenced once the job moved on (the points are then counted as dropped and the report discarded: the scheduler owns
// the job). Kept on disk when the scheduler cannot be reached (max_failures failed tries in a row) or we stop.
Leftovers ReplaySpills(ReplicaRouter& router, const WorkerOptions& o, WorkerMetrics* metrics, Stopper* stop,
                       std::chrono::milliseconds hb_interval, int max_failures) {
  Leftovers out;
  const std::string root = SpillRoot(o);
  std::error_code ec;
  if (root.empty() || !std::filesystem::is_directory(root, ec)) return out;
  std::vector<std::string> dirs;
  for (const auto& e : std::filesystem::directory_iterator(root, ec)) dirs.push_back(e.path().string());
  std::sort(dirs.begin(), dirs.end());
  for (const std::string& dir : dirs) {
    if (stop->stopped()) {
      ++out.kept;
      if (std::filesystem::exists(dir + "/" + kCompletionFile, ec)) ++out.kept_finished;
      continue;
    }
    v1::Lease lease;
    std::string raw;
    MetricSpill spill(dir, SpillOptions(o));
    if (!ReadFileBytes(dir + "/lease.pb", &raw) || !lease.ParseFromString(raw) || lease.job_id() == 0) {
      Log("metric spill ", dir, ": no readable lease; dropping ", spill.pending(), " points");
      metrics->points_dropped += static_cast<int64_t>(spill.pending());
      spill.Remove();
      continue;
    }
    v1::CompleteJobRequest report;
    const bool finished = ReadFileBytes(dir + "/" + kCompletionFile, &raw) && report.ParseFromString(raw) &&
                          report.lease().job_id() == lease.job_id() && report.lease().attempt() == lease.attempt();
    if (spill.pending() == 0 && !finished) {
      spill.Remove();
      continue;
    }
    Log("metric spill ", dir, ": replaying ", spill.pending(), " points of job ", lease.job_id(), " attempt ",
        lease.attempt(), finished ? " and its completion (" + OutcomeLabel(report.outcome()) + ")" : std::string(),
        spill.torn_tails() > 0 ? " (a torn tail was cut off)" : "");
    Delivery d = Delivery::kDone;
    int failures = 0;
    std::optional<Clock::time_point> renewed;
    while (spill.pending() > 0) {
      if (stop->stopped()) {
        d = Delivery::kKept;
        break;
      }
      grpc::Status s;
      if (finished && (!renewed || Clock::now() - *renewed >= hb_interval)) {
        // A finished attempt has no heartbeater any more: renew its lease while its backlog is delivered.
        s = HeartbeatOnce(router, o, lease, -1);
        if (s.ok()) renewed = Clock::now();
      }
      if (!IsFenced(s)) {
        auto batch = spill.Peek(4000);
        if (batch.empty()) break;
        s = SendPoints(router, o, lease, batch, 500);
        if (s.ok()) {
          spill.Ack(batch.size());
          metrics->points_sent += static_cast<int64_t>(batch.size());
          failures = 0;
          continue;
        }
      }
      if (IsFenced(s)) {
        d = Delivery::kFenced;
        break;
      }
      if (IsPermanentRejection(s)) {
        Log("metric spill ", dir, ": points refused (", Describe(s), ")");
        d = Delivery::kRejected;
        break;
      }
      if (++failures >= max_failures) {
        Log("metric spill ", dir, ": scheduler unreachable (", Describe(s), "); keeping it");
        d = Delivery::kKept;
        break;
      }
      PauseFor(stop, Backoff(failures, 200ms, 5000ms));
    }
    if (d == Delivery::kDone && finished) {
      d = DeliverCompletion(router, o, metrics, stop, report, hb_interval, max_failures, 0ms);
      if (d == Delivery::kKept) Log("metric spill ", dir, ": completion not delivered yet; keeping it");
    }
    if (d == Delivery::kKept) {
      ++out.kept;
      if (finished) ++out.kept_finished;
      continue;
    }
    if (spill.pending() > 0) {
      Log("metric spill ", dir, d == Delivery::kFenced ? ": lease no longer current" : ": refused", "; dropping ",
          spill.pending(), " points");
      metrics->points_dropped += static_cast<int64_t>(spill.pending());
    }
    if (d == Delivery::kFenced && finished) Log("metric spill ", dir, ": the completion was not accepted (lease lost)");
    spill.Remove();
  }
  return out;
}

// Shared state of one running attempt. Threads: the supervising (job) thread, the event pump, the metric
// sender and the heartbeater.
struct JobRun {
  static constexpr size_t kBatchPoints = 500;

  std::mutex mu;
  std::condition_variable cv;
  v1::Lease lease;                    // renewed by heartbeats
  std::unique_ptr<MetricSpill> spill;  // undelivered metric points (bounded, on disk in the state dir; F15)
  std::deque<CheckpointEvent> checkpoints;
  std::optional<FinishedEvent> finished;
  bool events_closed = false;         // the pump saw EOF
  bool child_exited = false;          // the supervising loop is over (the sender delivers what is left)
  bool stop_heartbeats = false;       // the attempt is being reported: the heartbeater stops
  bool kept = false;                  // the sender left undelivered points on disk for the next start (stopping)
  std::atomic<int64_t> latest_step{-1};
  std::atomic<bool> lease_lost{false};
  std::atomic<bool> self_fenced{false};
  std::atomic<bool> cancel_requested{false};
  // Guarded by mu:
  std::chrono::steady_clock::time_point renewed_at;    // when the last successful renewal was sent
  std::optional<std::chrono::steady_clock::time_point> store_contact_at;  // last "database down" answer
  std::chrono::steady_clock::time_point progress_at;   // last new step (or start)
  bool started = false;
  int64_t diverged_at = -1;                            // first step with a non-finite loss
  std::chrono::steady_clock::time_point diverged_seen;

  v1::Lease CurrentLease() {
    std::lock_guard<std::mutex> lk(mu);
    return lease;
  }
};

}  // namespace

bool LeaseHasJob(const v1::LeaseJobResponse& r) { return r.job_available() && r.has_job() && r.has_lease(); }

int PickFreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

v1::Resources DetectResources(const std::string& gpus_override) {
  v1::Resources r;
  if (!gpus_override.empty()) {
    r.set_cpu_cores(static_cast<int32_t>(std::thread::hardware_concurrency()));
    long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0) r.set_memory_bytes(static_cast<int64_t>(pages) * page);
    // "<count>x<mem>G[:<cc>]", e.g. 2x80G:9.0
    int count = 0;
    double gib = 0;
    char cc[16] = "9.0";
    if (std::sscanf(gpus_override.c_str(), "%dx%lfG:%15s", &count, &gib, cc) >= 2) {
      for (int i = 0; i < count && i < 64; ++i) {
        auto* g = r.add_gpus();
        g->set_index(i);
        g->set_name("fake-gpu");
        g->set_memory_bytes(static_cast<int64_t>(gib * 1024 * 1024 * 1024));
        g->set_compute_capability(cc);
      }
    }
    return r;
  }
  r.set_cpu_cores(static_cast<int32_t>(std::thread::hardware_concurrency()));
  long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) r.set_memory_bytes(static_cast<int64_t>(pages) * page);
  // GPUs: nvidia-smi when present; no GPU (this build machine) is a normal, quiet case.
  if (::system("command -v nvidia-smi >/dev/null 2>&1") == 0) {
    FILE* f = ::popen(
        "nvidia-smi --query-gpu=index,name,memory.total,compute_cap --format=csv,noheader,nounits 2>/dev/null", "r");
    if (f) {
      char line[512];
      while (std::fgets(line, sizeof line, f)) {
        std::stringstream ss(line);
        std::string idx, name, mem, cc;
        std::getline(ss, idx, ',');
        std::getline(ss, name, ',');
        std::getline(ss, mem, ',');
        std::getline(ss, cc);
        auto trim = [](std::string s) {
          while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.erase(s.begin());
          while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
          return s;
        };
        try {
          auto* g = r.add_gpus();
          g->set_index(std::stoi(trim(idx)));
          g->set_name(trim(name));
          g->set_memory_bytes(std::stoll(trim(mem)) * 1024 * 1024);  // MiB
          g->set_compute_capability(trim(cc));
        } catch (...) {
          r.mutable_gpus()->RemoveLast();
        }
      }
      ::pclose(f);
    }
  }
  return r;
}

Worker::Worker(WorkerOptions opts, std::shared_ptr<grpc::Channel> channel, WorkerMetrics* metrics, Stopper* stop,
               std::shared_ptr<grpc::Channel> heartbeat_channel,
               std::vector<std::shared_ptr<grpc::Channel>> replica_channels,
               std::vector<std::shared_ptr<grpc::Channel>> replica_data_channels)
    : opts_(std::move(opts)),
      stub_(v1::WorkerService::NewStub(channel)),
      hb_stub_(v1::WorkerService::NewStub(heartbeat_channel ? heartbeat_channel : channel)),
      metrics_(metrics),
      stop_(stop) {
  for (const auto& ch : replica_channels) replica_hb_stubs_.push_back(v1::WorkerService::NewStub(ch));
  std::vector<v1::WorkerService::Stub*> data;
  for (const auto& ch : replica_data_channels) {
    replica_stubs_.push_back(v1::WorkerService::NewStub(ch));
    data.push_back(replica_stubs_.back().get());
  }
  router_ = std::make_unique<ReplicaRouter>(stub_.get(), std::move(data), &metrics_->replica_switches);
  resources_ = DetectResources(opts_.gpus_override);
}

bool Worker::Register() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  v1::RegisterWorkerRequest req;
  req.set_worker_id(opts_.worker_id);
  req.set_hostname(host);
  *req.mutable_resources() = resources_;
  req.set_version(opts_.version);
  for (int attempt = 0; !stop_->stopped(); ++attempt) {
    v1::RegisterWorkerResponse resp;
    grpc::Status s = CallWithRetry(
        "RegisterWorker",
        [&](grpc::ClientContext* c) {
          return router_->Call(c, [&](v1::WorkerService::Stub* st) { return st->RegisterWorker(c, req, &resp); });
        },
        opts_.rpc_timeout, stop_);
    if (s.ok()) {
      if (resp.heartbeat_interval_ms() > 0) heartbeat_interval_ = std::chrono::milliseconds(resp.heartbeat_interval_ms());
      if (resp.lease_ttl_ms() > 0) lease_ttl_ = std::chrono::milliseconds(resp.lease_ttl_ms());
      Log("registered as ", opts_.worker_id, " (cpus=", resources_.cpu_cores(), " gpus=", resources_.gpus_size(),
          " heartbeat=", heartbeat_interval_.count(), "ms lease_ttl=", resp.lease_ttl_ms(), "ms)");
      return true;
    }
    if (stop_->stopped()) break;
    // Anything but UNAVAILABLE is unexpected; keep trying slowly rather than exit (the daemon outlives hiccups).
    if (s.error_code() == grpc::StatusCode::UNAUTHENTICATED || s.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
      Log("RegisterWorker refused: ", Describe(s), " (check --token_file or --tls_cert/--tls_key, and that "
          "--worker_id is the identity they were issued for); retrying");
    } else {
      Log("RegisterWorker failed: ", Describe(s), "; retrying");
    }
    stop_->SleepFor(Backoff(attempt, 1000ms, 30000ms));
  }
  return false;
}

int Worker::Run() {
  if (!Register()) return 0;
  Leftovers left = ReplaySpills(*router_, opts_, metrics_, stop_, heartbeat_interval_, 5);
  int64_t jobs_done = 0;
  int poll_attempt = 0;
  int consecutive_failures = 0;
  int held_polls = 0;
  while (!stop_->stopped()) {
    if (left.kept > 0) {
      // Attempts of an earlier run that could not be delivered yet: try again before asking for work.
      left = ReplaySpills(*router_, opts_, metrics_, stop_, heartbeat_interval_, 1);
      if (left.kept_finished > 0) {
        // A finished attempt still waits for the scheduler to take its points and its report. No new work
        // meanwhile: its lease would go unrenewed (and the scheduler is not answering anyway).
        if (held_polls++ % 20 == 0)
          Log(left.kept_finished, " finished attempt(s) not yet delivered; not leasing until they are");
        stop_->SleepFor(Backoff(std::min(held_polls, 4), 500ms, std::max<std::chrono::milliseconds>(heartbeat_interval_, 500ms)));
        continue;
      }
      held_polls = 0;
    }
    v1::LeaseJobRequest req;
    req.set_worker_id(opts_.worker_id);
    *req.mutable_free() = resources_;  // one job at a time: all of it is free when we ask
    if (!opts_.rendezvous_host.empty()) {
      if (int port = PickFreePort(); port > 0) req.set_rendezvous_addr(opts_.rendezvous_host + ":" + std::to_string(port));
    }
    v1::LeaseJobResponse resp;
    // The lease's clock (self-fence deadline) starts when the request that got the grant was sent: the last try,
    // not the first one of a retry loop that may have spanned a whole outage.
    auto lease_sent = Clock::now();
    grpc::Status s = CallWithRetry(
        "LeaseJob",
        [&](grpc::ClientContext* c) {
          lease_sent = Clock::now();
          return router_->Call(c, [&](v1::WorkerService::Stub* st) { return st->LeaseJob(c, req, &resp); });
        },
        opts_.rpc_timeout, stop_);
    if (stop_->stopped() && !LeaseHasJob(resp)) break;
    if (!s.ok()) {
      if (IsFenced(s) || s.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
        // The scheduler forgot us (e.g. restarted on a fresh database): register again.
        Log("LeaseJob refused (", Describe(s), "); registering again");
        stop_->SleepFor(Backoff(poll_attempt++, 1000ms, 30000ms));
        if (!Register()) break;
      } else {
        Log("LeaseJob failed: ", Describe(s));
        stop_->SleepFor(Backoff(poll_attempt++, 1000ms, 30000ms));
      }
      if (opts_.once) break;
      continue;
    }
    poll_attempt = 0;
    if (resp.quarantined()) {
      auto left = std::chrono::milliseconds(std::max<int64_t>(0, resp.quarantine_until_unix_ms() - NowUnixMs()));
      Log("QUARANTINED by the scheduler for another ", left.count() / 1000, " s; not leasing");
      metrics_->quarantined = 1;
      stop_->SleepFor(std::min<std::chrono::milliseconds>(std::max(left, 500ms), 30000ms));
      continue;
    }
    metrics_->quarantined = 0;
    if (LeaseHasJob(resp)) {
      bool node_failure = RunJob(resp, lease_sent);
      ++jobs_done;
      if (opts_.once || (opts_.max_jobs > 0 && jobs_done >= opts_.max_jobs)) {
        Log("done after ", jobs_done, " job(s)");
        break;
      }
      if (node_failure) {
        // Crash loop on this node: exponential backoff before asking for more work (the scheduler quarantines a
        // node that keeps failing; this keeps a bad node from burning through the queue meanwhile).
        auto wait = Backoff(consecutive_failures++, 500ms, opts_.failure_backoff_max);
        Log("attempt failed on this node (", consecutive_failures, " in a row); backing off ", wait.count(), "ms");
        stop_->SleepFor(wait);
      } else {
        consecutive_failures = 0;
      }
      continue;  // ask for the next job at once
    }
    if (opts_.once) {
      Log("no job available (--once)");
      break;
    }
    stop_->SleepFor(opts_.poll_interval);
  }
  if (stop_->stopped()) Log("stopping: no more leases");
  return 0;
}

bool Worker::Complete(const v1::Lease& lease, v1::Outcome outcome, v1::FailureClass fc, const std::string& message,
                      int exit_code, bool retry) {
  v1::CompleteJobRequest req;
  req.set_worker_id(opts_.worker_id);
  *req.mutable_lease() = lease;
  req.set_outcome(outcome);
  req.set_failure_class(fc);
  req.set_message(message);
  req.set_exit_code(exit_code);
  v1::CompleteJobResponse resp;
  // Keep trying through a scheduler restart; past the lease TTL the scheduler re-queues the job anyway.
  // Not tied to stop_: a draining worker must still get its report through.
  grpc::Status s = CallWithRetry(
      "CompleteJob",
      [&](grpc::ClientContext* c) {
        return router_->Call(c, [&](v1::WorkerService::Stub* st) { return st->CompleteJob(c, req, &resp); });
      },
      opts_.rpc_timeout,
      nullptr, retry ? 60s : 1ms);
  if (s.ok()) {
    Log("job ", lease.job_id(), " attempt ", lease.attempt(), " completed: ", OutcomeLabel(outcome),
        fc != v1::FAILURE_CLASS_UNSPECIFIED ? " (" + v1::FailureClass_Name(fc) + ")" : std::string(),
        " -> job state ", v1::JobState_Name(resp.state()));
    metrics_->JobFinished(OutcomeLabel(outcome));
    return true;
  } else if (IsFenced(s)) {
    Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": completion rejected, lease lost (", s.error_message(),
        ")");
    metrics_->JobFinished("lease_lost");
  } else {
    Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": CompleteJob failed: ", Describe(s),
        "; the lease will expire and the scheduler will retry the job");
    metrics_->JobFinished("unreported");
  }
  return false;
}

bool Worker::RunJob(const v1::LeaseJobResponse& leased, Clock::time_point lease_sent) {
  const v1::Job& job = leased.job();
  const v1::Lease lease0 = leased.lease();

  // The lease is renewed from the moment it is granted: verifying a resume checkpoint (hashing tens of GB for a
  // multi-billion-parameter run) or starting the child may take longer than a TTL.
  JobRun run;
  run.lease = lease0;
  run.renewed_at = lease_sent;
  // Heartbeater: renews the lease, carries the latest step, learns about cancellation and lost leases. The
  // renewal time is when the request was sent: the scheduler's expiry is later than sent + TTL, never earlier. It
  // goes on after the child exited, while the rest of its points are delivered, until the attempt is reported.
  // Beats go out every interval whether or not the earlier ones have been answered (at most kBeatsInFlight at
  // once), on their own connection (hb_stub_), each with a deadline of one TTL: an answer is worth having as long
  // as it comes within a TTL of the send, since the renewal counts from the send. On a slow, lossy link
  // (RELIABILITY F21: 200 ms round trips, 30 % loss, i.e. TCP retransmissions that stall the stream for seconds) the
  // lease is then lost only if no beat gets through within a TTL. With one beat at a time, a deadline of one
  // interval and the metric traffic on the same connection, F21 self-fenced a healthy lease within seconds; with a
  // deadline of half the TTL, still after a 2.5 s stall.
  // "Scheduler up, database down": the answer carries the store trailer.
  auto beat = [&](v1::HeartbeatRequest req, Clock::time_point sent) {
    v1::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    const auto now = std::chrono::system_clock::now();
    const auto deadline = now + std::max<std::chrono::milliseconds>(lease_ttl_, 200ms);
    // With several replicas the channel's pick gets a third of the TTL: a replica whose own database path is
    // blackholed answers "database down" only when its handler's budget (from this deadline) runs out, and the
    // other replicas need the rest of the TTL to renew the lease in time.
    const bool replicas = !replica_hb_stubs_.empty();
    ctx.set_deadline(replicas ? now + std::max<std::chrono::milliseconds>(lease_ttl_ / 3, 200ms) : deadline);
    grpc::Status s = hb_stub_->Heartbeat(&ctx, req, &resp);
    bool store_down = !s.ok() && !IsFenced(s) && HasStoreTrailer(ctx);
    // Only the replica the channel picked may have lost its database (or be unreachable): ask every replica at once
    // (one of them may be that same blackholed replica, which would hold a sequential try until the deadline); the
    // first answer that settles the lease (renewed, or fenced) counts, the others are cancelled.
    if (replicas && !s.ok() && !IsFenced(s)) {
      struct Fan {
        std::mutex mu;
        std::condition_variable cv;
        size_t pending = 0;
        bool settled = false, store_down = false;
        size_t winner = 0;  // the replica whose answer settled it
        grpc::Status status;
        v1::HeartbeatResponse resp;
        std::vector<std::unique_ptr<grpc::ClientContext>> ctxs;
        std::vector<v1::HeartbeatResponse> resps;
      } fan;
      const size_t n = replica_hb_stubs_.size();
      fan.pending = n;
      fan.resps.resize(n);
      for (size_t r = 0; r < n; ++r) {
        fan.ctxs.push_back(std::make_unique<grpc::ClientContext>());
        fan.ctxs[r]->set_deadline(deadline);
      }
      for (size_t r = 0; r < n; ++r) {
        auto done = [&fan, r](grpc::Status rs) {
          std::lock_guard<std::mutex> lk(fan.mu);
          if (!fan.settled && (rs.ok() || IsFenced(rs))) {
            fan.settled = true;
            fan.status = rs;
            fan.resp = fan.resps[r];
            fan.winner = r;
          } else if (!rs.ok() && !IsFenced(rs) && HasStoreTrailer(*fan.ctxs[r])) {
            fan.store_down = true;
          }
          --fan.pending;
          fan.cv.notify_all();
        };
        replica_hb_stubs_[r]->async()->Heartbeat(fan.ctxs[r].get(), &req, &fan.resps[r], std::move(done));
      }
      bool cancel;
      {
        std::unique_lock<std::mutex> lk(fan.mu);
        fan.cv.wait(lk, [&] { return fan.settled || fan.pending == 0; });
        cancel = fan.pending > 0;
      }
      if (cancel)  // settled: the slower calls are not needed (outside the lock: a callback takes it)
        for (auto& c : fan.ctxs) c->TryCancel();
      std::unique_lock<std::mutex> lk(fan.mu);
      fan.cv.wait(lk, [&] { return fan.pending == 0; });  // the contexts outlive their calls
      if (fan.settled) {
        s = fan.status;
        resp = fan.resp;
        store_down = false;
        if (s.ok()) {
          ++metrics_->heartbeat_failovers;
          // The pick failed and this replica renewed: the other calls (metrics, reports, leases) go there too,
          // without waiting for one of them to run into the same replica's deadline first.
          router_->UseReplica(fan.winner);
        }
      } else if (fan.store_down) {
        store_down = true;  // a replica up with its database down: the outage grace applies
      }
    }
    if (s.ok()) {
      ++metrics_->heartbeats;
      std::lock_guard<std::mutex> lk(run.mu);
      if (sent > run.renewed_at) {  // beats may come back out of order
        run.renewed_at = sent;
        run.store_contact_at.reset();
        if (resp.has_lease() && resp.lease().job_id() == job.id()) {
          run.lease.set_expires_unix_ms(resp.lease().expires_unix_ms());
        }
      }
      if (resp.cancel_requested() && !run.cancel_requested) {
        Log("job ", job.id(), ": cancel requested by the scheduler");
        run.cancel_requested = true;
      }
    } else if (IsFenced(s)) {
      ++metrics_->heartbeat_failures;
      bool exited;
      {
        std::lock_guard<std::mutex> lk(run.mu);
        exited = run.child_exited;
      }
      if (!run.lease_lost.exchange(true)) {
        Log("job ", job.id(), ": lease lost (", s.error_message(), ")", exited ? "" : "; stopping the child");
      }
    } else {
      ++metrics_->heartbeat_failures;
      if (store_down) {
        std::lock_guard<std::mutex> lk(run.mu);
        if (!run.store_contact_at || sent > *run.store_contact_at) run.store_contact_at = sent;
      }
      Log("job ", job.id(), ": heartbeat failed: ", Describe(s), store_down ? " (scheduler up, database down)" : "");
    }
  };
  std::thread heartbeater([&] {
    // One TTL of beats (the interval is TTL / 6 by default) plus one.
    const size_t kBeatsInFlight = static_cast<size_t>(lease_ttl_ / std::max<std::chrono::milliseconds>(heartbeat_interval_, 1ms)) + 2;
    std::deque<std::future<void>> beats;
    auto reap = [&] {
      while (!beats.empty() && beats.front().wait_for(0s) == std::future_status::ready) beats.pop_front();
    };
    // The first beat goes at once: the grant's own round trip already used part of the TTL (F21: on a slow lossy
    // link, a grant answered 1.4 s late and a first beat one interval later left too little of a 3 s TTL).
    for (bool first = true;; first = false) {
      {
        std::unique_lock<std::mutex> lk(run.mu);
        if (run.cv.wait_for(lk, first ? 0ms : heartbeat_interval_, [&] { return run.stop_heartbeats; })) break;
      }
      reap();
      if (run.lease_lost || beats.size() >= kBeatsInFlight) continue;
      v1::HeartbeatRequest req;
      req.set_worker_id(opts_.worker_id);
      *req.mutable_lease() = run.CurrentLease();
      req.set_step(run.latest_step.load());
      beats.push_back(std::async(std::launch::async, beat, std::move(req), Clock::now()));
    }
    for (auto& f : beats) f.wait();
  });
  // Stops the heartbeater (idempotent): before the attempt is reported, and on every early return.
  auto stop_heartbeats = [&] {
    {
      std::lock_guard<std::mutex> lk(run.mu);
      run.stop_heartbeats = true;
      run.cv.notify_all();
    }
    if (heartbeater.joinable()) heartbeater.join();
  };
  struct JoinOnExit {
    std::function<void()> fn;
    ~JoinOnExit() { fn(); }
  } join_heartbeater{stop_heartbeats};

  // Resume from the newest reported checkpoint that still verifies; a corrupt one is skipped with an alert.
  std::string resume;
  int64_t resume_step = -1;
  for (int i = 0; i < leased.resume_candidates_size(); ++i) {
    std::string why;
    if (VerifyCheckpoint(leased.resume_candidates(i), &why)) {
      resume = leased.resume_candidates(i);
      resume_step = i < leased.resume_candidate_steps_size() ? leased.resume_candidate_steps(i) : -1;
      break;
    }
    ++metrics_->checkpoint_verify_failures;
    Log("ALERT checkpoint_corrupt job=", job.id(), " path=", leased.resume_candidates(i), ": ", why,
        "; falling back to an older checkpoint");
  }
  if (resume.empty() && leased.resume_candidates_size() == 0 && !leased.resume_checkpoint().empty()) {
    std::string why;
    if (VerifyCheckpoint(leased.resume_checkpoint(), &why)) resume = leased.resume_checkpoint();
  }
  Log("leased job ", job.id(), " attempt ", lease0.attempt(), " (sweep ", job.sweep_id(), ", cell ", job.cell_index(),
      ", epoch ", lease0.lease_epoch(), ")", resume.empty() ? std::string() : ", resuming from " + resume);

  TrainCommandInput in;
  in.train_bin = opts_.train_bin;
  in.params = std::map<std::string, std::string>(job.params().begin(), job.params().end());
  in.job_id = job.id();
  in.attempt = lease0.attempt();
  in.data_root = opts_.data_root;
  in.work_dir = opts_.work_dir;
  in.resume_checkpoint = resume;
  TrainCommand cmd;
  std::string err;
  // The attempt number can be reissued after a database failover while the old holder's trainer still runs
  // (F16): this grant's own run directory, never one that another grant's trainer writes and prunes.
  in.run_name = ClaimRunName(opts_.work_dir + "/job-" + std::to_string(job.id()), lease0.attempt(),
                             lease0.lease_nonce(), &err);
  if (in.run_name.empty()) {
    Log("job ", job.id(), ": ", err);
    stop_heartbeats();
    Complete(run.CurrentLease(), v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA, err, 0);
    return true;
  }
  if (in.run_name != "attempt-" + std::to_string(lease0.attempt())) {
    Log("job ", job.id(), " attempt ", lease0.attempt(), ": attempt-", lease0.attempt(),
        " belongs to another lease of the same number (reissued after a database rollback); running in ", in.run_name);
  }
  if (!BuildTrainCommand(in, &cmd, &err)) {
    Log("job ", job.id(), ": invalid params: ", err);
    stop_heartbeats();
    Complete(run.CurrentLease(), v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INVALID_CONFIG, err, 0);
    return false;
  }
  std::error_code ec;
  std::filesystem::create_directories(cmd.output_dir, ec);
  if (ec) {
    std::string msg = "cannot create " + cmd.output_dir + ": " + ec.message();
    Log("job ", job.id(), ": ", msg);
    stop_heartbeats();
    Complete(run.CurrentLease(), v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA, msg, 0);
    return true;
  }
  std::string argv_str;
  for (const auto& a : cmd.argv) argv_str += (argv_str.empty() ? "" : " ") + a;
  Log("job ", job.id(), ": starting ", argv_str, " (log ", cmd.log_path, ")");

  ChildProcess::Options copts{cmd.argv, cmd.log_path, 3, {}};
  if (leased.assigned_gpus_size() > 0) {
    std::string devs;
    for (int i = 0; i < leased.assigned_gpus_size(); ++i) devs += (i ? "," : "") + std::to_string(leased.assigned_gpus(i));
    copts.env.push_back("CUDA_VISIBLE_DEVICES=" + devs);
  }
  copts.env.push_back("ABLATE_JOB_ID=" + std::to_string(job.id()));
  copts.env.push_back("ABLATE_ATTEMPT=" + std::to_string(lease0.attempt()));
  copts.env.push_back("ABLATE_WORKER_ID=" + opts_.worker_id);
  const bool gang = leased.world_size() > 1;
  if (gang) {
    // One rank of a gang-scheduled job (torchrun-style env; rank 0's TCPStore at MASTER_ADDR:MASTER_PORT).
    const std::string& ma = leased.master_addr();
    const auto colon = ma.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == ma.size()) {
      std::string msg = "gang lease without a rendezvous address ('" + ma + "')";
      Log("job ", job.id(), ": ", msg);
      stop_heartbeats();
      Complete(run.CurrentLease(), v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA, msg, 0);
      return true;
    }
    // Workers of one gang may share --work_dir (rank 0's checkpoints must be readable by all): own log per rank.
    if (leased.rank() > 0) copts.log_path += ".rank" + std::to_string(leased.rank());
    // A gang of multi-GPU members (params.nproc > 1): this worker's child is the launcher of one node's ranks
    // (torchrun's --node_rank/--nnodes), global ranks node_rank * nproc + local.
    const auto np = job.params().find("nproc");
    if (np != job.params().end() && np->second != "1") {
      copts.env.push_back("ABLATE_NODE_RANK=" + std::to_string(leased.rank()));
      copts.env.push_back("ABLATE_NNODES=" + std::to_string(leased.world_size()));
    } else {
      copts.env.push_back("RANK=" + std::to_string(leased.rank()));
      copts.env.push_back("WORLD_SIZE=" + std::to_string(leased.world_size()));
      copts.env.push_back("LOCAL_RANK=0");
    }
    copts.env.push_back("MASTER_ADDR=" + ma.substr(0, colon));
    copts.env.push_back("MASTER_PORT=" + ma.substr(colon + 1));
    in_addr probe{};
    if (::inet_pton(AF_INET, opts_.rendezvous_host.c_str(), &probe) == 1 && !std::getenv("ABLATE_DIST_HOST")) {
      copts.env.push_back("ABLATE_DIST_HOST=" + opts_.rendezvous_host);  // the CPU ring's listening interface
    }
    Log("job ", job.id(), ": gang rank ", leased.rank(), " of ", leased.world_size(), ", rendezvous ", ma);
  }
  // The trainer stops itself when this deadline passes unrenewed (core/lease_watch.h): our own self-fence below
  // cannot act while this process is frozen (RELIABILITY F03). Moved on with every renewal in the loop below.
  const std::string lease_file = copts.log_path + ".lease-deadline";
  Clock::time_point lease_file_deadline;
  {
    std::lock_guard<std::mutex> lk(run.mu);
    lease_file_deadline = run.renewed_at + lease_ttl_;
  }
  // The preparation above may have outlived the lease (a scheduler that fenced us, or no renewal got through):
  // then the job is someone else's and no child is started.
  if (run.lease_lost || Clock::now() > lease_file_deadline) {
    const bool fenced = run.lease_lost;
    stop_heartbeats();
    if (fenced) {
      Log("job ", job.id(), " attempt ", lease0.attempt(), ": lease lost before the child started; not starting it");
    } else {
      ++metrics_->self_fences;
      Log("EVENT self_fence job=", job.id(), " attempt=", lease0.attempt(), " mono_ms=", MonoMs(),
          ": no lease renewal within ", lease_ttl_.count(), "ms before the child started; not starting it");
      Complete(run.CurrentLease(), v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA,
               "worker self-fenced before the start: lease not renewed in time", 0, false);
    }
    return !fenced;
  }
  if (WriteLeaseDeadline(lease_file, lease_file_deadline, &err)) {
    copts.argv.push_back("--lease_file");
    copts.argv.push_back(lease_file);
  } else {
    Log("job ", job.id(), ": ", err, " (the trainer runs without a lease deadline)");
  }
  const auto spawned_at = Clock::now();
  auto child = ChildProcess::Spawn(copts, &err);
  if (!child) {
    Log("job ", job.id(), ": spawn failed: ", err);
    stop_heartbeats();
    Complete(run.CurrentLease(), v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA, "spawn failed: " + err, 0);
    return true;
  }
  metrics_->child_running = 1;
  // Machine-readable lines for the fault suite's history checker (monotonic clock: comparable across processes).
  Log("EVENT child_start job=", job.id(), " attempt=", lease0.attempt(), " epoch=", lease0.lease_epoch(),
      " pid=", child->pid(), " mono_ms=", MonoMs(), " resume_step=", resume_step);

  {
    // Undelivered metric points spill to disk (bounded); the lease goes next to them for a restarted worker.
    const std::string root = SpillRoot(opts_);
    const std::string dir = root.empty() ? std::string()
                                         : root + "/job-" + std::to_string(job.id()) + "-a" + std::to_string(lease0.attempt());
    std::string err;
    run.spill = std::make_unique<MetricSpill>(dir, SpillOptions(opts_), &err);
    if (run.spill->on_disk()) {
      std::ofstream lf(dir + "/lease.pb", std::ios::binary | std::ios::trunc);
      lf << lease0.SerializeAsString();
    } else {
      if (!err.empty()) Log("job ", job.id(), ": metric spill in memory (", err, ")");
      MetricSpill::Options mo;
      mo.max_bytes = std::min<uint64_t>(opts_.metric_spill_max_bytes, uint64_t{8} << 20);
      run.spill = std::make_unique<MetricSpill>("", mo);
    }
  }
  run.progress_at = spawned_at;
  // Ranks other than 0 of a gang report no steps (only rank 0 writes events): no progress watchdog there; a hung
  // collective still ends them (ablate-train's own watchdog, exit 5) and rank 0's worker watches progress.
  const auto progress_timeout = gang && leased.rank() > 0 ? std::chrono::milliseconds(0)
                                : leased.progress_timeout_ms() > 0 ? std::chrono::milliseconds(leased.progress_timeout_ms())
                                                                   : opts_.progress_timeout;

  // Event pump: the child's pipe -> queues. Never blocks on the network, so the child never blocks on us.
  std::thread pump([&] {
    EventStats st = PumpEvents(
        child->events_fd(),
        [&](const Event& ev) {
          if (auto* m = std::get_if<MetricsEvent>(&ev)) {
            if (m->step > run.latest_step.load()) {
              run.latest_step = m->step;
              std::lock_guard<std::mutex> lk(run.mu);
              run.progress_at = Clock::now();
            }
            int64_t t = m->time_unix_ms > 0 ? m->time_unix_ms : NowUnixMs();
            std::vector<v1::MetricPoint> pts;
            std::lock_guard<std::mutex> lk(run.mu);
            for (const auto& [name, value] : m->values) {
              // NaN guard: a non-finite loss marks divergence at this step; no checkpoint at or after it is recorded.
              if ((name == "train/loss" || name == "eval/loss") && !std::isfinite(value) && run.diverged_at < 0) {
                run.diverged_at = m->step;
                run.diverged_seen = Clock::now();
              }
              v1::MetricPoint p;
              p.set_step(m->step);
              p.set_name(name);
              p.set_value(value);
              p.set_time_unix_ms(t);
              pts.push_back(std::move(p));
            }
            // Over the spill's cap new points are refused and counted (the gap is explicit, never silent).
            if (size_t refused = run.spill->Append(pts); refused > 0) {
              metrics_->points_dropped += static_cast<int64_t>(refused);
              if (run.spill->dropped() == static_cast<int64_t>(refused)) {  // the first drop of this attempt
                Log("ALERT metric_spill_full job=", job.id(), " step=", m->step, ": dropping points over the cap (",
                    run.spill->bytes(), " bytes buffered)");
              }
            }
            run.cv.notify_all();
          } else if (auto* c = std::get_if<CheckpointEvent>(&ev)) {
            // Verified by the sender: hashing a large checkpoint must hold up neither this pipe (the child would
            // block on its events) nor run.mu (the heartbeater waits on it).
            std::lock_guard<std::mutex> lk(run.mu);
            if (run.diverged_at >= 0 && c->step >= run.diverged_at) {
              Log("job ", job.id(), ": NOT recording checkpoint at step ", c->step, " (loss diverged at step ",
                  run.diverged_at, ")");
            } else {
              run.checkpoints.push_back(*c);
              run.cv.notify_all();
            }
          } else if (auto* s = std::get_if<StartedEvent>(&ev)) {
            Log("job ", job.id(), ": started, total_steps=", s->total_steps, " params=", s->params);
            std::lock_guard<std::mutex> lk(run.mu);
            run.started = true;
            run.progress_at = Clock::now();
          } else if (auto* f = std::get_if<FinishedEvent>(&ev)) {
            Log("job ", job.id(), ": child reports finished ", f->succeeded ? "succeeded" : "failed",
                f->failure_class.empty() ? "" : " (" + f->failure_class + ")",
                f->message.empty() ? "" : ": " + f->message);
            std::lock_guard<std::mutex> lk(run.mu);
            run.finished = *f;
          } else if (auto* a = std::get_if<CheckpointAbandonedEvent>(&ev)) {
            // Nothing was committed (ablate-train removed the temporary directory); the next save tries again.
            Log("ALERT checkpoint_abandoned job=", job.id(), " step=", a->step, ": ", a->reason);
          }
        },
        [&](std::string_view line, const std::string& why) {
          ++metrics_->malformed_event_lines;
          Log("job ", job.id(), ": ignoring malformed event line (", why, "): ", std::string(line.substr(0, 200)));
        });
    std::lock_guard<std::mutex> lk(run.mu);
    run.events_closed = true;
    run.cv.notify_all();
    (void)st;
  });

  // Metric and checkpoint sender. Each flush is one short client stream that ends with the scheduler's ack, so
  // a batch is only acknowledged in the spill (and its log truncated) once it is stored; a failed flush leaves it
  // there (fsync'ed) and is retried (the scheduler stores points idempotently, keyed (job, name, step)).
  // Checkpoints go after the metrics of their step. After the child exited it goes on until everything is delivered
  // (the attempt is reported only then, so its lease is still the one to deliver with, however long the scheduler or
  // its database is away), the lease is lost, or the worker stops: then, after kStopGrace of failed tries, what is
  // left stays on disk for the next start (counted as dropped when the spill is in memory).
  std::thread sender([&] {
    constexpr auto kStopGrace = 10s;
    std::optional<Clock::time_point> stopping_since;
    int failures = 0;
    std::map<std::string, bool> verified;  // path -> hashes match: a retried report does not hash the files again
    for (;;) {
      std::vector<v1::MetricPoint> batch;
      std::vector<CheckpointEvent> cps;
      bool closed;
      {
        std::unique_lock<std::mutex> lk(run.mu);
        run.cv.wait_for(lk, 250ms,
                        [&] { return run.spill->pending() > 0 || !run.checkpoints.empty() || run.events_closed; });
        batch = run.spill->Peek(JobRun::kBatchPoints * 8);
        cps.assign(run.checkpoints.begin(), run.checkpoints.end());
        run.checkpoints.clear();
        closed = run.events_closed;
      }
      if (run.lease_lost) {
        std::lock_guard<std::mutex> lk(run.mu);
        int64_t dropped = static_cast<int64_t>(run.spill->pending());
        if (dropped > 0) Log("job ", job.id(), ": dropping ", dropped, " undelivered metric points (lease lost)");
        metrics_->points_dropped += dropped;
        run.spill->Remove();
        break;
      }
      if (closed && stop_->stopped() && failures > 0) {
        if (!stopping_since) stopping_since = Clock::now();
        if (Clock::now() - *stopping_since > kStopGrace) {
          std::lock_guard<std::mutex> lk(run.mu);
          const int64_t left = static_cast<int64_t>(run.spill->pending());
          if (run.spill->on_disk()) {
            run.spill->Sync();
            run.kept = true;
            Log("job ", job.id(), ": stopping with ", left, " undelivered metric points; kept in ", run.spill->dir(),
                " for the next start");
          } else {
            Log("job ", job.id(), ": stopping; dropping ", left, " undelivered metric points (no spill directory)");
            metrics_->points_dropped += left;
          }
          break;
        }
      }
      bool ok = true;
      if (!batch.empty()) {
        // With several replicas a stream waits at most a lease TTL on one of them: a replica cut from the database
        // answers only when the call's budget runs out, and the points are worth more at another replica now (they
        // are spilled and resent meanwhile, and the upsert is idempotent).
        const auto deadline = router_->has_replicas()
                                  ? std::min<std::chrono::milliseconds>(opts_.rpc_timeout, std::max(lease_ttl_, 1000ms))
                                  : opts_.rpc_timeout;
        grpc::Status s = SendPoints(*router_, opts_, run.CurrentLease(), batch, JobRun::kBatchPoints, deadline);
        ok = s.ok();
        if (ok) {
          metrics_->points_sent += static_cast<int64_t>(batch.size());
          failures = 0;
          std::lock_guard<std::mutex> lk(run.mu);
          run.spill->Ack(batch.size());
        } else if (IsFenced(s)) {
          run.lease_lost = true;
          Log("job ", job.id(), ": metrics rejected, lease lost (", s.error_message(), ")");
        } else if (IsPermanentRejection(s)) {
          // No retry can change this answer: drop the batch (counted) rather than hold it forever.
          Log("job ", job.id(), ": metric batch refused (", Describe(s), "); dropping its ", batch.size(), " points");
          metrics_->points_dropped += static_cast<int64_t>(batch.size());
          std::lock_guard<std::mutex> lk(run.mu);
          run.spill->Ack(batch.size());
          ok = true;
        } else {
          auto wait = Backoff(failures++, 200ms, 5000ms);
          if (failures == 1 || failures % 10 == 0)
            Log("job ", job.id(), ": metrics flush failed (", Describe(s), "), retrying in ", wait.count(), "ms");
          std::lock_guard<std::mutex> lk(run.mu);
          run.spill->Sync();  // the batch stays in the spill; make it durable while the scheduler is away
          for (auto it = cps.rbegin(); it != cps.rend(); ++it) run.checkpoints.push_front(*it);
          cps.clear();
        }
        if (!ok && !run.lease_lost) {
          std::this_thread::sleep_for(Backoff(failures, 200ms, 5000ms));
          continue;
        }
      }
      for (size_t k = 0; k < cps.size(); ++k) {
        const auto& c = cps[k];
        auto [known, fresh] = verified.try_emplace(c.path, false);
        if (fresh) {
          std::string why;
          known->second = VerifyCheckpoint(c.path, &why);
          if (!known->second) {
            ++metrics_->checkpoint_verify_failures;
            Log("ALERT checkpoint_invalid job=", job.id(), " step=", c.step, ": ", why, " (not recorded)");
          } else {
            Log("job ", job.id(), ": checkpoint at step ", c.step, " verified: ", c.path);
          }
        }
        if (!known->second) continue;
        if (run.lease_lost) break;
        v1::ReportCheckpointRequest req;
        req.set_worker_id(opts_.worker_id);
        *req.mutable_lease() = run.CurrentLease();
        req.set_step(c.step);
        req.set_path(c.path);
        v1::ReportCheckpointResponse resp;
        grpc::ClientContext cc;
        cc.set_deadline(std::chrono::system_clock::now() + opts_.rpc_timeout);
        grpc::Status s = router_->Call(
            &cc, [&](v1::WorkerService::Stub* st) { return st->ReportCheckpoint(&cc, req, &resp); });
        if (s.ok()) {
          failures = 0;
          ++metrics_->checkpoints_reported;
          Log("job ", job.id(), ": checkpoint step ", c.step, " recorded");
        } else if (IsFenced(s)) {
          run.lease_lost = true;
          Log("job ", job.id(), ": checkpoint rejected, lease lost (", s.error_message(), ")");
          break;
        } else if (IsPermanentRejection(s)) {
          Log("job ", job.id(), ": checkpoint step ", c.step, " refused (", Describe(s), "); not recorded");
        } else {
          if (failures++ == 0 || failures % 10 == 0)
            Log("job ", job.id(), ": ReportCheckpoint step ", c.step, " failed: ", Describe(s), "; will retry");
          {
            std::lock_guard<std::mutex> lk(run.mu);
            for (size_t r = cps.size(); r-- > k;) run.checkpoints.push_front(cps[r]);
          }
          std::this_thread::sleep_for(Backoff(failures, 200ms, 5000ms));
          break;
        }
      }
      if (closed) {
        std::lock_guard<std::mutex> lk(run.mu);
        // Everything stored; the spill directory goes once the attempt's report is accepted too.
        if (run.spill->pending() == 0 && run.checkpoints.empty()) break;
      }
    }
  });


  // Supervise: wait for the child, or stop it when the lease is lost (rejected, or not renewed within the TTL on
  // our monotonic clock: self-fence), the job is cancelled, it hangs, it diverged, or we drain.
  ExitStatus status;
  const char* stop_reason = nullptr;
  v1::FailureClass forced_class = v1::FAILURE_CLASS_UNSPECIFIED;
  std::string forced_message;
  bool draining = false;
  for (;;) {
    // A child that stopped on its own lease check (ablate-train --lease_file, exit 75) got to the deadline we are
    // about to notice: that is our self-fence, so for it the deadline is checked below before the loop ends.
    std::optional<ExitStatus> exited = child->TryWait();
    if (exited && !(exited->exited && exited->code == kTrainerLeaseExpiredExit)) {
      status = *exited;
      break;
    }
    const auto now = Clock::now();
    Clock::time_point fence_deadline, progress_at, diverged_seen;
    bool started;
    int64_t diverged_at;
    {
      std::lock_guard<std::mutex> lk(run.mu);
      fence_deadline = run.renewed_at + lease_ttl_;
      if (run.store_contact_at) {
        // The scheduler answers but its database does not: nobody can take our lease meanwhile.
        fence_deadline = std::max(fence_deadline,
                                  std::min(*run.store_contact_at + lease_ttl_, run.renewed_at + opts_.store_outage_tolerance));
      }
      progress_at = run.progress_at;
      started = run.started;
      diverged_at = run.diverged_at;
      diverged_seen = run.diverged_seen;
    }
    if (!run.lease_lost && fence_deadline != lease_file_deadline) {
      lease_file_deadline = fence_deadline;  // one try per renewal: a failing disk is logged once each, not per tick
      std::string werr;
      if (!WriteLeaseDeadline(lease_file, fence_deadline, &werr)) {
        Log("job ", job.id(), ": ", werr, " (the trainer may stop at the previous lease deadline)");
      }
    }
    if (!run.lease_lost && now > fence_deadline) {
      run.lease_lost = true;
      run.self_fenced = true;
      ++metrics_->self_fences;
      Log("EVENT self_fence job=", job.id(), " attempt=", lease0.attempt(), " mono_ms=", MonoMs(),
          ": no lease renewal within ", lease_ttl_.count(), "ms; ",
          exited ? "the child has stopped (it watches the same deadline)" : "stopping the child");
    }
    if (exited) {
      status = *exited;
      break;
    }
    if (run.lease_lost) {
      stop_reason = run.self_fenced ? "self-fenced" : "lease lost";
    } else if (run.cancel_requested) {
      stop_reason = "cancelled";
    } else if (diverged_at >= 0 && now - diverged_seen > std::min<std::chrono::milliseconds>(opts_.kill_grace, 5s)) {
      stop_reason = "diverged";
      forced_class = v1::FAILURE_CLASS_DIVERGED;
      forced_message = "non-finite loss at step " + std::to_string(diverged_at) + " (worker NaN guard)";
    } else if (progress_timeout.count() > 0 && now - progress_at > progress_timeout) {
      stop_reason = "hang";
      forced_class = v1::FAILURE_CLASS_HANG;
      forced_message = std::string("no step progress for ") + std::to_string(progress_timeout.count()) + "ms (" +
                       (started ? "last step " + std::to_string(run.latest_step.load()) : "never started") + ")";
      ++metrics_->hangs_detected;
      Log("EVENT hang_detected job=", job.id(), " attempt=", lease0.attempt(), " mono_ms=", MonoMs(),
          " last_step=", run.latest_step.load());
    } else if (stop_->stopped()) {
      stop_reason = "drain";
      draining = true;
    }
    if (stop_reason) {
      // Self-fencing is urgent (another worker may get the job soon); a drain gives the child time to checkpoint.
      auto grace = draining ? opts_.drain_grace
                  : run.lease_lost ? std::min<std::chrono::milliseconds>(opts_.kill_grace, 1000ms) : opts_.kill_grace;
      Log("job ", job.id(), ": stopping child pid ", child->pid(), " (", stop_reason, "): SIGTERM, SIGKILL after ",
          grace.count(), "ms");
      if (draining) ++metrics_->drains;
      status = child->Stop(grace);
      break;
    }
    std::this_thread::sleep_for(50ms);
  }
  child->SignalGroup(SIGKILL);  // stragglers in the group would keep the events pipe open
  metrics_->child_running = 0;
  Log("EVENT child_end job=", job.id(), " attempt=", lease0.attempt(), " mono_ms=", MonoMs(),
      " last_step=", run.latest_step.load());
  pump.join();
  {
    std::lock_guard<std::mutex> lk(run.mu);
    run.child_exited = true;
    run.cv.notify_all();
  }
  std::optional<FinishedEvent> finished;
  {
    std::lock_guard<std::mutex> lk(run.mu);
    finished = run.finished;
  }
  Log("job ", job.id(), ": child exited ",
      status.exited ? "with code " + std::to_string(status.code) : "by signal " + std::to_string(status.signal));
  // The report is decided now, when the child has ended: a cancel that arrives while the rest of its points are
  // delivered changes nothing (the run already finished; report what it did).
  v1::CompleteJobRequest report;
  report.set_worker_id(opts_.worker_id);
  bool node_failure = false;
  if (!run.lease_lost) {
    JobResult r = MapOutcome(status, finished);
    if (run.cancel_requested) {
      r.outcome = v1::OUTCOME_CANCELLED;
      r.failure_class = v1::FAILURE_CLASS_UNSPECIFIED;
      r.message = "cancelled";
      r.exit_code = status.exited ? status.code : 0;
    } else if (draining && !(r.outcome == v1::OUTCOME_SUCCEEDED && finished && finished->succeeded)) {
      // A drained child may exit 0 without finishing: only its own "succeeded" event makes the attempt a success.
      Log("job ", job.id(), " attempt ", lease0.attempt(), ": drained; releasing as PREEMPTED (last step ",
          run.latest_step.load(), ")");
      r.outcome = v1::OUTCOME_PREEMPTED;
      r.failure_class = v1::FAILURE_CLASS_UNSPECIFIED;
      r.message = "worker drained (SIGTERM)";
    } else if (forced_class != v1::FAILURE_CLASS_UNSPECIFIED) {
      r.outcome = v1::OUTCOME_FAILED;
      r.failure_class = forced_class;
      r.message = forced_message;
    } else if (r.outcome == v1::OUTCOME_FAILED && r.failure_class == v1::FAILURE_CLASS_CRASH && !run.started &&
               Clock::now() - spawned_at < opts_.startup_window) {
      // Died before it could even start: a bad node or image, not the job's fault.
      r.failure_class = v1::FAILURE_CLASS_INFRA;
      r.message = "ablate-train died during start-up (before its started event): " + r.message;
    } else if (run.diverged_at >= 0 &&
               (r.outcome == v1::OUTCOME_SUCCEEDED || r.failure_class == v1::FAILURE_CLASS_CRASH)) {
      // A run whose loss went non-finite is not a result, even if the trainer exited 0.
      r.outcome = v1::OUTCOME_FAILED;
      r.failure_class = v1::FAILURE_CLASS_DIVERGED;
      r.message = "non-finite loss at step " + std::to_string(run.diverged_at) + " (worker NaN guard)";
    }
    report.set_outcome(r.outcome);
    report.set_failure_class(r.failure_class);
    report.set_message(r.message);
    report.set_exit_code(r.exit_code);
    node_failure = r.outcome == v1::OUTCOME_FAILED &&
                   (r.failure_class == v1::FAILURE_CLASS_INFRA || r.failure_class == v1::FAILURE_CLASS_CRASH ||
                    r.failure_class == v1::FAILURE_CLASS_HANG);
    // Stored next to the spill until the scheduler accepts it: the points go first, then this report, with this
    // attempt's lease; a worker restarted meanwhile delivers both (ReplaySpills).
    std::lock_guard<std::mutex> lk(run.mu);
    if (run.spill->on_disk() && !run.lease_lost) {
      *report.mutable_lease() = run.lease;
      if (!WriteFileDurably(run.spill->dir(), kCompletionFile, report.SerializeAsString()))
        Log("job ", job.id(), ": cannot store the completion in ", run.spill->dir(), " (kept in memory only)");
    }
  }
  {
    std::unique_lock<std::mutex> lk(run.mu);
    if (run.spill->pending() > 0 || !run.checkpoints.empty())
      Log("job ", job.id(), ": delivering ", run.spill->pending(), " metric points", run.checkpoints.empty() ? "" : " and checkpoints",
          " before reporting the attempt");
  }
  sender.join();  // everything delivered, the lease lost, or (stopping) kept on disk
  stop_heartbeats();

  const v1::Lease lease = run.CurrentLease();
  if (run.lease_lost) {
    if (run.self_fenced) {
      // Release early if the lease happens to be still ours; after a partition this is the zombie's late write,
      // which the scheduler must reject (FAILED_PRECONDITION).
      Log("job ", job.id(), " attempt ", lease.attempt(), ": self-fenced; reporting once (expected to be rejected "
          "if the job was re-dispatched)");
      Complete(lease, v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA, "worker self-fenced: lease not renewed in time",
               0, false);
      return true;
    }
    Log("job ", job.id(), " attempt ", lease.attempt(), ": not reported (lease lost); the scheduler owns it now");
    metrics_->JobFinished("lease_lost");
    std::lock_guard<std::mutex> lk(run.mu);
    run.spill->Remove();
    return false;
  }
  if (run.kept) {
    Log("job ", job.id(), " attempt ", lease.attempt(), ": stopping before the scheduler took its points; its report (",
        OutcomeLabel(report.outcome()), ") is kept with them for the next start");
    metrics_->JobFinished("interrupted");
    return node_failure;
  }
  if (run.latest_step >= 0) {
    // One last heartbeat so the scheduler's step is the final one, not the one of the previous tick.
    grpc::Status s = HeartbeatOnce(*router_, opts_, lease, run.latest_step.load());
    if (s.ok()) ++metrics_->heartbeats;
  }
  *report.mutable_lease() = lease;
  // Until accepted or fenced; while stopping, for up to 10 s more (the report stays on disk for the next start).
  Delivery d = DeliverCompletion(*router_, opts_, metrics_, stop_, report, heartbeat_interval_, 0, 10s);
  std::lock_guard<std::mutex> lk(run.mu);
  if (d == Delivery::kKept && run.spill->on_disk()) {
    Log("job ", job.id(), " attempt ", lease.attempt(), ": report kept in ", run.spill->dir(), " for the next start");
    metrics_->JobFinished("interrupted");
  } else {
    if (d == Delivery::kKept) metrics_->JobFinished("unreported");
    run.spill->Remove();
  }
  return node_failure;
}

}  // namespace ablate::worker
