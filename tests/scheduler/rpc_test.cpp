// The real server on port 0 with a real gRPC client, against a real PostgreSQL (label pg).
#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include <cmath>
#include <thread>

#include "ablate/v1/ablate.grpc.pb.h"
#include "scheduler/server.h"
#include "tests/scheduler/pg_test_db.h"

namespace ablate::scheduler {
namespace {

using ::testing::HasSubstr;

constexpr const char* kSweep = R"(
name: rpc-demo
grid:
  model_size: [tiny]
  attention: [dense]
  context_length: [64, 128]
train:
  num_train_steps: 20
  batch_size: 2
)";

class RpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    db_ = testing::TestDb::Create(&why);
    if (!db_) GTEST_SKIP() << why;
    SchedulerConfig cfg;
    cfg.db_dsn = db_->dsn();
    cfg.listen = "127.0.0.1:0";
    cfg.metrics_listen = "127.0.0.1:0";
    cfg.lease_ttl_s = 30;
    auto s = SchedulerServer::Start(cfg);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
    ASSERT_GT(server_->grpc_port(), 0);
    auto channel = grpc::CreateChannel(server_->grpc_address(), grpc::InsecureChannelCredentials());
    sweeps_ = v1::SweepService::NewStub(channel);
    workers_ = v1::WorkerService::NewStub(channel);
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
    server_.reset();
  }
  std::unique_ptr<grpc::ClientContext> Ctx() {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return c;
  }

  std::unique_ptr<testing::TestDb> db_;
  std::unique_ptr<SchedulerServer> server_;
  std::unique_ptr<v1::SweepService::Stub> sweeps_;
  std::unique_ptr<v1::WorkerService::Stub> workers_;
};

TEST_F(RpcTest, InvalidSweepIsRejectedAndNothingIsStored) {
  v1::SubmitSweepRequest req;
  req.set_spec_yaml("name: bad\ngrid:\n  model_size: [tiny, huge]\n");
  v1::SubmitSweepResponse resp;
  grpc::Status st = sweeps_->SubmitSweep(Ctx().get(), req, &resp);
  EXPECT_EQ(st.error_code(), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("grid.model_size[1]: unknown model size 'huge'"));
  EXPECT_EQ(db_->Query("SELECT count(*) FROM sweeps"), "0");
  EXPECT_EQ(db_->Query("SELECT count(*) FROM jobs"), "0");
}

TEST_F(RpcTest, DryRunExpandsWithoutStoring) {
  v1::SubmitSweepRequest req;
  req.set_spec_yaml(kSweep);
  req.set_dry_run(true);
  v1::SubmitSweepResponse resp;
  ASSERT_TRUE(sweeps_->SubmitSweep(Ctx().get(), req, &resp).ok());
  EXPECT_EQ(resp.jobs_size(), 2);
  EXPECT_EQ(resp.jobs(1).params().at("context_length"), "128");
  EXPECT_EQ(resp.jobs(1).params().at("attn_type"), "dense");
  EXPECT_EQ(db_->Query("SELECT count(*) FROM sweeps"), "0");
}

