// Gang placement (jobs with ranks > 1) in PgJobStore against a real PostgreSQL (label pg): slots form a gang that
// is granted all at once, a dead member's pending slot is released, one rank's lost lease or failure ends the whole
// gang, and the next gang resumes from rank 0's checkpoint. docs/control-plane.md, "Gangs".
#include <gmock/gmock.h>
#include <gtest/gtest.h>

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
