#include "worker/worker.h"

#include <signal.h>
#include <unistd.h>

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include "worker/argv.h"
#include "worker/child.h"
#include "worker/events.h"
#include "worker/outcome.h"

namespace ablate::worker {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

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

// Shared state of one running attempt. Threads: the supervising (job) thread, the event pump, the metric
// sender and the heartbeater.
struct JobRun {
  static constexpr size_t kMaxQueuedPoints = 100000;  // bounded: a stuck stream must not eat the node's memory
  static constexpr size_t kBatchPoints = 500;

  std::mutex mu;
  std::condition_variable cv;
  v1::Lease lease;                    // renewed by heartbeats
  std::deque<v1::MetricPoint> points;
  std::deque<CheckpointEvent> checkpoints;
  std::optional<FinishedEvent> finished;
  bool events_closed = false;         // the pump saw EOF
  bool child_exited = false;          // heartbeater stops
  std::atomic<int64_t> latest_step{-1};
  std::atomic<bool> lease_lost{false};
  std::atomic<bool> cancel_requested{false};

  v1::Lease CurrentLease() {
    std::lock_guard<std::mutex> lk(mu);
    return lease;
  }
};

}  // namespace

bool LeaseHasJob(const v1::LeaseJobResponse& r) { return r.job_available() && r.has_job() && r.has_lease(); }

v1::Resources DetectResources() {
  v1::Resources r;
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

Worker::Worker(WorkerOptions opts, std::shared_ptr<grpc::Channel> channel, WorkerMetrics* metrics, Stopper* stop)
    : opts_(std::move(opts)), stub_(v1::WorkerService::NewStub(channel)), metrics_(metrics), stop_(stop) {
  resources_ = DetectResources();
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
        "RegisterWorker", [&](grpc::ClientContext* c) { return stub_->RegisterWorker(c, req, &resp); },
        opts_.rpc_timeout, stop_);
    if (s.ok()) {
      if (resp.heartbeat_interval_ms() > 0) heartbeat_interval_ = std::chrono::milliseconds(resp.heartbeat_interval_ms());
      Log("registered as ", opts_.worker_id, " (cpus=", resources_.cpu_cores(), " gpus=", resources_.gpus_size(),
          " heartbeat=", heartbeat_interval_.count(), "ms lease_ttl=", resp.lease_ttl_ms(), "ms)");
      return true;
    }
    if (stop_->stopped()) break;
    // Anything but UNAVAILABLE is unexpected; keep trying slowly rather than exit (the daemon outlives hiccups).
    Log("RegisterWorker failed: ", Describe(s), "; retrying");
    stop_->SleepFor(Backoff(attempt, 1000ms, 30000ms));
  }
  return false;
}

