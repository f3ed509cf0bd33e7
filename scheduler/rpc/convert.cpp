#include "scheduler/rpc/convert.h"

#include <algorithm>
#include <chrono>

namespace ablate::scheduler::rpc {

bool IsStreamingMethod(std::string_view method) { return method == "WatchSweep" || method == "ReportMetrics"; }

std::chrono::milliseconds MethodCap(const ServiceContext* ctx, std::string_view method) {
  int64_t ms = 10000;
  if (method == "Heartbeat") ms = 5000;  // a worker renews every H; one renewal must not outlast the next
  if (method == "SubmitSweep" || method == "ExtendSweep") ms = 30000;  // up to max_cells rows in one transaction
  if (ctx && ctx->max_rpc_ms > 0) ms = std::min<int64_t>(ms, ctx->max_rpc_ms);
  return std::chrono::milliseconds(ms);
}

CallBudget::Clock::time_point HandlerDeadline(const ServiceContext* ctx, const grpc::ServerContext* sctx,
                                              std::string_view method) {
  using std::chrono::milliseconds;
  auto now = CallBudget::Clock::now();
  const milliseconds cap = MethodCap(ctx, method);
  // The handler's own work after the database (the answer, metrics) fits in what the cap leaves over.
  milliseconds budget = cap - std::clamp<milliseconds>(cap / 10, milliseconds(20), milliseconds(500));
  if (sctx) {
    auto client = sctx->deadline();
    if (client != std::chrono::system_clock::time_point::max()) {  // max(): the client set no deadline
      auto left = std::chrono::duration_cast<milliseconds>(client - std::chrono::system_clock::now());
      // Answer before the client gives up: keep a margin for the reply to travel back.
      auto margin = std::clamp<milliseconds>(left / 5, milliseconds(50), milliseconds(1000));
      budget = std::max(milliseconds(0), std::min(budget, left - margin));
    }
  }
  return now + budget;
}

int64_t SteadyNowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(s.code())), std::string(s.message()));
}

grpc::Status CheckName(const std::string& field, const std::string& v, size_t max_len, bool required) {
  if (v.empty()) {
    return required ? grpc::Status(grpc::INVALID_ARGUMENT, field + ": required") : grpc::Status::OK;
  }
  if (v.size() > max_len) {
    return grpc::Status(grpc::INVALID_ARGUMENT,
                        field + ": longer than " + std::to_string(max_len) + " characters (" +
                            std::to_string(v.size()) + ")");
  }
  for (unsigned char ch : v) {
    if (ch < 0x21 || ch > 0x7e) {
      return grpc::Status(grpc::INVALID_ARGUMENT, field + ": only printable ASCII without spaces is allowed");
    }
  }
  return grpc::Status::OK;
}

std::string GrpcCodeName(grpc::StatusCode c) {
  switch (c) {
    case grpc::OK: return "OK";
    case grpc::CANCELLED: return "CANCELLED";
    case grpc::UNKNOWN: return "UNKNOWN";
    case grpc::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::NOT_FOUND: return "NOT_FOUND";
    case grpc::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::ABORTED: return "ABORTED";
    case grpc::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::INTERNAL: return "INTERNAL";
    case grpc::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::DATA_LOSS: return "DATA_LOSS";
    case grpc::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "CODE_" + std::to_string(static_cast<int>(c));
  }
}

v1::JobState ToProto(JobState s) {
  switch (s) {
    case JobState::kQueued: return v1::JOB_STATE_QUEUED;
    case JobState::kLeased: return v1::JOB_STATE_LEASED;
    case JobState::kRunning: return v1::JOB_STATE_RUNNING;
    case JobState::kSucceeded: return v1::JOB_STATE_SUCCEEDED;
    case JobState::kFailed: return v1::JOB_STATE_FAILED;
    case JobState::kCancelled: return v1::JOB_STATE_CANCELLED;
  }
  return v1::JOB_STATE_UNSPECIFIED;
}