TEST_F(RpcTest, SubmitLeaseHeartbeatMetricsCompleteCompare) {
  v1::SubmitSweepRequest req;
  req.set_spec_yaml(kSweep);
  v1::SubmitSweepResponse sub;
  ASSERT_TRUE(sweeps_->SubmitSweep(Ctx().get(), req, &sub).ok());
  ASSERT_TRUE(sub.created());
  const int64_t sweep_id = sub.sweep().id();
  v1::SubmitSweepResponse again;
  ASSERT_TRUE(sweeps_->SubmitSweep(Ctx().get(), req, &again).ok());
  EXPECT_FALSE(again.created());  // default idempotency key = hash of the normalized spec
  EXPECT_EQ(again.sweep().id(), sweep_id);

  v1::ListJobsRequest lj;
  lj.set_sweep_id(sweep_id);
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(sweeps_->ListJobs(Ctx().get(), lj, &jobs).ok());
  ASSERT_EQ(jobs.jobs_size(), 2);
  EXPECT_EQ(jobs.jobs(0).state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(jobs.jobs(0).total_steps(), 20);

  v1::RegisterWorkerRequest reg;
  reg.set_worker_id("w1");
  reg.set_hostname("host1");
  reg.mutable_resources()->set_cpu_cores(2);
  v1::RegisterWorkerResponse reg_resp;
  ASSERT_TRUE(workers_->RegisterWorker(Ctx().get(), reg, &reg_resp).ok());
  EXPECT_EQ(reg_resp.lease_ttl_ms(), 30000);

  for (int n = 0; n < 2; ++n) {
    v1::LeaseJobRequest lr;
    lr.set_worker_id("w1");
    v1::LeaseJobResponse lease;
    ASSERT_TRUE(workers_->LeaseJob(Ctx().get(), lr, &lease).ok());
    ASSERT_TRUE(lease.job_available());
    EXPECT_EQ(lease.lease().attempt(), 1);
    EXPECT_EQ(lease.job().params().at("model_size"), "tiny");

    v1::HeartbeatRequest hb;
    hb.set_worker_id("w1");
    *hb.mutable_lease() = lease.lease();
    hb.set_step(0);
    v1::HeartbeatResponse hb_resp;
    ASSERT_TRUE(workers_->Heartbeat(Ctx().get(), hb, &hb_resp).ok());
    EXPECT_FALSE(hb_resp.cancel_requested());
    v1::GetJobRequest gj;
    gj.set_job_id(lease.job().id());
    v1::Job job;
    ASSERT_TRUE(sweeps_->GetJob(Ctx().get(), gj, &job).ok());
    EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING);

    v1::ReportMetricsResponse mr;
    auto ctx = Ctx();
    auto writer = workers_->ReportMetrics(ctx.get(), &mr);
    for (int step = 10; step <= 20; step += 10) {
      v1::MetricBatch b;
      b.set_worker_id("w1");
      *b.mutable_lease() = lease.lease();
      auto add = [&](const char* name, double v) {
        auto* p = b.add_points();
        p->set_step(step);
        p->set_name(name);
        p->set_value(v);
        p->set_time_unix_ms(1764390000000 + step);
      };
      add("train/loss", 4.0 - step / 10.0 - n);
      add("train/tokens_per_sec", 1000.0 * step);
      add("train/peak_memory_bytes", 1e6 * (30 - step));  // peak is the max, not the latest
      if (step == 20) {
        add("eval/loss", 2.5);
        add("eval/perplexity", std::exp(2.5));
      }
      ASSERT_TRUE(writer->Write(b));
    }
    writer->WritesDone();
    ASSERT_TRUE(writer->Finish().ok());
    EXPECT_EQ(mr.points_accepted(), 8);  // 3 points at step 10, 5 at step 20

    v1::CompleteJobRequest done;
    done.set_worker_id("w1");
    *done.mutable_lease() = lease.lease();
    done.set_outcome(v1::OUTCOME_SUCCEEDED);
    v1::CompleteJobResponse done_resp;
    ASSERT_TRUE(workers_->CompleteJob(Ctx().get(), done, &done_resp).ok());
    EXPECT_EQ(done_resp.state(), v1::JOB_STATE_SUCCEEDED);

    // A stale write after completion is fenced.
    grpc::Status stale = workers_->Heartbeat(Ctx().get(), hb, &hb_resp);
    EXPECT_EQ(stale.error_code(), grpc::FAILED_PRECONDITION);
  }

  v1::CompareSweepRequest cr;
  cr.set_sweep_id(sweep_id);
  v1::CompareSweepResponse cmp;
  ASSERT_TRUE(sweeps_->CompareSweep(Ctx().get(), cr, &cmp).ok());
  ASSERT_EQ(cmp.factor_names_size(), 1);
  EXPECT_EQ(cmp.factor_names(0), "context_length");
  ASSERT_EQ(cmp.rows_size(), 2);
  for (const auto& row : cmp.rows()) {
    EXPECT_EQ(row.state(), v1::JOB_STATE_SUCCEEDED);
    EXPECT_DOUBLE_EQ(row.final_eval_loss(), 2.5);
    EXPECT_NEAR(row.eval_perplexity(), std::exp(2.5), 1e-9);
    EXPECT_DOUBLE_EQ(row.tokens_per_sec(), 20000.0);
    EXPECT_DOUBLE_EQ(row.peak_memory_bytes(), 2e7);
  }
  std::set<double> losses = {cmp.rows(0).final_train_loss(), cmp.rows(1).final_train_loss()};
  EXPECT_EQ(losses, (std::set<double>{1.0, 2.0}));

  // The sweep is terminal: WatchSweep sends one event and ends.
  v1::WatchSweepRequest wr;
  wr.set_sweep_id(sweep_id);
  wr.set_poll_interval_ms(100);
  auto wctx = Ctx();
  auto reader = sweeps_->WatchSweep(wctx.get(), wr);
  v1::SweepEvent ev;
  int events = 0;
  while (reader->Read(&ev)) ++events;
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(events, 1);
  EXPECT_EQ(ev.sweep().state(), v1::SWEEP_STATE_SUCCEEDED);
  EXPECT_EQ(ev.jobs_size(), 2);

  httplib::Client http("127.0.0.1", server_->metrics_port());
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_THAT(res->body, HasSubstr("ablate_jobs{state=\"succeeded\"} 2\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_jobs{state=\"queued\"} 0\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_sweeps{state=\"succeeded\"} 1\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_scheduler_metric_points_ingested_total 16\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_scheduler_leases_granted_total 2\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_scheduler_rpc_total{method=\"CompleteJob\",code=\"OK\"} 2\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_scheduler_rpc_total{method=\"Heartbeat\",code=\"FAILED_PRECONDITION\"} 2\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_scheduler_rpc_duration_seconds_count{method=\"SubmitSweep\"} 2\n"));
  EXPECT_THAT(res->body, HasSubstr("ablate_workers_alive 1\n"));
  auto health = http.Get("/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

// A gang larger than the fleet fails by itself, visibly: the job and the sweep are failed with class unschedulable
// and a reason in last_error (what `ablate status` and `ablate watch` print), the scheduler logs gang_unschedulable
// and counts it in /metrics.
TEST_F(RpcTest, GangLargerThanTheFleetFailsVisiblyThroughTheApi) {
  server_->Shutdown();
  SchedulerConfig cfg;
  cfg.db_dsn = db_->dsn();
  cfg.listen = "127.0.0.1:0";
  cfg.metrics_listen = "127.0.0.1:0";
  cfg.lease_ttl_s = 30;
  cfg.gang_form_timeout_s = 1;
  cfg.gang_unformable_after = 1;
  auto s = SchedulerServer::Start(cfg);
  ASSERT_TRUE(s.ok()) << s.status();
  server_ = std::move(*s);
  auto channel = grpc::CreateChannel(server_->grpc_address(), grpc::InsecureChannelCredentials());
  sweeps_ = v1::SweepService::NewStub(channel);
  workers_ = v1::WorkerService::NewStub(channel);

  v1::SubmitSweepRequest req;
  req.set_spec_yaml("name: gang3\ngrid:\n  model_size: [tiny]\ntrain:\n  num_train_steps: 20\nresources:\n  ranks: 3\n");
  v1::SubmitSweepResponse sub;
  ASSERT_TRUE(sweeps_->SubmitSweep(Ctx().get(), req, &sub).ok());
  ASSERT_EQ(sub.jobs_size(), 1);
  const int64_t job_id = sub.jobs(0).id();
  for (const char* w : {"w1", "w2"}) {
    v1::RegisterWorkerRequest reg;
    reg.set_worker_id(w);
    reg.mutable_resources()->set_cpu_cores(2);  // advertises no GPU and no memory: fits anything
    v1::RegisterWorkerResponse rr;
    ASSERT_TRUE(workers_->RegisterWorker(Ctx().get(), reg, &rr).ok());
  }
  auto lease = [&](const char* w) {
    v1::LeaseJobRequest lr;
    lr.set_worker_id(w);
    lr.set_rendezvous_addr("127.0.0.1:29500");
    v1::LeaseJobResponse resp;
    EXPECT_TRUE(workers_->LeaseJob(Ctx().get(), lr, &resp).ok());
    return resp.job_available();
  };
  EXPECT_FALSE(lease("w1"));
  EXPECT_FALSE(lease("w2"));  // 2 of 3 ranks: pending
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  ::testing::internal::CaptureStderr();
  EXPECT_FALSE(lease("w1"));  // the deadline, with 2 live workers for 3 ranks: failed
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(log, HasSubstr("event=gang_unschedulable job_id=" + std::to_string(job_id)));
  EXPECT_THAT(log, HasSubstr("live_workers=2"));

  v1::GetJobRequest gj;
  gj.set_job_id(job_id);
  v1::Job job;
  ASSERT_TRUE(sweeps_->GetJob(Ctx().get(), gj, &job).ok());
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.failure_class(), v1::FAILURE_CLASS_UNSCHEDULABLE);
  EXPECT_THAT(job.last_error(), HasSubstr("unschedulable: this gang needs 3 workers"));
  EXPECT_THAT(job.last_error(), HasSubstr("add workers or lower resources.ranks"));
  v1::GetSweepRequest gs;
  gs.set_sweep_id(sub.sweep().id());
  v1::Sweep sweep;
  ASSERT_TRUE(sweeps_->GetSweep(Ctx().get(), gs, &sweep).ok());
  EXPECT_EQ(sweep.state(), v1::SWEEP_STATE_FAILED);

  httplib::Client http("127.0.0.1", server_->metrics_port());
  auto res = http.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_THAT(res->body, HasSubstr("ablate_scheduler_gangs_unschedulable_total 1\n"));
}

TEST_F(RpcTest, CancelSweepReachesTheRunningJobsHeartbeat) {
  v1::SubmitSweepRequest req;
  req.set_spec_yaml(kSweep);
  v1::SubmitSweepResponse sub;
  ASSERT_TRUE(sweeps_->SubmitSweep(Ctx().get(), req, &sub).ok());
  v1::LeaseJobRequest lr;
  lr.set_worker_id("w1");
  v1::LeaseJobResponse lease;
  ASSERT_TRUE(workers_->LeaseJob(Ctx().get(), lr, &lease).ok());
  v1::CancelSweepRequest cancel;
  cancel.set_sweep_id(sub.sweep().id());
  v1::CancelSweepResponse cancel_resp;
  ASSERT_TRUE(sweeps_->CancelSweep(Ctx().get(), cancel, &cancel_resp).ok());
  EXPECT_EQ(cancel_resp.jobs_cancelled(), 2);
  v1::HeartbeatRequest hb;
  hb.set_worker_id("w1");
  *hb.mutable_lease() = lease.lease();
  hb.set_step(3);
  v1::HeartbeatResponse hb_resp;
  ASSERT_TRUE(workers_->Heartbeat(Ctx().get(), hb, &hb_resp).ok());
  EXPECT_TRUE(hb_resp.cancel_requested());
  v1::GetSweepRequest gs;
  gs.set_sweep_id(9999);
  v1::Sweep s;
  EXPECT_EQ(sweeps_->GetSweep(Ctx().get(), gs, &s).error_code(), grpc::NOT_FOUND);
  v1::LeaseJobResponse none;
  ASSERT_TRUE(workers_->LeaseJob(Ctx().get(), lr, &none).ok());
  EXPECT_FALSE(none.job_available());
}

}  // namespace
}  // namespace ablate::scheduler
