// Gang placement (jobs with ranks > 1) in PgJobStore against a real PostgreSQL (label pg): slots form a gang that
// is granted all at once, a dead member's pending slot is released, one rank's lost lease or failure ends the whole
// gang, and the next gang resumes from rank 0's checkpoint. docs/control-plane.md, "Gangs".
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <thread>

#include "scheduler/store/pg/migrate.h"
#include "scheduler/store/pg/pg_job_store.h"
#include "tests/scheduler/pg_store_test.h"

namespace ablate::scheduler {
namespace {

NewSweep GangSweep(const std::string& key, int ranks, bool with_single = false) {
  NewSweep s;
  s.name = "gang";
  s.spec_yaml = "name: gang\n";
  s.idempotency_key = key;
  s.spec_hash = key;
  s.factor_names = {"context_length"};
  NewJob j{0, {{"context_length", "128"}}, {{"context_length", "128"}, {"num_train_steps", "10"}}, "g128", 10};
  j.ranks = ranks;
  s.jobs.push_back(j);
  if (with_single) s.jobs.push_back({1, {{"context_length", "256"}}, {{"context_length", "256"}}, "g256", 10});
  return s;
}

class PgGangTest : public testing::PgStoreTest {
 protected:
  PgGangTest() : PgStoreTest(8) {}
  std::optional<LeaseGrant> Lease1(const std::string& worker, int ttl_s = 60) {
    Capacity cap;
    cap.unlimited = true;
    cap.rendezvous_addr = "127.0.0.1:" + std::to_string(20000 + worker.back());
    auto r = store_->LeaseJobFor(worker, cap, ttl_s);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return std::nullopt;
    return r->grant;
  }
  // The whole answer (grant or not, and the gangs this call failed as unschedulable).
  LeaseAttempt LeaseAll(const std::string& worker, int ttl_s = 60) {
    Capacity cap;
    cap.unlimited = true;
    cap.rendezvous_addr = "127.0.0.1:" + std::to_string(20000 + worker.back());
    auto r = store_->LeaseJobFor(worker, cap, ttl_s);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : LeaseAttempt{};
  }
  void Register(const std::string& worker, const std::string& resources_json = "{}") {
    ASSERT_TRUE(store_->UpsertWorker({worker, "host-" + worker, resources_json, "t"}).ok());
  }
  static void PastDeadline() { std::this_thread::sleep_for(std::chrono::milliseconds(1100)); }
  // Forms a 2-rank gang of w1 (rank 0) and w2 (rank 1); returns (rank 0 grant, rank 1 grant).
  std::pair<LeaseGrant, LeaseGrant> Form(const std::string& a = "w1", const std::string& b = "w2") {
    auto p = Lease1(a);
    EXPECT_FALSE(p.has_value());
    auto g1 = Lease1(b);
    auto g0 = Lease1(a);
    EXPECT_TRUE(g0.has_value() && g1.has_value());
    return {*g0, *g1};
  }

};

TEST_F(PgGangTest, GangIsGrantedOnlyWhenEverySlotIsTaken) {
  ASSERT_TRUE(store_->CreateSweep(GangSweep("form", 3)).ok());
  EXPECT_FALSE(Lease1("w1").has_value());  // pending slot, rank 0
  EXPECT_FALSE(Lease1("w1").has_value());  // renews its slot, never takes a second one
  EXPECT_FALSE(Lease1("w2").has_value());
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "queued");  // never half-started
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 2);
  auto g2 = Lease1("w3");  // the last slot leases the job for the whole gang
  ASSERT_TRUE(g2.has_value());
  EXPECT_EQ(g2->rank, 2);
  EXPECT_EQ(g2->world_size, 3);
  EXPECT_EQ(g2->lease.rank, 2);
  EXPECT_EQ(g2->master_addr, "127.0.0.1:" + std::to_string(20000 + '1'));
  EXPECT_EQ(db_->Query("SELECT state || ' ' || attempt || ' ' || worker_id FROM jobs"), "leased 1 w1");
  EXPECT_EQ(Count("SELECT count(*) FROM job_attempts"), 1);
  auto g0 = Lease1("w1");
  auto g1 = Lease1("w2");
  ASSERT_TRUE(g0.has_value() && g1.has_value());
  EXPECT_EQ(g0->rank, 0);
  EXPECT_EQ(g1->rank, 1);
  for (const auto* g : {&*g0, &*g1}) {  // one token for the gang, the rank on top
    EXPECT_EQ(g->lease.attempt, g2->lease.attempt);
    EXPECT_EQ(g->lease.lease_epoch, g2->lease.lease_epoch);
    EXPECT_EQ(g->lease.lease_nonce, g2->lease.lease_nonce);
    EXPECT_EQ(g->master_addr, g2->master_addr);
  }
  EXPECT_FALSE(Lease1("w4").has_value());  // nothing else to run
}

