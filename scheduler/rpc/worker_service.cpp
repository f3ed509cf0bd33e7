#include "scheduler/rpc/worker_service.h"

#include <google/protobuf/util/json_util.h>

#include "scheduler/util/log.h"

namespace ablate::scheduler::rpc {
namespace {

constexpr int kMaxPointsPerBatch = 10000;

grpc::Status Invalid(const std::string& m) { return grpc::Status(grpc::INVALID_ARGUMENT, m); }

grpc::Status CheckWorkerAndLease(const std::string& worker_id, const v1::Lease& lease, bool has_lease) {
  if (worker_id.empty()) return Invalid("worker_id: required");
  if (!has_lease || lease.job_id() <= 0) return Invalid("lease: required (the Lease returned by LeaseJob)");
  return grpc::Status::OK;
}

}  // namespace

grpc::Status WorkerServiceImpl::RegisterWorker(grpc::ServerContext*, const v1::RegisterWorkerRequest* req,
                                               v1::RegisterWorkerResponse* resp) {
  return Instrumented(ctx_, "RegisterWorker", [&]() -> grpc::Status {
    if (req->worker_id().empty()) return Invalid("worker_id: required");
    std::string resources;
    (void)google::protobuf::util::MessageToJsonString(req->resources(), &resources);
    auto st = ctx_->store->UpsertWorker({req->worker_id(), req->hostname(), resources, req->version()});
    if (!st.ok()) return ToGrpc(st);
    // Three heartbeats per TTL: one lost heartbeat never costs the lease.
    resp->set_lease_ttl_ms(ctx_->lease_ttl_s * 1000);
    resp->set_heartbeat_interval_ms(std::max(1, ctx_->lease_ttl_s * 1000 / 3));
    LogInfo("worker_registered", {{"worker_id", req->worker_id()}, {"hostname", req->hostname()},
                                  {"gpus", std::to_string(req->resources().gpus_size())}});
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::LeaseJob(grpc::ServerContext*, const v1::LeaseJobRequest* req,
                                         v1::LeaseJobResponse* resp) {
  return Instrumented(ctx_, "LeaseJob", [&]() -> grpc::Status {
    if (req->worker_id().empty()) return Invalid("worker_id: required");
    if (ctx_->shutting_down->load()) return grpc::Status(grpc::UNAVAILABLE, "scheduler shutting down");
    auto g = ctx_->store->LeaseNextJob(req->worker_id(), ctx_->lease_ttl_s);
    if (!g.ok()) return ToGrpc(g.status());
    if (!g->has_value()) {
      resp->set_job_available(false);
      return grpc::Status::OK;
    }
    const LeaseGrant& grant = **g;
    resp->set_job_available(true);
    ToProto(grant.job, resp->mutable_job());
    ToProto(grant.lease, resp->mutable_lease());
    resp->set_resume_checkpoint(grant.resume_checkpoint);
    ctx_->metrics->leases_granted->Inc();
    LogInfo("lease_granted", {{"job_id", std::to_string(grant.lease.job_id)},
                              {"attempt", std::to_string(grant.lease.attempt)},
                              {"epoch", std::to_string(grant.lease.lease_epoch)}, {"worker_id", req->worker_id()}});
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req,
                                          v1::HeartbeatResponse* resp) {
  return Instrumented(ctx_, "Heartbeat", [&]() -> grpc::Status {
    if (auto st = CheckWorkerAndLease(req->worker_id(), req->lease(), req->has_lease()); !st.ok()) return st;
    auto r = ctx_->store->Heartbeat(req->worker_id(), FromProto(req->lease()), req->step(), ctx_->lease_ttl_s);
    if (!r.ok()) return ToGrpc(r.status());
    ToProto(r->lease, resp->mutable_lease());
    resp->set_cancel_requested(r->cancel_requested);
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::ReportMetrics(grpc::ServerContext*, grpc::ServerReader<v1::MetricBatch>* reader,
                                              v1::ReportMetricsResponse* resp) {
  return Instrumented(ctx_, "ReportMetrics", [&]() -> grpc::Status {
    v1::MetricBatch batch;
    int64_t accepted = 0;
    // One batch at a time: the next Read happens only after the previous batch is stored (backpressure).
    while (reader->Read(&batch)) {
      if (auto st = CheckWorkerAndLease(batch.worker_id(), batch.lease(), batch.has_lease()); !st.ok()) return st;
      if (batch.points_size() > kMaxPointsPerBatch) {
        return Invalid("points: " + std::to_string(batch.points_size()) + " in one batch, at most " +
                       std::to_string(kMaxPointsPerBatch));
      }
      std::vector<MetricSample> points;
      points.reserve(batch.points_size());
      for (int i = 0; i < batch.points_size(); ++i) {
        const auto& p = batch.points(i);
        if (p.name().empty()) return Invalid("points[" + std::to_string(i) + "].name: required");
        points.push_back({p.step(), p.name(), p.value(), p.time_unix_ms()});
      }
      if (points.empty()) continue;
      auto r = ctx_->store->AppendMetrics(FromProto(batch.lease()), points);
      if (!r.ok()) return ToGrpc(r.status());
      accepted += r->accepted;
      ctx_->metrics->points_ingested->Inc({}, static_cast<double>(r->inserted));
    }
    resp->set_points_accepted(accepted);
    return grpc::Status::OK;
  });
}

grpc::Status WorkerServiceImpl::ReportCheckpoint(grpc::ServerContext*, const v1::ReportCheckpointRequest* req,
                                                 v1::ReportCheckpointResponse*) {
  return Instrumented(ctx_, "ReportCheckpoint", [&]() -> grpc::Status {
    if (auto st = CheckWorkerAndLease(req->worker_id(), req->lease(), req->has_lease()); !st.ok()) return st;
    if (req->path().empty()) return Invalid("path: required");
    if (req->step() < 0) return Invalid("step: must be >= 0, got " + std::to_string(req->step()));
    return ToGrpc(ctx_->store->RecordCheckpoint(FromProto(req->lease()), req->step(), req->path()));
  });
}

grpc::Status WorkerServiceImpl::CompleteJob(grpc::ServerContext*, const v1::CompleteJobRequest* req,
                                            v1::CompleteJobResponse* resp) {
  return Instrumented(ctx_, "CompleteJob", [&]() -> grpc::Status {
    if (auto st = CheckWorkerAndLease(req->worker_id(), req->lease(), req->has_lease()); !st.ok()) return st;
    Outcome outcome;
    switch (req->outcome()) {
      case v1::OUTCOME_SUCCEEDED: outcome = Outcome::kSucceeded; break;
      case v1::OUTCOME_FAILED: outcome = Outcome::kFailed; break;
      case v1::OUTCOME_CANCELLED: outcome = Outcome::kCancelled; break;
      default: return Invalid("outcome: must be SUCCEEDED, FAILED or CANCELLED");
    }
    FailureClass fc = FromProto(req->failure_class());
    if (outcome == Outcome::kFailed && fc == FailureClass::kUnspecified) fc = FailureClass::kCrash;
    auto r = ctx_->store->CompleteJob(FromProto(req->lease()), outcome, fc, req->message(), req->exit_code(),
                                      ctx_->max_attempts);
    if (!r.ok()) return ToGrpc(r.status());
    resp->set_state(ToProto(*r));
    LogInfo("job_completed", {{"job_id", std::to_string(req->lease().job_id())},
                              {"attempt", std::to_string(req->lease().attempt())},
                              {"outcome", v1::Outcome_Name(req->outcome())},
                              {"failure_class", std::string(FailureClassName(fc))},
                              {"state", std::string(JobStateName(*r))}});
    return grpc::Status::OK;
  });
}

}  // namespace ablate::scheduler::rpc