namespace {
v1::SweepState ToProto(SweepState s) {
  switch (s) {
    case SweepState::kActive: return v1::SWEEP_STATE_ACTIVE;
    case SweepState::kSucceeded: return v1::SWEEP_STATE_SUCCEEDED;
    case SweepState::kFailed: return v1::SWEEP_STATE_FAILED;
    case SweepState::kCancelled: return v1::SWEEP_STATE_CANCELLED;
  }
  return v1::SWEEP_STATE_UNSPECIFIED;
}

v1::FailureClass ToProto(FailureClass c) {
  switch (c) {
    case FailureClass::kUnspecified: return v1::FAILURE_CLASS_UNSPECIFIED;
    case FailureClass::kOom: return v1::FAILURE_CLASS_OOM;
    case FailureClass::kDiverged: return v1::FAILURE_CLASS_DIVERGED;
    case FailureClass::kCrash: return v1::FAILURE_CLASS_CRASH;
    case FailureClass::kHang: return v1::FAILURE_CLASS_HANG;
    case FailureClass::kInfra: return v1::FAILURE_CLASS_INFRA;
    case FailureClass::kInvalidConfig: return v1::FAILURE_CLASS_INVALID_CONFIG;
    case FailureClass::kUnschedulable: return v1::FAILURE_CLASS_UNSCHEDULABLE;
  }
  return v1::FAILURE_CLASS_UNSPECIFIED;
}
}  // namespace

FailureClass FromProto(v1::FailureClass c) {
  switch (c) {
    case v1::FAILURE_CLASS_OOM: return FailureClass::kOom;
    case v1::FAILURE_CLASS_DIVERGED: return FailureClass::kDiverged;
    case v1::FAILURE_CLASS_CRASH: return FailureClass::kCrash;
    case v1::FAILURE_CLASS_HANG: return FailureClass::kHang;
    case v1::FAILURE_CLASS_INFRA: return FailureClass::kInfra;
    case v1::FAILURE_CLASS_INVALID_CONFIG: return FailureClass::kInvalidConfig;
    default: return FailureClass::kUnspecified;
  }
}

void ToProto(const SweepRecord& in, v1::Sweep* out) {
  out->set_id(in.id);
  out->set_name(in.name);
  out->set_state(ToProto(in.state));
  out->set_spec_yaml(in.spec_yaml);
  out->set_created_unix_ms(in.created_unix_ms);
  for (const auto& [k, v] : in.job_counts) (*out->mutable_job_counts())[k] = v;
  out->set_total_jobs(in.total_jobs);
  out->set_idempotency_key(in.idempotency_key);
}

void ToProto(const JobRecord& in, v1::Job* out) {
  out->set_id(in.id);
  out->set_reused_from_job_id(in.reused_from);
  out->set_mem_estimate_bytes(in.mem_estimate_bytes);
  out->set_gpus(in.gpus);
  out->set_ranks(in.ranks);
  out->set_not_before_unix_ms(in.not_before_unix_ms);
  out->set_sweep_id(in.sweep_id);
  out->set_cell_index(in.cell_index);
  out->set_state(ToProto(in.state));
  out->set_attempt(in.attempt);
  for (const auto& [k, v] : in.factors) (*out->mutable_factors())[k] = v;
  for (const auto& [k, v] : in.params) (*out->mutable_params())[k] = v;
  out->set_config_hash(in.config_hash);
  out->set_worker_id(in.worker_id);
  out->set_last_error(in.last_error);
  out->set_failure_class(ToProto(in.failure_class));
  out->set_created_unix_ms(in.created_unix_ms);
  out->set_started_unix_ms(in.started_unix_ms);
  out->set_finished_unix_ms(in.finished_unix_ms);
  for (const auto& [k, v] : in.latest_metrics) (*out->mutable_latest_metrics())[k] = v;
  out->set_latest_step(in.latest_step);
  out->set_total_steps(in.total_steps);
}

void ToProto(const Lease& in, v1::Lease* out) {
  out->set_job_id(in.job_id);
  out->set_attempt(in.attempt);
  out->set_lease_epoch(in.lease_epoch);
  out->set_lease_nonce(in.lease_nonce);
  out->set_rank(in.rank);
  out->set_expires_unix_ms(in.expires_unix_ms);
}

Lease FromProto(const v1::Lease& in) {
  return Lease{in.job_id(), in.attempt(), in.lease_epoch(), in.expires_unix_ms(), in.lease_nonce(), in.rank()};
}

void ToProto(const ScheduleRecord& in, v1::Schedule* out) {
  out->set_id(in.id);
  out->set_name(in.name);
  out->set_cron(in.cron);
  out->set_spec_yaml(in.spec_yaml);
  out->set_next_due_unix_ms(in.next_due_unix_ms);
  out->set_last_fired_unix_ms(in.last_fired_unix_ms);
  out->set_last_sweep_id(in.last_sweep_id);
  out->set_created_unix_ms(in.created_unix_ms);
  out->set_fired_count(in.fired_count);
  out->set_skipped_count(in.skipped_count);
}

}  // namespace ablate::scheduler::rpc
