// Domain ↔ proto, absl::Status → grpc::Status, and the per-RPC instrumentation. The only place both meet.
#pragma once
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <string>

#include "ablate/v1/ablate.pb.h"
#include "absl/status/status.h"
#include "scheduler/metrics/registry.h"
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
};

grpc::Status ToGrpc(const absl::Status& s);
std::string GrpcCodeName(grpc::StatusCode c);

void ToProto(const SweepRecord& in, v1::Sweep* out);
void ToProto(const JobRecord& in, v1::Job* out);
void ToProto(const Lease& in, v1::Lease* out);
Lease FromProto(const v1::Lease& in);
v1::JobState ToProto(JobState s);
FailureClass FromProto(v1::FailureClass c);

// Runs `body`, counting the call in ablate_scheduler_rpc_total{method,code} and timing it.
template <typename F>
grpc::Status Instrumented(ServiceContext* ctx, const char* method, F&& body) {
  auto start = std::chrono::steady_clock::now();
  grpc::Status st = body();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ctx->metrics->rpc_total->Inc({method, GrpcCodeName(st.error_code())});
  ctx->metrics->rpc_duration->Observe({method}, secs);
  return st;
}

}  // namespace ablate::scheduler::rpc
