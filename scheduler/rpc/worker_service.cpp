#include "scheduler/rpc/worker_service.h"

#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <chrono>

#include "scheduler/util/log.h"

namespace ablate::scheduler::rpc {
namespace {

constexpr int kMaxPointsPerBatch = 10000;

grpc::Status Invalid(const std::string& m) { return grpc::Status(grpc::INVALID_ARGUMENT, m); }

// worker_id is required, short and printable; a certificate- or token-authenticated worker may only speak for
// itself (its identity is its worker id).
grpc::Status CheckWorker(const Identity& who, const std::string& worker_id) {
  if (auto st = CheckName("worker_id", worker_id, 128); !st.ok()) return st;
  if (who.role == Role::kWorker && who.name != "*" && who.name != worker_id) {
    return grpc::Status(grpc::PERMISSION_DENIED, "credential of worker '" + who.name + "' may not act as worker '" +
                                                     worker_id + "'");
  }
  return grpc::Status::OK;
}

grpc::Status CheckWorkerAndLease(const Identity& who, const std::string& worker_id, const v1::Lease& lease,
                                 bool has_lease) {
  if (auto st = CheckWorker(who, worker_id); !st.ok()) return st;
  if (!has_lease || lease.job_id() <= 0) return Invalid("lease: required (the Lease returned by LeaseJob)");
  if (lease.lease_nonce().size() > 64) return Invalid("lease.lease_nonce: longer than 64 characters");
  return grpc::Status::OK;
}

// A worker authenticated by certificate or token writes only to attempts it holds (RELIABILITY F35: a worker may
// touch only attempts leased to its identity). The lease nonce already keeps workers from guessing each other's
// leases; this also refuses a leaked one. A lease that is no longer current is left to the fence, which answers
// FAILED_PRECONDITION, so a worker's lost-lease path runs as before. Anonymous callers (authentication off) and a
// wildcard worker credential ("*") are not checked.
bool SameLease(const v1::Lease& a, const v1::Lease& b) {
  return a.job_id() == b.job_id() && a.attempt() == b.attempt() && a.lease_epoch() == b.lease_epoch() &&
         a.lease_nonce() == b.lease_nonce();
}

grpc::Status CheckHolder(ServiceContext* ctx, const Identity& who, const v1::Lease& lease) {
  if (who.role != Role::kWorker || who.name == "*") return grpc::Status::OK;
  auto holders = ctx->store->LeaseHolders(FromProto(lease));
  if (!holders.ok()) return ToGrpc(holders.status());
  if (holders->empty() || std::find(holders->begin(), holders->end(), who.name) != holders->end()) {
    return grpc::Status::OK;
  }
  return grpc::Status(grpc::PERMISSION_DENIED, "worker '" + who.name + "' does not hold the lease of job " +
                                                   std::to_string(lease.job_id()) + " attempt " +
                                                   std::to_string(lease.attempt()));
}

Capacity CapacityOf(const v1::Resources& r) {
  Capacity c;
  // A worker that advertises nothing (an old worker, or a test client) has unknown capacity: no constraint.
  c.unlimited = r.gpus_size() == 0 && r.memory_bytes() <= 0;
  c.host_memory_bytes = r.memory_bytes();
  for (const auto& g : r.gpus()) c.gpus.push_back({g.index(), g.memory_bytes()});
  return c;
}

}  // namespace

grpc::Status WorkerServiceImpl::RegisterWorker(grpc::ServerContext* sctx, const v1::RegisterWorkerRequest* req,
                                               v1::RegisterWorkerResponse* resp) {
  return Instrumented(ctx_, sctx, "WorkerService", "RegisterWorker", [&](const Identity& who) -> grpc::Status {
    if (auto st = CheckWorker(who, req->worker_id()); !st.ok()) return st;
    if (req->hostname().size() > 256) return Invalid("hostname: longer than 256 characters");
    if (req->version().size() > 64) return Invalid("version: longer than 64 characters");
    if (req->resources().gpus_size() > 64) return Invalid("resources.gpus: more than 64");
    std::string resources;
    (void)google::protobuf::util::MessageToJsonString(req->resources(), &resources);
    auto st = ctx_->store->UpsertWorker({req->worker_id(), req->hostname(), resources, req->version()});
    if (!st.ok()) return ToGrpc(st);
    resp->set_lease_ttl_ms(ctx_->lease_ttl_s * 1000);
    resp->set_heartbeat_interval_ms(ctx_->heartbeat_interval_ms);
    LogInfo("worker_registered", {{"worker_id", req->worker_id()}, {"hostname", req->hostname()},
                                  {"gpus", std::to_string(req->resources().gpus_size())}});
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::LeaseJob(grpc::ServerContext* sctx, const v1::LeaseJobRequest* req,
                                         v1::LeaseJobResponse* resp) {
  return Instrumented(ctx_, sctx, "WorkerService", "LeaseJob", [&](const Identity& who) -> grpc::Status {
    // A grant must reach the worker well inside a TTL of its request: the worker's lease clock starts when it sent
    // the request, so a grant made later than that (the database answered late: F17/F18) would be self-fenced at
    // once, and count as a node failure. Half a TTL at most here; the lease statement itself refuses to grant when
    // the database runs it after this budget (a statement delivered late by a healed network path).
    CallBudget grant_budget(std::chrono::milliseconds(ctx_->lease_ttl_s * 500));
    if (auto st = CheckWorker(who, req->worker_id()); !st.ok()) return st;
    if (req->free().gpus_size() > 64) return Invalid("free.gpus: more than 64");
    if (req->rendezvous_addr().size() > 255) return Invalid("rendezvous_addr: longer than 255 bytes");
    if (ctx_->shutting_down->load()) return grpc::Status(grpc::UNAVAILABLE, "scheduler shutting down");
    Capacity cap = CapacityOf(req->free());
    cap.rendezvous_addr = req->rendezvous_addr();
    auto g = ctx_->store->LeaseJobFor(req->worker_id(), cap, ctx_->lease_ttl_s);
    if (!g.ok()) return ToGrpc(g.status());
    for (const auto& u : g->unschedulable) {
      ctx_->metrics->gangs_unschedulable->Inc();
      LogWarn("gang_unschedulable", {{"job_id", std::to_string(u.job_id)}, {"sweep_id", std::to_string(u.sweep_id)},
                                     {"ranks", std::to_string(u.ranks)},
                                     {"live_workers", std::to_string(u.live_workers)},
                                     {"deadlines", std::to_string(u.deadlines)}, {"reason", u.reason}});
    }
    if (g->quarantined_until_unix_ms > 0) {
      resp->set_job_available(false);
      resp->set_quarantined(true);
      resp->set_quarantine_until_unix_ms(g->quarantined_until_unix_ms);
      return grpc::Status::OK;
    }
    if (!g->grant.has_value()) {
      resp->set_job_available(false);
      return grpc::Status::OK;
    }
    const LeaseGrant& grant = *g->grant;
    resp->set_job_available(true);
    ToProto(grant.job, resp->mutable_job());
    ToProto(grant.lease, resp->mutable_lease());
    resp->set_resume_checkpoint(grant.resume_checkpoint);
    for (const auto& [step, path] : grant.checkpoints) {
      resp->add_resume_candidates(path);
      resp->add_resume_candidate_steps(step);
    }
    for (int32_t i : grant.assigned_gpus) resp->add_assigned_gpus(i);
    resp->set_progress_timeout_ms(ctx_->progress_timeout_ms);
    if (grant.world_size > 1) {
      resp->set_rank(grant.rank);
      resp->set_world_size(grant.world_size);
      resp->set_master_addr(grant.master_addr);
    }
    ctx_->metrics->leases_granted->Inc();
    if (grant.job.created_unix_ms > 0 && grant.job.attempt == 1) {
      auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::system_clock::now().time_since_epoch()).count();
      ctx_->metrics->dispatch_latency->Observe({}, std::max<int64_t>(0, now - grant.job.created_unix_ms) / 1000.0);
    }
    LogInfo("lease_granted", {{"job_id", std::to_string(grant.lease.job_id)},
                              {"attempt", std::to_string(grant.lease.attempt)},
                              {"epoch", std::to_string(grant.lease.lease_epoch)}, {"worker_id", req->worker_id()},
                              {"rank", std::to_string(grant.rank)}, {"world_size", std::to_string(grant.world_size)},
                              {"master_addr", grant.master_addr},
                              {"resume", grant.resume_checkpoint}});
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext* sctx, const v1::HeartbeatRequest* req,
                                          v1::HeartbeatResponse* resp) {
  return Instrumented(ctx_, sctx, "WorkerService", "Heartbeat", [&](const Identity& who) -> grpc::Status {
    if (auto st = CheckWorkerAndLease(who, req->worker_id(), req->lease(), req->has_lease()); !st.ok()) return st;
    if (auto st = CheckHolder(ctx_, who, req->lease()); !st.ok()) return st;
    auto r = ctx_->store->Heartbeat(req->worker_id(), FromProto(req->lease()), req->step(), ctx_->lease_ttl_s);
    if (!r.ok()) return ToGrpc(r.status());
    ToProto(r->lease, resp->mutable_lease());
    resp->set_cancel_requested(r->cancel_requested);
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::ReportMetrics(grpc::ServerContext* sctx, grpc::ServerReader<v1::MetricBatch>* reader,
                                              v1::ReportMetricsResponse* resp) {
  return Instrumented(ctx_, sctx, "WorkerService", "ReportMetrics", [&](const Identity& who) -> grpc::Status {
    v1::MetricBatch batch;
    v1::Lease checked;
    bool holder_checked = false;
    int64_t accepted = 0;
    auto stream_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(ctx_->max_stream_s);
    // One batch at a time: the next Read happens only after the previous batch is stored (backpressure).
    while (reader->Read(&batch)) {
      if (auto st = CheckWorkerAndLease(who, batch.worker_id(), batch.lease(), batch.has_lease()); !st.ok()) return st;
      if (batch.ByteSizeLong() > static_cast<size_t>(ctx_->max_metric_batch_bytes)) {
        return grpc::Status(grpc::RESOURCE_EXHAUSTED,
                            "metric batch of " + std::to_string(batch.ByteSizeLong()) + " bytes, at most " +
                                std::to_string(ctx_->max_metric_batch_bytes) + ": send smaller batches");
      }
      if (batch.points_size() > kMaxPointsPerBatch) {
        return grpc::Status(grpc::RESOURCE_EXHAUSTED, "points: " + std::to_string(batch.points_size()) +
                                                          " in one batch, at most " + std::to_string(kMaxPointsPerBatch));
      }
      std::vector<MetricSample> points;
      points.reserve(batch.points_size());
      for (int i = 0; i < batch.points_size(); ++i) {
        const auto& p = batch.points(i);
        if (auto st = CheckName("points[" + std::to_string(i) + "].name", p.name(), 128); !st.ok()) return st;
        if (p.step() < 0) return Invalid("points[" + std::to_string(i) + "].step: must be >= 0");
        points.push_back({p.step(), p.name(), p.value(), p.time_unix_ms()});
      }
      if (points.empty()) continue;
      // F36: each batch's database work is bounded (the method's cap, or the stream's deadline if sooner).
      CallBudget budget(HandlerDeadline(ctx_, sctx, "ReportMetrics"));
      // The holder check once per lease of the stream (a stream normally carries one attempt's points).
      if (!holder_checked || !SameLease(checked, batch.lease())) {
        if (auto st = CheckHolder(ctx_, who, batch.lease()); !st.ok()) return st;
        checked = batch.lease();
        holder_checked = true;
      }
      auto r = ctx_->store->AppendMetrics(FromProto(batch.lease()), points);
      if (!r.ok()) return ToGrpc(r.status());
      accepted += r->accepted;
      ctx_->metrics->points_ingested->Inc({}, static_cast<double>(r->inserted));
      // F36: a stream never outlives the cap; the worker reopens it.
      if (std::chrono::steady_clock::now() > stream_deadline) break;
    }
    resp->set_points_accepted(accepted);
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::ReportCheckpoint(grpc::ServerContext* sctx, const v1::ReportCheckpointRequest* req,
                                                 v1::ReportCheckpointResponse*) {
  return Instrumented(ctx_, sctx, "WorkerService", "ReportCheckpoint", [&](const Identity& who) -> grpc::Status {
    if (auto st = CheckWorkerAndLease(who, req->worker_id(), req->lease(), req->has_lease()); !st.ok()) return st;
    if (req->path().empty()) return Invalid("path: required");
    if (req->path().size() > 4096) return Invalid("path: longer than 4096 characters");
    if (req->step() < 0) return Invalid("step: must be >= 0, got " + std::to_string(req->step()));
    if (auto st = CheckHolder(ctx_, who, req->lease()); !st.ok()) return st;
    auto st = ctx_->store->RecordCheckpoint(FromProto(req->lease()), req->step(), req->path());
    if (st.ok()) ctx_->metrics->checkpoints->Inc();
    return ToGrpc(st);
  });
}

grpc::Status WorkerServiceImpl::CompleteJob(grpc::ServerContext* sctx, const v1::CompleteJobRequest* req,
                                            v1::CompleteJobResponse* resp) {
  return Instrumented(ctx_, sctx, "WorkerService", "CompleteJob", [&](const Identity& who) -> grpc::Status {
    if (auto st = CheckWorkerAndLease(who, req->worker_id(), req->lease(), req->has_lease()); !st.ok()) return st;
    Outcome outcome;
    switch (req->outcome()) {
      case v1::OUTCOME_SUCCEEDED: outcome = Outcome::kSucceeded; break;
      case v1::OUTCOME_FAILED: outcome = Outcome::kFailed; break;
      case v1::OUTCOME_CANCELLED: outcome = Outcome::kCancelled; break;
      case v1::OUTCOME_PREEMPTED: outcome = Outcome::kPreempted; break;
      default: return Invalid("outcome: must be SUCCEEDED, FAILED, CANCELLED or PREEMPTED");
    }
    if (auto st = CheckHolder(ctx_, who, req->lease()); !st.ok()) return st;
    FailureClass fc = FromProto(req->failure_class());
    if (outcome == Outcome::kFailed && fc == FailureClass::kUnspecified) fc = FailureClass::kCrash;
    std::string message = req->message().substr(0, 4096);
    auto r = ctx_->store->Complete(FromProto(req->lease()), outcome, fc, message, req->exit_code(), -1,
                                   ctx_->policy);
    if (!r.ok()) return ToGrpc(r.status());
    resp->set_state(ToProto(r->state));
    std::string cls(outcome == Outcome::kFailed ? FailureClassName(fc) : "");
    ctx_->metrics->attempts_finished->Inc({outcome == Outcome::kSucceeded ? "succeeded"
                                           : outcome == Outcome::kCancelled ? "cancelled"
                                           : outcome == Outcome::kPreempted ? "preempted" : "failed",
                                           cls});
    if (outcome == Outcome::kFailed && r->state == JobState::kQueued) ctx_->metrics->retries->Inc({cls});
    if (r->worker_quarantined) {
      ctx_->metrics->quarantines->Inc();
      LogWarn("worker_quarantined", {{"worker_id", req->worker_id()}, {"after", cls + ": " + message.substr(0, 200)}});
    }
    LogInfo("job_completed", {{"job_id", std::to_string(req->lease().job_id())},
                              {"attempt", std::to_string(req->lease().attempt())},
                              {"outcome", v1::Outcome_Name(req->outcome())},
                              {"failure_class", cls},
                              {"state", std::string(JobStateName(r->state))},
                              {"retry_in_ms", std::to_string(r->retry_in_ms)}});
    return grpc::Status::OK;
  });
}

}  // namespace ablate::scheduler::rpc