TEST_F(PgGangTest, MemberWithPendingSlotTakesNoOtherJobAndSinglesStillRun) {
  ASSERT_TRUE(store_->CreateSweep(GangSweep("mixed", 2, /*with_single=*/true)).ok());
  EXPECT_FALSE(Lease1("w1").has_value());  // joins the gang, waits
  EXPECT_FALSE(Lease1("w1").has_value());
  auto g = Lease1("w2");  // completes the gang
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->job.ranks, 2);
  auto single = Lease1("w3");  // an ordinary job goes to a free worker as before
  ASSERT_TRUE(single.has_value());
  EXPECT_EQ(single->job.ranks, 1);
  EXPECT_EQ(single->world_size, 1);
  EXPECT_TRUE(single->master_addr.empty());
}

// Who may write with a lease when workers authenticate (WorkerService's holder check): the job's worker, and for
// a gang every rank's worker of that attempt; nobody once the lease is not current (then the fence answers).
TEST_F(PgGangTest, LeaseHoldersAreTheJobsWorkerOrEveryRankOfTheGang) {
  ASSERT_TRUE(store_->CreateSweep(GangSweep("holders", 2, /*with_single=*/true)).ok());
  auto [g0, g1] = Form("w1", "w2");
  auto single = Lease1("w3");
  ASSERT_TRUE(single.has_value());
  auto holders = [&](const Lease& l) {
    auto h = store_->LeaseHolders(l);
    EXPECT_TRUE(h.ok()) << h.status();
    std::vector<std::string> v = h.ok() ? *h : std::vector<std::string>{};
    std::sort(v.begin(), v.end());
    return v;
  };
  EXPECT_THAT(holders(g0.lease), ::testing::ElementsAre("w1", "w2"));
  EXPECT_THAT(holders(g1.lease), ::testing::ElementsAre("w1", "w2"));
  EXPECT_THAT(holders(single->lease), ::testing::ElementsAre("w3"));
  Lease forged = single->lease;
  forged.lease_nonce = "not-the-nonce";
  EXPECT_TRUE(holders(forged).empty());
  ASSERT_TRUE(store_->CompleteJob(single->lease, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 3).ok());
  EXPECT_TRUE(holders(single->lease).empty());
}

TEST_F(PgGangTest, PendingSlotNotRenewedInTimeIsReleased) {
  ASSERT_TRUE(store_->CreateSweep(GangSweep("release", 2)).ok());
  EXPECT_FALSE(Lease1("w1", /*ttl_s=*/0).has_value());  // a slot that expires at once: its worker "died"
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(Lease1("w2").has_value());  // w1's slot is released; w2 is now rank 0 and the gang not complete
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "queued");
  EXPECT_EQ(db_->Query("SELECT worker_id || ':' || rank FROM gang_slots"), "w2:0");
  auto g = Lease1("w3");
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->rank, 1);
  EXPECT_EQ(g->master_addr, "127.0.0.1:" + std::to_string(20000 + '2'));
}

