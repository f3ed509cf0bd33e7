// A finished attempt's undelivered metric points and its report during (and after) a long scheduler database
// outage: the real Worker loop and a real child (a shell script playing ablate-train) against an in-process fake
// WorkerService whose "database" can be switched off (UNAVAILABLE + ablate-store-unavailable, as the scheduler
// answers) or that fences the lease (FAILED_PRECONDITION). docs/control-plane.md, "Metric spill on the worker".
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ablate/v1/ablate.grpc.pb.h"
#include "worker/metrics.h"
#include "worker/util.h"
#include "worker/worker.h"

namespace ablate::worker {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr int kSteps = 300;               // the child's steps; two points per step
constexpr int kPoints = 2 * kSteps;

// The scheduler as the worker sees it. Once the attempt is completed (or `fenced`), every write with its lease is
// FAILED_PRECONDITION, as the real fence (state leased|running and the same token) answers.
class FakeScheduler final : public v1::WorkerService::Service {
 public:
  std::atomic<bool> store_down{false};       // the database is away: UNAVAILABLE with the store-unavailable trailer
  std::atomic<bool> down_after_lease{false};  // switch the database off as soon as the job is leased
  std::atomic<bool> fenced{false};           // the lease is no longer current (the job moved on)
  std::atomic<bool> offer_job{true};         // the next LeaseJob hands out the job (once)

  std::mutex mu;
  std::map<std::pair<std::string, int64_t>, double> points;  // (name, step) -> value: the idempotent upsert
  std::vector<v1::CompleteJobRequest> completions;
  size_t points_at_completion = 0;
  std::vector<std::string> calls;  // "lease", "metrics", "complete" in the order they succeeded
  int failed_metric_streams = 0;

  v1::Lease lease;

  FakeScheduler() {
    lease.set_job_id(7);
    lease.set_attempt(1);
    lease.set_lease_epoch(3);
    lease.set_lease_nonce("0123456789abcdef0123456789abcdef");
  }

  grpc::Status RegisterWorker(grpc::ServerContext*, const v1::RegisterWorkerRequest*,
                              v1::RegisterWorkerResponse* resp) override {
    resp->set_lease_ttl_ms(2000);
    resp->set_heartbeat_interval_ms(200);
    return grpc::Status::OK;
  }

  grpc::Status LeaseJob(grpc::ServerContext* ctx, const v1::LeaseJobRequest*, v1::LeaseJobResponse* resp) override {
    if (store_down) return Down(ctx);
    std::lock_guard<std::mutex> lk(mu);
    calls.push_back("lease");
    if (!offer_job.exchange(false)) {
      resp->set_job_available(false);
      return grpc::Status::OK;
    }
    resp->set_job_available(true);
    resp->mutable_job()->set_id(lease.job_id());
    resp->mutable_job()->set_attempt(lease.attempt());
    (*resp->mutable_job()->mutable_params())["num_train_steps"] = std::to_string(kSteps);
    *resp->mutable_lease() = lease;
    if (down_after_lease) store_down = true;
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override {
    if (auto st = Fence(ctx, req->lease()); !st.ok()) return st;
    *resp->mutable_lease() = req->lease();
    return grpc::Status::OK;
  }

  grpc::Status ReportMetrics(grpc::ServerContext* ctx, grpc::ServerReader<v1::MetricBatch>* reader,
                             v1::ReportMetricsResponse* resp) override {
    v1::MetricBatch b;
    std::vector<v1::MetricPoint> got;
    while (reader->Read(&b)) {
      if (auto st = Fence(ctx, b.lease()); !st.ok()) {
        std::lock_guard<std::mutex> lk(mu);
        ++failed_metric_streams;
        return st;
      }
      got.insert(got.end(), b.points().begin(), b.points().end());
    }
    std::lock_guard<std::mutex> lk(mu);
    for (const auto& p : got) points[{p.name(), p.step()}] = p.value();
    calls.push_back("metrics");
    resp->set_points_accepted(static_cast<int64_t>(got.size()));
    return grpc::Status::OK;
  }

  grpc::Status ReportCheckpoint(grpc::ServerContext* ctx, const v1::ReportCheckpointRequest* req,
                                v1::ReportCheckpointResponse*) override {
    return Fence(ctx, req->lease());
  }

  grpc::Status CompleteJob(grpc::ServerContext* ctx, const v1::CompleteJobRequest* req,
                           v1::CompleteJobResponse* resp) override {
    if (auto st = Fence(ctx, req->lease()); !st.ok()) return st;
    std::lock_guard<std::mutex> lk(mu);
    completions.push_back(*req);
    points_at_completion = points.size();
    calls.push_back("complete");
    resp->set_state(v1::JOB_STATE_SUCCEEDED);
    return grpc::Status::OK;
  }

  size_t Points() {
    std::lock_guard<std::mutex> lk(mu);
    return points.size();
  }
  size_t Completions() {
    std::lock_guard<std::mutex> lk(mu);
    return completions.size();
  }
  int FailedMetricStreams() {
    std::lock_guard<std::mutex> lk(mu);
    return failed_metric_streams;
  }

 private:
  grpc::Status Down(grpc::ServerContext* ctx) {
    ctx->AddTrailingMetadata("ablate-store-unavailable", "1");
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "database unavailable");
  }
  grpc::Status Fence(grpc::ServerContext* ctx, const v1::Lease& l) {
    if (store_down) return Down(ctx);
    std::lock_guard<std::mutex> lk(mu);
    if (fenced || !completions.empty() || l.job_id() != lease.job_id() || l.attempt() != lease.attempt() ||
        l.lease_epoch() != lease.lease_epoch() || l.lease_nonce() != lease.lease_nonce()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "stale lease");
    }
    return grpc::Status::OK;
  }
};

class DeliveryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ablate-delivery-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    grpc::ServerBuilder b;
    b.RegisterService(&fake_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    channel_ = server_->InProcessChannel(grpc::ChannelArguments());
    // The child: all its steps at once, then it ends (touching a marker just before it exits).
    train_ = dir_ + "/fake-train.sh";
    std::ofstream(train_) << "#!/bin/sh\n"
                          << "echo '{\"event\":\"started\",\"total_steps\":" << kSteps << ",\"params\":1}' >&3\n"
                          << "i=1\nwhile [ $i -le " << kSteps << " ]; do\n"
                          << "  echo \"{\\\"event\\\":\\\"metrics\\\",\\\"step\\\":$i,\\\"values\\\":"
                             "{\\\"train/loss\\\":1.5,\\\"train/lr\\\":0.001}}\" >&3\n"
                          << "  i=$((i+1))\ndone\n"
                          << "echo '{\"event\":\"finished\",\"status\":\"succeeded\"}' >&3\n"
                          << "touch " << dir_ << "/child-done\nexit 0\n";
    chmod(train_.c_str(), 0755);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + 2s);
    fs::remove_all(dir_);
  }

  WorkerOptions Options() {
    WorkerOptions o;
    o.worker_id = "wdeliver";
    o.train_bin = train_;
    o.data_root = dir_ + "/data";
    o.work_dir = dir_ + "/work";
    o.poll_interval = 100ms;
    o.once = true;
    o.rpc_timeout = 2000ms;
    o.kill_grace = 1000ms;
    return o;
  }
  std::string SpillRoot() { return dir_ + "/work/.spill/wdeliver"; }
  std::string AttemptSpill() { return SpillRoot() + "/job-7-a1"; }
  bool ChildDone() { return fs::exists(dir_ + "/child-done"); }

  // Runs a worker (Run()) on a thread.
  struct Running {
    WorkerMetrics metrics;
    Stopper stop;
    std::future<int> rc;
  };
  std::unique_ptr<Running> Start(WorkerOptions o) {
    auto r = std::make_unique<Running>();
    auto* p = r.get();
    r->rc = std::async(std::launch::async, [this, o, p] {
      Worker w(o, channel_, &p->metrics, &p->stop);
      return w.Run();
    });
    return r;
  }
  // Waits for the worker to return; on timeout fails, then lets it finish (database up, stop) so the test ends.
  void Finish(Running* r, std::chrono::seconds timeout, const char* what) {
    if (r->rc.wait_for(timeout) != std::future_status::ready) {
      ADD_FAILURE() << what << ": the worker did not return within " << timeout.count() << " s";
      r->stop.Stop();
      fake_.store_down = false;
    }
    EXPECT_EQ(r->rc.get(), 0);
  }
  void WaitFor(const std::function<bool()>& cond, std::chrono::seconds timeout, const char* what) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (!cond()) {
      ASSERT_LT(std::chrono::steady_clock::now(), end) << "timed out waiting for " << what;
      std::this_thread::sleep_for(20ms);
    }
  }

  std::string dir_, train_;
  FakeScheduler fake_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
};

