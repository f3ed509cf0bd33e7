#include "scheduler/rpc/sweep_service.h"

#include <google/protobuf/util/message_differencer.h>

#include <cmath>
#include <thread>

#include <regex>

#include "scheduler/sweep/cron.h"
#include "scheduler/sweep/grid.h"
#include "scheduler/util/log.h"

namespace ablate::scheduler::rpc {
namespace {

grpc::Status RequireId(int64_t id, const char* field) {
  if (id <= 0) return grpc::Status(grpc::INVALID_ARGUMENT, std::string(field) + ": must be a positive id, got " +
                                                               std::to_string(id));
  return grpc::Status::OK;
}

double Metric(const JobRecord& j, const std::string& name) {
  auto it = j.latest_metrics.find(name);
  return it == j.latest_metrics.end() ? std::nan("") : it->second;
}

}  // namespace

grpc::Status SweepServiceImpl::SubmitSweep(grpc::ServerContext* sctx, const v1::SubmitSweepRequest* req,
                                           v1::SubmitSweepResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "SubmitSweep", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (req->idempotency_key().size() > 256) return grpc::Status(grpc::INVALID_ARGUMENT, "idempotency_key: longer than 256 characters");
    auto exp = sweep::ParseAndExpand(req->spec_yaml(), ctx_->max_cells);
    if (!exp.ok()) return ToGrpc(exp.status());  // kInvalidArgument naming the field; nothing stored
    std::string key = req->idempotency_key().empty() ? "spec:" + exp->spec_hash : req->idempotency_key();

    if (req->dry_run()) {
      v1::Sweep* s = resp->mutable_sweep();
      s->set_name(exp->spec.name);
      s->set_spec_yaml(req->spec_yaml());
      s->set_total_jobs(static_cast<int32_t>(exp->cells.size()));
      s->set_idempotency_key(key);
      (*s->mutable_job_counts())["queued"] = static_cast<int32_t>(exp->cells.size());
      for (const auto& c : exp->cells) {
        v1::Job* j = resp->add_jobs();
        j->set_cell_index(c.cell_index);
        j->set_state(v1::JOB_STATE_QUEUED);
        for (const auto& [k, v] : c.factors) (*j->mutable_factors())[k] = v;
        for (const auto& [k, v] : c.params) (*j->mutable_params())[k] = v;
        j->set_config_hash(c.config_hash);
        j->set_total_steps(c.total_steps);
        j->set_mem_estimate_bytes(c.mem_estimate_bytes);
        j->set_gpus(c.gpus);
        j->set_ranks(c.ranks);
      }
      resp->set_created(false);
      return grpc::Status::OK;
    }

    NewSweep ns;
    ns.name = exp->spec.name;
    ns.spec_yaml = req->spec_yaml();
    ns.idempotency_key = key;
    ns.spec_hash = exp->spec_hash;
    ns.factor_names = exp->factor_names;
    for (const auto& c : exp->cells) {
      ns.jobs.push_back({c.cell_index, c.factors, c.params, c.config_hash, c.total_steps, c.mem_estimate_bytes, c.gpus, c.ranks});
    }
    auto created = ctx_->store->CreateSweep(ns);
    if (!created.ok()) return ToGrpc(created.status());
    auto jobs = ctx_->store->ListJobs(created->sweep.id);
    if (!jobs.ok()) return ToGrpc(jobs.status());
    ToProto(created->sweep, resp->mutable_sweep());
    for (const auto& j : *jobs) ToProto(j, resp->add_jobs());
    resp->set_created(created->created);
    LogInfo(created->created ? "sweep_created" : "sweep_resubmitted",
            {{"sweep_id", std::to_string(created->sweep.id)}, {"name", ns.name},
             {"jobs", std::to_string(jobs->size())}});
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::GetSweep(grpc::ServerContext* sctx, const v1::GetSweepRequest* req, v1::Sweep* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "GetSweep", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (auto st = RequireId(req->sweep_id(), "sweep_id"); !st.ok()) return st;
    auto s = ctx_->store->GetSweep(req->sweep_id());
    if (!s.ok()) return ToGrpc(s.status());
    ToProto(*s, resp);
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::ListSweeps(grpc::ServerContext* sctx, const v1::ListSweepsRequest* req,
                                          v1::ListSweepsResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "ListSweeps", [&](const Identity& who) -> grpc::Status {
    (void)who;
    auto v = ctx_->store->ListSweeps(req->limit());
    if (!v.ok()) return ToGrpc(v.status());
    for (const auto& s : *v) ToProto(s, resp->add_sweeps());
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::CancelSweep(grpc::ServerContext* sctx, const v1::CancelSweepRequest* req,
                                           v1::CancelSweepResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "CancelSweep", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (auto st = RequireId(req->sweep_id(), "sweep_id"); !st.ok()) return st;
    auto n = ctx_->store->CancelSweep(req->sweep_id());
    if (!n.ok()) return ToGrpc(n.status());
    resp->set_jobs_cancelled(*n);
    LogInfo("sweep_cancelled", {{"sweep_id", std::to_string(req->sweep_id())}, {"jobs", std::to_string(*n)}});
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::ListJobs(grpc::ServerContext* sctx, const v1::ListJobsRequest* req,
                                        v1::ListJobsResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "ListJobs", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (auto st = RequireId(req->sweep_id(), "sweep_id"); !st.ok()) return st;
    auto v = ctx_->store->ListJobs(req->sweep_id());
    if (!v.ok()) return ToGrpc(v.status());
    for (const auto& j : *v) ToProto(j, resp->add_jobs());
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::GetJob(grpc::ServerContext* sctx, const v1::GetJobRequest* req, v1::Job* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "GetJob", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (auto st = RequireId(req->job_id(), "job_id"); !st.ok()) return st;
    auto j = ctx_->store->GetJob(req->job_id());
    if (!j.ok()) return ToGrpc(j.status());
    ToProto(*j, resp);
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::WatchSweep(grpc::ServerContext* sctx, const v1::WatchSweepRequest* req,
                                          grpc::ServerWriter<v1::SweepEvent>* writer) {
  return Instrumented(ctx_, sctx, "SweepService", "WatchSweep", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (auto st = RequireId(req->sweep_id(), "sweep_id"); !st.ok()) return st;
    int poll_ms = req->poll_interval_ms() > 0 ? req->poll_interval_ms() : 1000;
    poll_ms = std::clamp(poll_ms, 50, 60000);
    v1::SweepEvent last;
    bool sent_any = false;
    // F36: no stream runs unbounded, whatever deadline the client set (or none); the CLI reconnects.
    auto stream_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(ctx_->max_stream_s);
    // Poll the store; send an event first and then whenever something changed; end once the sweep is terminal.
    while (true) {
      absl::StatusOr<SweepRecord> s;
      absl::StatusOr<std::vector<JobRecord>> jobs;
      {
        CallBudget budget(HandlerDeadline(ctx_, sctx, "WatchSweep"));  // F36: each poll's database work is bounded
        s = ctx_->store->GetSweep(req->sweep_id());
        if (!s.ok()) return ToGrpc(s.status());
        jobs = ctx_->store->ListJobs(req->sweep_id());
        if (!jobs.ok()) return ToGrpc(jobs.status());
      }
      v1::SweepEvent ev;
      ToProto(*s, ev.mutable_sweep());
      for (const auto& j : *jobs) ToProto(j, ev.add_jobs());
      if (!sent_any || !google::protobuf::util::MessageDifferencer::Equals(ev, last)) {
        if (!writer->Write(ev)) return grpc::Status(grpc::CANCELLED, "client went away");
        last = std::move(ev);
        sent_any = true;
      }
      if (s->state != SweepState::kActive) return grpc::Status::OK;
      if (std::chrono::steady_clock::now() >= stream_deadline) return grpc::Status::OK;
      auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(poll_ms);
      while (std::chrono::steady_clock::now() < deadline) {
        if (sctx->IsCancelled()) return grpc::Status(grpc::CANCELLED, "watch cancelled by the client");
        if (ctx_->shutting_down->load()) return grpc::Status(grpc::UNAVAILABLE, "scheduler shutting down");
        std::this_thread::sleep_for(std::chrono::milliseconds(std::min(poll_ms, 50)));
      }
    }
  });
}

grpc::Status SweepServiceImpl::GetJobMetrics(grpc::ServerContext* sctx, const v1::GetJobMetricsRequest* req,
                                             v1::GetJobMetricsResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "GetJobMetrics", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (auto st = RequireId(req->job_id(), "job_id"); !st.ok()) return st;
    if (req->max_points_per_name() < 0 || req->max_points_per_name() > 20000) {
      return grpc::Status(grpc::INVALID_ARGUMENT, "max_points_per_name: must be 0..20000, got " +
                                                      std::to_string(req->max_points_per_name()));
    }
    auto job = ctx_->store->GetJob(req->job_id());  // NOT_FOUND for an unknown job
    if (!job.ok()) return ToGrpc(job.status());
    std::vector<std::string> names(req->names().begin(), req->names().end());
    auto points = ctx_->store->JobMetrics(req->job_id(), names);
    if (!points.ok()) return ToGrpc(points.status());
    const size_t cap = req->max_points_per_name() > 0 ? static_cast<size_t>(req->max_points_per_name()) : 2000;
    resp->set_job_id(req->job_id());
    // Points arrive grouped by name, ascending steps.
    for (size_t b = 0; b < points->size();) {
      size_t e = b;
      while (e < points->size() && (*points)[e].name == (*points)[b].name) ++e;
      v1::MetricSeries* s = resp->add_series();
      s->set_name((*points)[b].name);
      const size_t n = e - b;
      const size_t keep = n < cap ? n : cap;
      for (size_t k = 0; k < keep; ++k) {
        // Evenly thinned; k = 0 and k = keep-1 are the first and last points.
        size_t idx = keep == n ? k : (keep == 1 ? n - 1 : k * (n - 1) / (keep - 1));
        s->add_steps((*points)[b + idx].step);
        s->add_values((*points)[b + idx].value);
      }
      b = e;
    }
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::CompareSweep(grpc::ServerContext* sctx, const v1::CompareSweepRequest* req,
                                            v1::CompareSweepResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "CompareSweep", [&](const Identity& who) -> grpc::Status {
    (void)who;
    if (auto st = RequireId(req->sweep_id(), "sweep_id"); !st.ok()) return st;
    auto s = ctx_->store->GetSweep(req->sweep_id());
    if (!s.ok()) return ToGrpc(s.status());
    auto jobs = ctx_->store->ListJobs(req->sweep_id());
    if (!jobs.ok()) return ToGrpc(jobs.status());
    auto peak = ctx_->store->MaxMetric(req->sweep_id(), "train/peak_memory_bytes");
    if (!peak.ok()) return ToGrpc(peak.status());
    for (const auto& f : s->factor_names) resp->add_factor_names(f);
    for (const auto& j : *jobs) {
      v1::CompareRow* row = resp->add_rows();
      row->set_job_id(j.id);
      for (const auto& [k, v] : j.factors) (*row->mutable_factors())[k] = v;
      row->set_state(ToProto(j.state));
      row->set_final_train_loss(Metric(j, "train/loss"));
      row->set_final_eval_loss(Metric(j, "eval/loss"));
      row->set_eval_perplexity(Metric(j, "eval/perplexity"));
      row->set_tokens_per_sec(Metric(j, "train/tokens_per_sec"));
      auto it = peak->find(j.id);
      row->set_peak_memory_bytes(it == peak->end() ? std::nan("") : it->second);
      row->set_steps(j.latest_step);
    }
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::CancelJob(grpc::ServerContext* sctx, const v1::CancelJobRequest* req,
                                         v1::CancelJobResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "CancelJob", [&](const Identity& who) -> grpc::Status {
    if (auto st = RequireId(req->job_id(), "job_id"); !st.ok()) return st;
    auto r = ctx_->store->CancelJob(req->job_id());
    if (!r.ok()) return ToGrpc(r.status());
    resp->set_cancelled(*r);
    LogInfo("job_cancel_requested", {{"job_id", std::to_string(req->job_id())}, {"by", who.name}});
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::ExtendSweep(grpc::ServerContext* sctx, const v1::ExtendSweepRequest* req,
                                           v1::ExtendSweepResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "ExtendSweep", [&](const Identity& who) -> grpc::Status {
    if (auto st = RequireId(req->sweep_id(), "sweep_id"); !st.ok()) return st;
    auto exp = sweep::ParseAndExpand(req->spec_yaml(), ctx_->max_cells);
    if (!exp.ok()) return ToGrpc(exp.status());
    NewSweep ns;
    ns.name = exp->spec.name;
    ns.factor_names = exp->factor_names;
    for (const auto& c : exp->cells) {
      ns.jobs.push_back({c.cell_index, c.factors, c.params, c.config_hash, c.total_steps, c.mem_estimate_bytes, c.gpus, c.ranks});
    }
    auto r = ctx_->store->ExtendSweep(req->sweep_id(), ns);
    if (!r.ok()) return ToGrpc(r.status());
    auto s = ctx_->store->GetSweep(req->sweep_id());
    if (!s.ok()) return ToGrpc(s.status());
    ToProto(*s, resp->mutable_sweep());
    resp->set_added(r->added);
    resp->set_reused(r->reused);
    resp->set_already_present(r->already_present);
    LogInfo("sweep_extended", {{"sweep_id", std::to_string(req->sweep_id())}, {"added", std::to_string(r->added)},
                               {"reused", std::to_string(r->reused)}, {"by", who.name}});
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::CreateSchedule(grpc::ServerContext* sctx, const v1::CreateScheduleRequest* req,
                                              v1::Schedule* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "CreateSchedule", [&](const Identity& who) -> grpc::Status {
    static const std::regex name_re(R"(^[A-Za-z0-9._-]{1,64}$)");
    if (!req->name().empty() && !std::regex_match(req->name(), name_re)) {
      return grpc::Status(grpc::INVALID_ARGUMENT, "name: must match [A-Za-z0-9._-]{1,64}");
    }
    auto cron = sweep::ParseCron(req->cron());
    if (!cron.ok()) return ToGrpc(cron.status());
    auto exp = sweep::ParseAndExpand(req->spec_yaml(), ctx_->max_cells);  // reject a bad file now, not at 2 am
    if (!exp.ok()) return ToGrpc(exp.status());
    int64_t now_s = std::chrono::duration_cast<std::chrono::seconds>(
                        std::chrono::system_clock::now().time_since_epoch()).count();
    int64_t next = sweep::CronNext(*cron, now_s);
    if (next < 0) return grpc::Status(grpc::INVALID_ARGUMENT, "cron: never fires within 5 years");
    auto r = ctx_->store->CreateSchedule(req->name().empty() ? exp->spec.name : req->name(), req->cron(),
                                         req->spec_yaml(), next * 1000);
    if (!r.ok()) return ToGrpc(r.status());
    ToProto(*r, resp);
    LogInfo("schedule_created", {{"schedule_id", std::to_string(r->id)}, {"cron", req->cron()}, {"by", who.name}});
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::ListSchedules(grpc::ServerContext* sctx, const v1::ListSchedulesRequest*,
                                             v1::ListSchedulesResponse* resp) {
  return Instrumented(ctx_, sctx, "SweepService", "ListSchedules", [&](const Identity&) -> grpc::Status {
    auto r = ctx_->store->ListSchedules();
    if (!r.ok()) return ToGrpc(r.status());
    for (const auto& s : *r) ToProto(s, resp->add_schedules());
    return grpc::Status::OK;
  });
}

grpc::Status SweepServiceImpl::DeleteSchedule(grpc::ServerContext* sctx, const v1::DeleteScheduleRequest* req,
                                              v1::DeleteScheduleResponse*) {
  return Instrumented(ctx_, sctx, "SweepService", "DeleteSchedule", [&](const Identity&) -> grpc::Status {
    if (auto st = RequireId(req->schedule_id(), "schedule_id"); !st.ok()) return st;
    return ToGrpc(ctx_->store->DeleteSchedule(req->schedule_id()));
  });
}

grpc::Status SweepServiceImpl::QuarantineWorker(grpc::ServerContext* sctx, const v1::QuarantineWorkerRequest* req,
                                                v1::QuarantineWorkerResponse*) {
  return Instrumented(ctx_, sctx, "SweepService", "QuarantineWorker", [&](const Identity& who) -> grpc::Status {
    if (auto st = CheckName("worker_id", req->worker_id(), 128); !st.ok()) return st;
    int dur = req->duration_s() > 0 ? req->duration_s() : ctx_->policy.quarantine_s;
    auto st = ctx_->store->SetQuarantine(req->worker_id(), req->quarantine(), dur,
                                         req->reason().substr(0, 500) + " (by " + who.name + ")");
    if (st.ok()) LogWarn(req->quarantine() ? "worker_quarantined" : "worker_released",
                         {{"worker_id", req->worker_id()}, {"by", who.name}});
    return ToGrpc(st);
  });
}

}  // namespace ablate::scheduler::rpc