TEST_F(PgGangTest, GangIncompleteAfterTheFormationDeadlineReleasesItsSlotsAndWaits) {
  store_->set_gang_form_timeout_s(1);
  ASSERT_TRUE(store_->CreateSweep(GangSweep("deadline", 3, /*with_single=*/true)).ok());
  EXPECT_FALSE(Lease1("w1").has_value());
  EXPECT_FALSE(Lease1("w2").has_value());  // 2 of 3 slots: w1 and w2 wait
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 2);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  auto single = Lease1("w1");  // past the deadline: slots released, the gang held back, w1 free for other work
  ASSERT_TRUE(single.has_value());
  EXPECT_EQ(single->job.ranks, 1);
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);
  EXPECT_EQ(Count("SELECT count(*) FROM jobs WHERE ranks = 3 AND state = 'queued' AND not_before > now()"), 1);
  EXPECT_FALSE(Lease1("w2").has_value());  // the gang is not offered while held back
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);
}

// A gang larger than the fleet: after --gang_unformable_after deadlines in a row with fewer live workers than ranks
// it fails by itself (class unschedulable, never retried) with a reason that says what is missing, instead of
// forming and releasing forever. Before that it is only held back, and its members take other work.
TEST_F(PgGangTest, GangLargerThanTheFleetFailsAsUnschedulableAfterTheConfiguredDeadlines) {
  store_->set_gang_form_timeout_s(1);
  store_->set_gang_unformable_after(2);
  Register("w1");
  Register("w2");
  ASSERT_TRUE(store_->CreateSweep(GangSweep("too-big", 3, /*with_single=*/true)).ok());
  const std::string gang = "(SELECT id FROM jobs WHERE ranks = 3)";
  EXPECT_FALSE(Lease1("w1").has_value());
  EXPECT_FALSE(Lease1("w2").has_value());
  PastDeadline();
  auto first = LeaseAll("w1");  // deadline 1 of 2: released and held back, not failed; w1 runs the single job
  EXPECT_TRUE(first.unschedulable.empty());
  ASSERT_TRUE(first.grant.has_value());
  EXPECT_EQ(first.grant->job.ranks, 1);
  EXPECT_EQ(db_->Query("SELECT state || ' ' || gang_form_misses FROM jobs WHERE id = " + gang), "queued 1");
  PastDeadline();                          // the hold-back (as long as the deadline) is over
  EXPECT_FALSE(Lease1("w2").has_value());  // forms again
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 1);
  PastDeadline();
  auto second = LeaseAll("w2");  // deadline 2 of 2 with 2 live workers for 3 ranks: the job fails
  EXPECT_FALSE(second.grant.has_value());
  ASSERT_EQ(second.unschedulable.size(), 1u);
  const UnschedulableGang& u = second.unschedulable[0];
  EXPECT_EQ(u.ranks, 3);
  EXPECT_EQ(u.live_workers, 2);
  EXPECT_EQ(u.deadlines, 2);
  EXPECT_EQ(db_->Query("SELECT state || ' ' || failure_class FROM jobs WHERE id = " + gang), "failed unschedulable");
  EXPECT_EQ(db_->Query("SELECT last_error FROM jobs WHERE id = " + gang), u.reason);
  EXPECT_THAT(u.reason, ::testing::HasSubstr("needs 3 workers"));
  EXPECT_THAT(u.reason, ::testing::HasSubstr("only 2 live worker(s)"));
  EXPECT_THAT(u.reason, ::testing::HasSubstr("2 formation deadline(s) in a row"));
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);
  EXPECT_EQ(Count("SELECT count(*) FROM job_attempts WHERE job_id = " + gang), 0);  // it never ran
  auto j = store_->GetJob(u.job_id);
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j->failure_class, FailureClass::kUnschedulable);
  EXPECT_TRUE(j->finished_unix_ms > 0);
  // The sweep ends when its last job does: the single job still runs on w1.
  EXPECT_EQ(db_->Query("SELECT state FROM sweeps"), "active");
  ASSERT_TRUE(store_->Complete(first.grant->lease, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 10,
                               RetryPolicy{}).ok());
  EXPECT_EQ(db_->Query("SELECT state FROM sweeps"), "failed");
  PastDeadline();
  EXPECT_FALSE(Lease1("w1").has_value());  // nothing is offered again
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);
}