// The job finishes early in an outage that lasts longer than the old 30 s "drop after the child exited" bound: the
// worker holds the attempt (heartbeating it), and once the database is back every point is stored, then the report.
TEST_F(DeliveryTest, FinishedAttemptIsHeldThroughALongOutageAndDeliveredAfterIt) {
  fake_.down_after_lease = true;
  auto w = Start(Options());
  WaitFor([&] { return ChildDone(); }, 20s, "the child to finish");
  for (int i = 0; i < 34 * 10; ++i) {  // 34 s of outage after the child exited
    std::this_thread::sleep_for(100ms);
    ASSERT_EQ(fake_.Completions(), 0u);
    ASSERT_NE(w->rc.wait_for(0s), std::future_status::ready) << "the worker gave up on the finished attempt";
  }
  EXPECT_TRUE(fs::exists(AttemptSpill() + "/complete.pb")) << "the report is not stored next to the points";
  EXPECT_EQ(fake_.Points(), 0u);
  fake_.store_down = false;
  Finish(w.get(), 30s, "after the outage");
  std::lock_guard<std::mutex> lk(fake_.mu);
  EXPECT_EQ(fake_.points.size(), static_cast<size_t>(kPoints)) << "points lost";
  ASSERT_EQ(fake_.completions.size(), 1u);
  EXPECT_EQ(fake_.completions[0].outcome(), v1::OUTCOME_SUCCEEDED);
  EXPECT_EQ(fake_.points_at_completion, static_cast<size_t>(kPoints)) << "reported before all points were stored";
  EXPECT_EQ(w->metrics.points_dropped.load(), 0);
  EXPECT_FALSE(fs::exists(AttemptSpill())) << "the attempt's spill directory outlived its delivery";
}

// The worker is stopped (drained) during the outage after its child finished: points and report stay on disk, and
// the next start delivers both, in that order, before it asks for new work (it does not lease while the database
// is still away).
TEST_F(DeliveryTest, FinishedAttemptSurvivesAWorkerRestartDuringTheOutage) {
  fake_.down_after_lease = true;
  auto a = Start(Options());
  WaitFor([&] { return ChildDone(); }, 20s, "the child to finish");
  WaitFor([&] { return fake_.FailedMetricStreams() > 0; }, 10s, "a failed delivery");
  std::this_thread::sleep_for(500ms);
  a->stop.Stop();
  Finish(a.get(), 25s, "stopping during the outage");
  EXPECT_EQ(fake_.Completions(), 0u);
  EXPECT_EQ(a->metrics.points_dropped.load(), 0);
  ASSERT_TRUE(fs::exists(AttemptSpill() + "/complete.pb")) << "the report was not kept for the next start";
  ASSERT_TRUE(fs::exists(AttemptSpill() + "/lease.pb"));

  // Restart while the database is still away; it comes back 3 s later.
  {
    std::lock_guard<std::mutex> lk(fake_.mu);
    fake_.calls.clear();
  }
  auto b = Start(Options());
  std::this_thread::sleep_for(3s);
  EXPECT_EQ(fake_.Completions(), 0u);
  fake_.store_down = false;
  Finish(b.get(), 40s, "the restarted worker");
  std::lock_guard<std::mutex> lk(fake_.mu);
  EXPECT_EQ(fake_.points.size(), static_cast<size_t>(kPoints)) << "points lost across the restart";
  ASSERT_EQ(fake_.completions.size(), 1u);
  EXPECT_EQ(fake_.completions[0].outcome(), v1::OUTCOME_SUCCEEDED);
  EXPECT_EQ(fake_.completions[0].lease().lease_nonce(), fake_.lease.lease_nonce());
  EXPECT_EQ(fake_.points_at_completion, static_cast<size_t>(kPoints));
  ASSERT_FALSE(fake_.calls.empty());
  EXPECT_NE(fake_.calls.front(), "lease") << "leased new work before the held attempt was delivered";
  size_t complete_at = 0, first_lease = fake_.calls.size();
  for (size_t i = 0; i < fake_.calls.size(); ++i) {
    if (fake_.calls[i] == "complete") complete_at = i;
    if (fake_.calls[i] == "lease" && first_lease == fake_.calls.size()) first_lease = i;
  }
  EXPECT_LT(complete_at, first_lease);
  EXPECT_EQ(b->metrics.points_dropped.load(), 0);
  EXPECT_FALSE(fs::exists(AttemptSpill()));
}

