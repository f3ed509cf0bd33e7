// Domain ↔ proto, absl::Status → grpc::Status, and the per-RPC instrumentation. The only place both meet.
#pragma once
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <string_view>
#include <chrono>
#include <string>

#include "ablate/v1/ablate.pb.h"
#include "absl/status/status.h"
#include "scheduler/metrics/registry.h"
#include "scheduler/rpc/auth.h"
#include "scheduler/store/job_store.h"

namespace ablate::scheduler::rpc {

// What both services share. Owned by SchedulerServer; outlives the services.
struct ServiceContext {
  JobStore* store = nullptr;
  metrics::SchedulerMetrics* metrics = nullptr;
  int lease_ttl_s = 15;
  int max_attempts = 3;
  int max_cells = 10000;
  std::atomic<bool>* shutting_down = nullptr;
  RetryPolicy policy;
  int heartbeat_interval_ms = 2500;
  int progress_timeout_ms = 600000;   // hang detection, sent to workers with each lease
  int max_stream_s = 600;             // server-side cap on a streaming call (F36)
  int max_metric_batch_bytes = 256 * 1024;
  const Authenticator* auth = nullptr;
};

// Input limits (F30/F31): ids and names are short and printable.
grpc::Status CheckName(const std::string& field, const std::string& v, size_t max_len, bool required = true);

grpc::Status ToGrpc(const absl::Status& s);
std::string GrpcCodeName(grpc::StatusCode c);

void ToProto(const SweepRecord& in, v1::Sweep* out);
void ToProto(const JobRecord& in, v1::Job* out);
void ToProto(const Lease& in, v1::Lease* out);
void ToProto(const ScheduleRecord& in, v1::Schedule* out);
Lease FromProto(const v1::Lease& in);
v1::JobState ToProto(JobState s);
FailureClass FromProto(v1::FailureClass c);

// Authorizes the caller (MethodPolicy, deny by default), runs `body` with the caller's identity, counts the call
// in ablate_scheduler_rpc_total{method,code} and times it. A store outage comes back as UNAVAILABLE with the
// trailing metadata `ablate-store-unavailable: 1`, so a worker can tell "scheduler up, database down" (nobody
// can take its lease) from "scheduler unreachable" (it must self-fence).
template <typename F>
grpc::Status Instrumented(ServiceContext* ctx, grpc::ServerContext* sctx, const char* service, const char* method,
                          F&& body) {
  auto start = std::chrono::steady_clock::now();
  Identity who;
  grpc::Status st = Authorize(ctx->auth, sctx, std::string("ablate.v1.") + service + "/" + method, &who);
  if (st.ok()) st = body(who);
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE && sctx && !ctx->shutting_down->load()) {
    sctx->AddTrailingMetadata("ablate-store-unavailable", "1");
  }
  if (st.error_code() == grpc::StatusCode::FAILED_PRECONDITION &&
      st.error_message().find("stale lease") != std::string::npos) {
    ctx->metrics->fenced_writes->Inc({method});
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ctx->metrics->rpc_total->Inc({method, GrpcCodeName(st.error_code())});
  ctx->metrics->rpc_duration->Observe({method}, secs);
  return st;
}

}  // namespace ablate::scheduler::rpc
