// Domain ↔ proto, absl::Status → grpc::Status, and the per-RPC instrumentation. The only place both meet.
#pragma once
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <string_view>
#include <chrono>
#include <optional>
#include <string>

#include "ablate/v1/ablate.pb.h"
#include "absl/status/status.h"
#include "scheduler/metrics/registry.h"
#include "scheduler/rpc/auth.h"
#include "scheduler/store/job_store.h"
#include "scheduler/util/call_budget.h"
#include "scheduler/util/call_gate.h"

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
  int max_rpc_ms = 0;  // F36: every handler's cap at most this (0: the per-method defaults of MethodCap)
  // Steady-clock ms of the last call answered UNAVAILABLE because of the store (the leader's reaper gives leases a
  // grace after it: their holders could not renew either). Owned by SchedulerServer; may be null.
  std::atomic<int64_t>* store_unavailable_at_ms = nullptr;
  // F13: the client calls (SweepService, streams excepted) wait here for a slot, so that they cannot take every
  // database connection from the workers' calls, which are never gated. Null: no limit.
  CallGate* client_gate = nullptr;
};

// F36: the longest a handler of `method` may take, database work included, whatever deadline the client set (or
// none): per-method defaults (Heartbeat 5 s, SubmitSweep/ExtendSweep 30 s, the rest 10 s; for the streaming
// methods, per message or poll), lowered to ctx->max_rpc_ms when that is set.
std::chrono::milliseconds MethodCap(const ServiceContext* ctx, std::string_view method);
// The deadline of a handler's (or, for a stream, one message's) work: the method's cap (less a tenth, for the work
// after the database), or the client's deadline less a margin for the answer to travel back, whichever is first.
CallBudget::Clock::time_point HandlerDeadline(const ServiceContext* ctx, const grpc::ServerContext* sctx,
                                              std::string_view method);
bool IsStreamingMethod(std::string_view method);
int64_t SteadyNowMs();

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
// can take its lease) from "scheduler unreachable" (it must self-fence). A unary handler's database work runs
// under a CallBudget of HandlerDeadline (F36): a slow, locked or unreachable database makes it answer UNAVAILABLE
// in time instead of hanging; streaming handlers set one per message themselves.
template <typename F>
grpc::Status Instrumented(ServiceContext* ctx, grpc::ServerContext* sctx, const char* service, const char* method,
                          F&& body) {
  auto start = std::chrono::steady_clock::now();
  std::optional<CallBudget> budget;
  if (!IsStreamingMethod(method)) budget.emplace(HandlerDeadline(ctx, sctx, method));
  Identity who;
  grpc::Status st = Authorize(ctx->auth, sctx, std::string("ablate.v1.") + service + "/" + method, &who);
  // F13: a client call runs only with a slot of the client gate (waiting for one until its deadline), so a burst of
  // submits and listings cannot starve the workers' heartbeats of database connections. Streams are not gated: a
  // `watch` holds its call for minutes and does its database work one short poll at a time.
  const bool gated = ctx->client_gate != nullptr && budget && std::string_view(service) == "SweepService";
  std::optional<CallGate::Slot> slot;
  if (st.ok() && gated) {
    // Wait at most half of what is left, so the call still has time for its work once it has a slot.
    const auto now = CallBudget::Clock::now();
    slot.emplace(ctx->client_gate, now + (*CallBudget::Deadline() - now) / 2);
    if (!slot->ok()) {
      st = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        "scheduler busy: " + std::to_string(ctx->client_gate->slots()) +
                            " client calls already running and more waiting (--max_client_calls); retry shortly");
    }
  }
  if (st.ok()) st = body(who);
  if (st.error_code() == grpc::StatusCode::UNAVAILABLE && sctx && !ctx->shutting_down->load()) {
    sctx->AddTrailingMetadata("ablate-store-unavailable", "1");
    if (ctx->store_unavailable_at_ms) ctx->store_unavailable_at_ms->store(SteadyNowMs());
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