// Fencing still holds for a finished attempt: when its lease is gone by the time the database is back (the job
// moved on), nothing of it is written; its points are counted as dropped and its report is discarded.
TEST_F(DeliveryTest, FinishedAttemptWhoseLeaseWasLostWritesNothing) {
  fake_.down_after_lease = true;
  auto w = Start(Options());
  WaitFor([&] { return ChildDone(); }, 20s, "the child to finish");
  std::this_thread::sleep_for(1s);
  fake_.fenced = true;
  fake_.store_down = false;
  Finish(w.get(), 20s, "after the fence");
  EXPECT_EQ(fake_.Points(), 0u);
  EXPECT_EQ(fake_.Completions(), 0u);
  EXPECT_EQ(w->metrics.points_dropped.load(), kPoints);
  EXPECT_FALSE(fs::exists(AttemptSpill()));
}

// The same after a restart: the kept attempt's lease is stale by then; the points are dropped (counted), the report
// is not delivered, the directory goes, and the worker takes new work.
TEST_F(DeliveryTest, KeptAttemptWhoseLeaseWasLostIsDroppedAtTheNextStart) {
  fake_.down_after_lease = true;
  auto a = Start(Options());
  WaitFor([&] { return ChildDone(); }, 20s, "the child to finish");
  std::this_thread::sleep_for(500ms);
  a->stop.Stop();
  Finish(a.get(), 25s, "stopping during the outage");
  ASSERT_TRUE(fs::exists(AttemptSpill() + "/complete.pb"));
  fake_.fenced = true;
  fake_.store_down = false;
  auto b = Start(Options());
  Finish(b.get(), 20s, "the restarted worker");
  EXPECT_EQ(fake_.Points(), 0u);
  EXPECT_EQ(fake_.Completions(), 0u);
  EXPECT_EQ(b->metrics.points_dropped.load(), kPoints);
  EXPECT_FALSE(fs::exists(AttemptSpill()));
  std::lock_guard<std::mutex> lk(fake_.mu);
  EXPECT_EQ(std::count(fake_.calls.begin(), fake_.calls.end(), "lease"), 2) << "the restarted worker did not lease";
}

// Two replicas; the workers' channel picked the one whose own path to PostgreSQL is cut (every answer "database
// down"; it stays up, so pick_first never moves on). Everything must go through the other replica: the lease, the
// renewals (heartbeat fan-out), every metric point and the report, while the cut lasts (ReplicaRouter).
TEST_F(DeliveryTest, ReplicaCutFromTheDatabaseIsRoutedAround) {
  FakeScheduler cut;
  cut.store_down = true;
  grpc::ServerBuilder b;
  b.RegisterService(&cut);
  auto cut_server = b.BuildAndStart();
  ASSERT_NE(cut_server, nullptr);
  auto cut_channel = cut_server->InProcessChannel(grpc::ChannelArguments());
  auto good_channel = server_->InProcessChannel(grpc::ChannelArguments());
  WorkerMetrics metrics;
  Stopper stop;
  auto rc = std::async(std::launch::async, [&] {
    Worker w(Options(), cut_channel, &metrics, &stop, cut_channel, {cut_channel, good_channel},
             {cut_channel, good_channel});
    return w.Run();
  });
  if (rc.wait_for(30s) != std::future_status::ready) {
    ADD_FAILURE() << "the worker did not finish the job through the healthy replica within 30 s";
    stop.Stop();
    cut.store_down = false;
  }
  EXPECT_EQ(rc.get(), 0);
  cut_server->Shutdown(std::chrono::system_clock::now() + 2s);
  std::lock_guard<std::mutex> lk(fake_.mu);
  EXPECT_EQ(fake_.points.size(), static_cast<size_t>(kPoints)) << "points not delivered during the cut";
  ASSERT_EQ(fake_.completions.size(), 1u);
  EXPECT_EQ(fake_.completions[0].outcome(), v1::OUTCOME_SUCCEEDED);
  EXPECT_EQ(metrics.points_dropped.load(), 0);
  EXPECT_GE(metrics.replica_switches.load(), 1);
  EXPECT_TRUE(cut.completions.empty() && cut.points.empty());
  EXPECT_FALSE(fs::exists(AttemptSpill())) << "points were spilled instead of sent to the healthy replica";
}

}  // namespace
}  // namespace ablate::worker