// Within the bound a gang may still form when workers join: a miss with too few workers, then a third worker
// registers and the next formation succeeds (and the count of misses starts again).
TEST_F(PgGangTest, GangFormsWhenWorkersJoinWithinTheBound) {
  store_->set_gang_form_timeout_s(1);
  store_->set_gang_unformable_after(2);
  Register("w1");
  Register("w2");
  ASSERT_TRUE(store_->CreateSweep(GangSweep("grows", 3)).ok());
  EXPECT_FALSE(Lease1("w1").has_value());
  EXPECT_FALSE(Lease1("w2").has_value());
  PastDeadline();
  EXPECT_TRUE(LeaseAll("w1").unschedulable.empty());
  EXPECT_EQ(db_->Query("SELECT state || ' ' || gang_form_misses FROM jobs"), "queued 1");
  Register("w3");  // the fleet grows
  PastDeadline();
  EXPECT_FALSE(Lease1("w1").has_value());
  EXPECT_FALSE(Lease1("w2").has_value());
  auto g = Lease1("w3");
  ASSERT_TRUE(g.has_value());
  EXPECT_EQ(g->world_size, 3);
  EXPECT_EQ(db_->Query("SELECT state || ' ' || gang_form_misses FROM jobs"), "leased 0");
}

// A fleet big enough but busy is not "too small": deadlines pass (the gang is held back, its members do other work)
// but it never fails, even with --gang_unformable_after 1.
TEST_F(PgGangTest, FleetBigEnoughButBusyNeverFailsTheGang) {
  store_->set_gang_form_timeout_s(1);
  store_->set_gang_unformable_after(1);
  Register("w1");
  Register("w2");
  Register("w3");  // registered and alive (it heartbeats another job), but never free to join
  ASSERT_TRUE(store_->CreateSweep(GangSweep("busy", 3)).ok());
  for (int round = 0; round < 2; ++round) {
    EXPECT_FALSE(Lease1("w1").has_value());
    EXPECT_FALSE(Lease1("w2").has_value());
    PastDeadline();
    EXPECT_TRUE(LeaseAll("w1").unschedulable.empty());
    EXPECT_EQ(db_->Query("SELECT state || ' ' || gang_form_misses FROM jobs"), "queued 0");
    EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);
    PastDeadline();
  }
}

// Only live workers that could hold one rank count: the same fit as placement (gpus devices with the job's per-GPU
// memory; a CPU worker's host memory is one device; a worker that advertises nothing fits anything). A worker not
// seen for longer than max(lease TTL, formation deadline) is not live.
TEST_F(PgGangTest, OnlyLiveWorkersThatFitAGangRankCountAsFleet) {
  store_->set_gang_form_timeout_s(1);
  store_->set_gang_unformable_after(1);
  NewSweep s = GangSweep("fit", 4);
  s.jobs[0].mem_estimate_bytes = int64_t{1} << 30;  // 1 GiB per rank
  ASSERT_TRUE(store_->CreateSweep(s).ok());
  Register("w1");                                                                // advertises nothing: fits
  Register("w2", R"({"cpuCores":8,"memoryBytes":"2147483648"})");                 // CPU, 2 GiB: fits
  Register("w3", R"({"gpus":[{"index":0,"memoryBytes":"85899345920"}]})");        // an 80 GiB GPU: fits
  Register("w4", R"({"gpus":[{"index":0,"memoryBytes":"1073741823"}]})");         // just under 1 GiB: does not
  Register("w5");                                                                // fits, but gone:
  db_->Query("UPDATE workers SET last_seen = now() - interval '1 hour' WHERE id = 'w5'");
  EXPECT_FALSE(Lease1("w1").has_value());
  EXPECT_FALSE(Lease1("w2").has_value());
  PastDeadline();
  auto r = LeaseAll("w3");
  ASSERT_EQ(r.unschedulable.size(), 1u);
  EXPECT_EQ(r.unschedulable[0].live_workers, 3);  // w1, w2, w3 (w4 too small, w5 not live)
  EXPECT_THAT(r.unschedulable[0].reason, ::testing::HasSubstr("needs 4 workers"));
  EXPECT_THAT(r.unschedulable[0].reason, ::testing::HasSubstr("only 3 live worker(s)"));
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "failed");
}