int Worker::Run() {
  if (!Register()) return 0;
  int64_t jobs_done = 0;
  int poll_attempt = 0;
  while (!stop_->stopped()) {
    v1::LeaseJobRequest req;
    req.set_worker_id(opts_.worker_id);
    *req.mutable_free() = resources_;  // one job at a time: all of it is free when we ask
    v1::LeaseJobResponse resp;
    grpc::Status s = CallWithRetry(
        "LeaseJob", [&](grpc::ClientContext* c) { return stub_->LeaseJob(c, req, &resp); }, opts_.rpc_timeout, stop_);
    if (stop_->stopped()) break;
    if (!s.ok()) {
      if (IsFenced(s) || s.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
        // The scheduler forgot us (e.g. restarted on a fresh database): register again.
        Log("LeaseJob refused (", Describe(s), "); registering again");
        if (!Register()) break;
      } else {
        Log("LeaseJob failed: ", Describe(s));
        stop_->SleepFor(Backoff(poll_attempt++, 1000ms, 30000ms));
      }
      if (opts_.once) break;
      continue;
    }
    poll_attempt = 0;
    if (LeaseHasJob(resp)) {
      RunJob(resp);
      ++jobs_done;
      if (opts_.once || (opts_.max_jobs > 0 && jobs_done >= opts_.max_jobs)) {
        Log("done after ", jobs_done, " job(s)");
        break;
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

void Worker::Complete(const v1::Lease& lease, v1::Outcome outcome, v1::FailureClass fc, const std::string& message,
                      int exit_code) {
  v1::CompleteJobRequest req;
  req.set_worker_id(opts_.worker_id);
  *req.mutable_lease() = lease;
  req.set_outcome(outcome);
  req.set_failure_class(fc);
  req.set_message(message);
  req.set_exit_code(exit_code);
  v1::CompleteJobResponse resp;
  // Keep trying through a scheduler restart; past the lease TTL the scheduler re-queues the job anyway.
  grpc::Status s = CallWithRetry(
      "CompleteJob", [&](grpc::ClientContext* c) { return stub_->CompleteJob(c, req, &resp); }, opts_.rpc_timeout,
      stop_, 120s);
  if (s.ok()) {
    Log("job ", lease.job_id(), " attempt ", lease.attempt(), " completed: ", OutcomeLabel(outcome),
        fc != v1::FAILURE_CLASS_UNSPECIFIED ? " (" + v1::FailureClass_Name(fc) + ")" : std::string(),
        " -> job state ", v1::JobState_Name(resp.state()));
    metrics_->JobFinished(OutcomeLabel(outcome));
  } else if (IsFenced(s)) {
    Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": completion rejected, lease lost (", s.error_message(),
        ")");
    metrics_->JobFinished("lease_lost");
  } else {
    Log("job ", lease.job_id(), " attempt ", lease.attempt(), ": CompleteJob failed: ", Describe(s),
        "; the lease will expire and the scheduler will retry the job");
    metrics_->JobFinished("unreported");
  }
}

void Worker::RunJob(const v1::LeaseJobResponse& leased) {
  const v1::Job& job = leased.job();
  const v1::Lease lease0 = leased.lease();
  Log("leased job ", job.id(), " attempt ", lease0.attempt(), " (sweep ", job.sweep_id(), ", cell ", job.cell_index(),
      ", epoch ", lease0.lease_epoch(), ")",
      leased.resume_checkpoint().empty() ? std::string() : ", resuming from " + leased.resume_checkpoint());

  TrainCommandInput in;
  in.train_bin = opts_.train_bin;
  in.params = std::map<std::string, std::string>(job.params().begin(), job.params().end());
  in.job_id = job.id();
  in.attempt = lease0.attempt();
  in.data_root = opts_.data_root;
  in.work_dir = opts_.work_dir;
  in.resume_checkpoint = leased.resume_checkpoint();
  TrainCommand cmd;
  std::string err;
  if (!BuildTrainCommand(in, &cmd, &err)) {
    Log("job ", job.id(), ": invalid params: ", err);
    Complete(lease0, v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INVALID_CONFIG, err, 0);
    return;
  }
  std::error_code ec;
  std::filesystem::create_directories(cmd.output_dir, ec);
  if (ec) {
    std::string msg = "cannot create " + cmd.output_dir + ": " + ec.message();
    Log("job ", job.id(), ": ", msg);
    Complete(lease0, v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA, msg, 0);
    return;
  }
  std::string argv_str;
  for (const auto& a : cmd.argv) argv_str += (argv_str.empty() ? "" : " ") + a;
  Log("job ", job.id(), ": starting ", argv_str, " (log ", cmd.log_path, ")");

  auto child = ChildProcess::Spawn({cmd.argv, cmd.log_path, 3}, &err);
  if (!child) {
    Log("job ", job.id(), ": spawn failed: ", err);
    Complete(lease0, v1::OUTCOME_FAILED, v1::FAILURE_CLASS_INFRA, "spawn failed: " + err, 0);
    return;
  }
  metrics_->child_running = 1;
  Log("job ", job.id(), ": child pid ", child->pid());

  JobRun run;
  run.lease = lease0;

  // Event pump: the child's pipe -> queues. Never blocks on the network, so the child never blocks on us.
  std::thread pump([&] {
    EventStats st = PumpEvents(
        child->events_fd(),
        [&](const Event& ev) {
          if (auto* m = std::get_if<MetricsEvent>(&ev)) {
            run.latest_step = std::max(run.latest_step.load(), m->step);
            int64_t t = m->time_unix_ms > 0 ? m->time_unix_ms : NowUnixMs();
            std::lock_guard<std::mutex> lk(run.mu);
            for (const auto& [name, value] : m->values) {
              if (run.points.size() >= JobRun::kMaxQueuedPoints) {
                run.points.pop_front();  // keep the newest: the latest values matter most
                ++metrics_->points_dropped;
              }
              v1::MetricPoint p;
              p.set_step(m->step);
              p.set_name(name);
              p.set_value(value);
              p.set_time_unix_ms(t);
              run.points.push_back(std::move(p));
            }
            run.cv.notify_all();
          } else if (auto* c = std::get_if<CheckpointEvent>(&ev)) {
            Log("job ", job.id(), ": checkpoint at step ", c->step, ": ", c->path);
            std::lock_guard<std::mutex> lk(run.mu);
            run.checkpoints.push_back(*c);
            run.cv.notify_all();
          } else if (auto* s = std::get_if<StartedEvent>(&ev)) {
            Log("job ", job.id(), ": started, total_steps=", s->total_steps, " params=", s->params);
          } else if (auto* f = std::get_if<FinishedEvent>(&ev)) {
            Log("job ", job.id(), ": child reports finished ", f->succeeded ? "succeeded" : "failed",
                f->failure_class.empty() ? "" : " (" + f->failure_class + ")",
                f->message.empty() ? "" : ": " + f->message);
            std::lock_guard<std::mutex> lk(run.mu);
            run.finished = *f;
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

  // Metric sender: one client stream, rotated every minute so it never hits its deadline; reopened on failure.
  std::thread sender([&] {
    std::unique_ptr<grpc::ClientContext> ctx;
    std::unique_ptr<grpc::ClientWriter<v1::MetricBatch>> writer;
    v1::ReportMetricsResponse ack;
    Clock::time_point opened;
    auto close_stream = [&](bool writes_done) -> grpc::Status {
      if (!writer) return grpc::Status::OK;
      if (writes_done) writer->WritesDone();
      grpc::Status s = writer->Finish();
      writer.reset();
      ctx.reset();
      if (IsFenced(s)) run.lease_lost = true;
      return s;
    };
    std::optional<Clock::time_point> flush_deadline;
    int failures = 0;
    for (;;) {
      std::vector<v1::MetricPoint> batch;
      std::vector<CheckpointEvent> cps;
      bool closed;
      {
        std::unique_lock<std::mutex> lk(run.mu);
        run.cv.wait_for(lk, 500ms, [&] { return !run.points.empty() || !run.checkpoints.empty() || run.events_closed; });
        while (!run.points.empty() && batch.size() < JobRun::kBatchPoints) {
          batch.push_back(std::move(run.points.front()));
          run.points.pop_front();
        }
        cps.assign(run.checkpoints.begin(), run.checkpoints.end());
        run.checkpoints.clear();
        closed = run.events_closed;
      }
      if (closed && !flush_deadline) flush_deadline = Clock::now() + 30s;
      const bool give_up = run.lease_lost || stop_->stopped() || (flush_deadline && Clock::now() > *flush_deadline);
      if (give_up) {
        std::lock_guard<std::mutex> lk(run.mu);
        int64_t dropped = static_cast<int64_t>(batch.size() + run.points.size());
        if (dropped > 0) Log("job ", job.id(), ": dropping ", dropped, " undelivered metric points");
        metrics_->points_dropped += dropped;
        run.points.clear();
        break;
      }
      // Metrics first, so the checkpoint's step is never ahead of the stored curve.
      if (!batch.empty()) {
        if (writer && Clock::now() - opened > 60s) {
          grpc::Status s = close_stream(true);
          if (s.ok()) Log("job ", job.id(), ": metrics stream rotated, ", ack.points_accepted(), " points accepted");
        }
        if (!writer) {
          ctx = std::make_unique<grpc::ClientContext>();
          ctx->set_deadline(std::chrono::system_clock::now() + 120s);
          ack.Clear();
          writer = stub_->ReportMetrics(ctx.get(), &ack);
          opened = Clock::now();
        }
        v1::MetricBatch mb;
        mb.set_worker_id(opts_.worker_id);
        *mb.mutable_lease() = run.CurrentLease();
        for (auto& p : batch) *mb.add_points() = std::move(p);
        if (writer->Write(mb)) {
          metrics_->points_sent += mb.points_size();
          failures = 0;
        } else {
          grpc::Status s = close_stream(false);
          if (run.lease_lost) {
            Log("job ", job.id(), ": metrics rejected, lease lost (", s.error_message(), ")");
          } else {
            auto wait = Backoff(failures++);
            Log("job ", job.id(), ": metrics stream broke (", Describe(s), "), reopening in ", wait.count(), "ms");
            std::this_thread::sleep_for(wait);
          }
          // Put the batch back: it is sent again on the new stream (the scheduler stores points idempotently).
          std::lock_guard<std::mutex> lk(run.mu);
          for (int i = mb.points_size() - 1; i >= 0; --i) run.points.push_front(mb.points(i));
          continue;
        }
      }
      for (const auto& c : cps) {
        v1::ReportCheckpointRequest req;
        req.set_worker_id(opts_.worker_id);
        *req.mutable_lease() = run.CurrentLease();
        req.set_step(c.step);
        req.set_path(c.path);
        v1::ReportCheckpointResponse resp;
        grpc::Status s = CallWithRetry(
            "ReportCheckpoint", [&](grpc::ClientContext* cc) { return stub_->ReportCheckpoint(cc, req, &resp); },
            opts_.rpc_timeout, stop_, 60s);
        if (IsFenced(s)) {
          run.lease_lost = true;
          Log("job ", job.id(), ": checkpoint rejected, lease lost (", s.error_message(), ")");
        } else if (!s.ok()) {
          Log("job ", job.id(), ": ReportCheckpoint step ", c.step, " failed: ", Describe(s));
        }
      }
      if (closed) {
        std::lock_guard<std::mutex> lk(run.mu);
        if (run.points.empty() && run.checkpoints.empty()) break;
      }
    }
    grpc::Status s = close_stream(true);
    if (!s.ok() && !run.lease_lost) Log("job ", job.id(), ": closing metrics stream: ", Describe(s));
  });

  // Heartbeater: renews the lease, carries the latest step, learns about cancellation and lost leases.
  std::thread heartbeater([&] {
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(run.mu);
        if (run.cv.wait_for(lk, heartbeat_interval_, [&] { return run.child_exited; })) return;
      }
      v1::HeartbeatRequest req;
      req.set_worker_id(opts_.worker_id);
      *req.mutable_lease() = run.CurrentLease();
      req.set_step(run.latest_step.load());
      v1::HeartbeatResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::min<std::chrono::milliseconds>(heartbeat_interval_, 5s));
      // No retry loop: the next tick is the retry; a lease that expires meanwhile comes back as fenced.
      grpc::Status s = stub_->Heartbeat(&ctx, req, &resp);
      if (s.ok()) {
        ++metrics_->heartbeats;
        if (resp.has_lease() && resp.lease().job_id() == job.id()) {
          std::lock_guard<std::mutex> lk(run.mu);
          run.lease = resp.lease();
        }
        if (resp.cancel_requested() && !run.cancel_requested) {
          Log("job ", job.id(), ": cancel requested by the scheduler");
          run.cancel_requested = true;
        }
      } else if (IsFenced(s)) {
        ++metrics_->heartbeat_failures;
        Log("job ", job.id(), ": lease lost (", s.error_message(), "); stopping the child");
        run.lease_lost = true;
      } else {
        ++metrics_->heartbeat_failures;
        Log("job ", job.id(), ": heartbeat failed: ", Describe(s));
      }
    }
  });

  // Supervise: wait for the child, or stop it when the lease is lost, the job cancelled, or we shut down.
  ExitStatus status;
  const char* stop_reason = nullptr;
  for (;;) {
    if (auto st = child->TryWait()) {
      status = *st;
      break;
    }
    if (run.lease_lost) stop_reason = "lease lost";
    else if (run.cancel_requested) stop_reason = "cancelled";
    else if (stop_->stopped()) stop_reason = "worker shutting down";
    if (stop_reason) {
      Log("job ", job.id(), ": stopping child pid ", child->pid(), " (", stop_reason, "): SIGTERM, SIGKILL after ",
          opts_.kill_grace.count(), "ms");
      status = child->Stop(opts_.kill_grace);
      break;
    }
    std::this_thread::sleep_for(100ms);
  }
  child->SignalGroup(SIGKILL);  // stragglers in the group would keep the events pipe open
  metrics_->child_running = 0;
  pump.join();
  {
    std::lock_guard<std::mutex> lk(run.mu);
    run.child_exited = true;
    run.cv.notify_all();
  }
  heartbeater.join();
  sender.join();

  std::optional<FinishedEvent> finished;
  {
    std::lock_guard<std::mutex> lk(run.mu);
    finished = run.finished;
  }
  Log("job ", job.id(), ": child exited ",
      status.exited ? "with code " + std::to_string(status.code) : "by signal " + std::to_string(status.signal));
  if (!run.lease_lost && status.exited && run.latest_step >= 0) {
    // One last heartbeat so the scheduler's step is the final one, not the one of the previous tick.
    v1::HeartbeatRequest req;
    req.set_worker_id(opts_.worker_id);
    *req.mutable_lease() = run.CurrentLease();
    req.set_step(run.latest_step.load());
    v1::HeartbeatResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 5s);
    grpc::Status s = stub_->Heartbeat(&ctx, req, &resp);
    if (s.ok()) {
      ++metrics_->heartbeats;  // a cancel arriving now is ignored: the run already finished, report what it did
    } else if (IsFenced(s)) {
      run.lease_lost = true;
    }
  }
  const v1::Lease lease = run.CurrentLease();
  if (run.lease_lost) {
    Log("job ", job.id(), " attempt ", lease.attempt(), ": not reported (lease lost); the scheduler owns it now");
    metrics_->JobFinished("lease_lost");
    return;
  }
  if (run.cancel_requested) {
    Complete(lease, v1::OUTCOME_CANCELLED, v1::FAILURE_CLASS_UNSPECIFIED, "cancelled", status.exited ? status.code : 0);
    return;
  }
  if (stop_reason && stop_->stopped()) {
    // No drain/checkpoint handover yet: leave the job to lease expiry, which re-queues it.
    Log("job ", job.id(), " attempt ", lease.attempt(), ": interrupted by shutdown; left to lease expiry");
    metrics_->JobFinished("interrupted");
    return;
  }
  JobResult r = MapOutcome(status, finished);
  Complete(lease, r.outcome, r.failure_class, r.message, r.exit_code);
}

}  // namespace ablate::worker