TEST_F(PgGangTest, OneRankLosingItsLeaseRequeuesTheGangWhichResumesFromRankZerosCheckpoint) {
  ASSERT_TRUE(store_->CreateSweep(GangSweep("expire", 2)).ok());
  auto [g0, g1] = Form();
  ASSERT_TRUE(store_->Heartbeat("w1", g0.lease, 5, 60).ok());
  ASSERT_TRUE(store_->RecordCheckpoint(g0.lease, 5, "/ckpt/checkpoint-5").ok());
  // Rank 1's worker stops heartbeating (its slot expires now); rank 0 keeps heartbeating.
  ASSERT_TRUE(store_->Heartbeat("w2", g1.lease, -1, 0).ok());
  ASSERT_TRUE(store_->Heartbeat("w1", g0.lease, 6, 60).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  auto ex = store_->ExpireLeases(5);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->requeued, 1);
  EXPECT_EQ(db_->Query("SELECT worker_id FROM job_attempts WHERE attempt = 1"), "w1");
  EXPECT_THAT(db_->Query("SELECT message FROM job_attempts WHERE attempt = 1"), ::testing::HasSubstr("w2"));
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);
  // Rank 0's worker learns it at its next heartbeat (fenced) and stops its child.
  EXPECT_EQ(store_->Heartbeat("w1", g0.lease, 7, 60).status().code(), absl::StatusCode::kFailedPrecondition);
  // A new gang (the survivor and another worker) resumes from the checkpoint.
  auto [n0, n1] = Form("w1", "w3");
  EXPECT_EQ(n0.lease.attempt, 2);
  EXPECT_EQ(n1.lease.attempt, 2);
  EXPECT_EQ(n0.resume_checkpoint, "/ckpt/checkpoint-5");
  EXPECT_EQ(n1.resume_checkpoint, "/ckpt/checkpoint-5");
}

TEST_F(PgGangTest, RankZeroCompletesTheJobAndAFailingRankFailsTheGang) {
  ASSERT_TRUE(store_->CreateSweep(GangSweep("complete", 2)).ok());
  auto [g0, g1] = Form();
  // A member's clean exit does not finish the job: rank 0 still reports.
  auto m1 = store_->Complete(g1.lease, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, -1, RetryPolicy{});
  ASSERT_TRUE(m1.ok()) << m1.status();
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "leased");
  EXPECT_TRUE(store_->AppendMetrics(g0.lease, {{10, "train/loss", 2.5, 0}}).ok());
  auto m0 = store_->Complete(g0.lease, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 10, RetryPolicy{});
  ASSERT_TRUE(m0.ok()) << m0.status();
  EXPECT_EQ(m0->state, JobState::kSucceeded);
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);

  NewSweep again = GangSweep("fail", 2);
  again.reuse_succeeded = false;  // same config as the job that just succeeded: run it anyway
  ASSERT_TRUE(store_->CreateSweep(again).ok());
  auto [f0, f1] = Form();
  RetryPolicy p;
  p.backoff_base_ms = 0;
  auto bad = store_->Complete(f1.lease, Outcome::kFailed, FailureClass::kCrash, "rank 1 died", 139, -1, p);
  ASSERT_TRUE(bad.ok()) << bad.status();
  EXPECT_EQ(bad->state, JobState::kQueued);  // the whole gang is re-queued
  EXPECT_EQ(db_->Query("SELECT message FROM job_attempts WHERE job_id = " + std::to_string(f1.lease.job_id)),
            "rank 1 died");
  EXPECT_EQ(store_->Heartbeat("w1", f0.lease, 3, 60).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Count("SELECT count(*) FROM gang_slots"), 0);
}

}  // namespace
}  // namespace ablate::scheduler
