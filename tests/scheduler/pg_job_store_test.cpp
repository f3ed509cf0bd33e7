// PgJobStore contract tests against a real PostgreSQL (label pg).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <mutex>
#include <set>
#include <thread>

#include "scheduler/store/pg/migrate.h"
#include "scheduler/store/pg/pg_job_store.h"
#include "scheduler/util/call_budget.h"
#include "tests/scheduler/pg_store_test.h"

namespace ablate::scheduler {
namespace {

using ::testing::HasSubstr;

NewSweep MakeSweep(const std::string& key, int n_jobs, const std::string& spec_hash = "hash-a") {
  NewSweep s;
  s.name = "t";
  s.spec_yaml = "name: t\n";
  s.idempotency_key = key;
  s.spec_hash = spec_hash;
  s.factor_names = {"context_length"};
  for (int i = 0; i < n_jobs; ++i) {
    std::string cl = std::to_string(128 * (i + 1));
    s.jobs.push_back({i, {{"context_length", cl}}, {{"context_length", cl}, {"num_train_steps", "10"}}, "h" + cl, 10});
  }
  return s;
}

class PgJobStoreTest : public testing::PgStoreTest {
 protected:
  PgJobStoreTest() : PgStoreTest(16) {}
};

TEST_F(PgJobStoreTest, MigrationsApplyTwiceIdempotently) {
  auto again = pg::Migrate(db_->dsn());  // SetUp applied them once
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->applied, 0);
  EXPECT_EQ(again->schema_version, pg::LatestMigrationVersion());
  EXPECT_EQ(Count("SELECT count(*) FROM schema_migrations"), pg::LatestMigrationVersion());
  EXPECT_TRUE(pg::CheckSchemaCurrent(db_->dsn()).ok());
}

TEST_F(PgJobStoreTest, EditedMigrationIsRefused) {
  db_->Query("UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1");
  auto m = pg::Migrate(db_->dsn());
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(m.status().message()), HasSubstr("changed after being applied"));
}

TEST_F(PgJobStoreTest, CreateSweepInsertsSweepAndJobsAtomically) {
  auto ok = store_->CreateSweep(MakeSweep("k1", 3));
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->created);
  EXPECT_EQ(ok->sweep.total_jobs, 3);
  EXPECT_EQ(ok->sweep.job_counts.at("queued"), 3);

  NewSweep bad = MakeSweep("k2", 3);
  bad.jobs[2].cell_index = 0;  // violates UNIQUE (sweep_id, cell_index) after the sweep row was inserted
  auto r = store_->CreateSweep(bad);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kAlreadyExists) << r.status();
  EXPECT_EQ(Count("SELECT count(*) FROM sweeps"), 1);  // the failed sweep left nothing behind
  EXPECT_EQ(Count("SELECT count(*) FROM jobs"), 3);
}

TEST_F(PgJobStoreTest, IdempotencyKeyReturnsExistingSweep) {
  auto a = store_->CreateSweep(MakeSweep("same", 2));
  auto b = store_->CreateSweep(MakeSweep("same", 2));
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(a->created);
  EXPECT_FALSE(b->created);
  EXPECT_EQ(a->sweep.id, b->sweep.id);
  EXPECT_EQ(Count("SELECT count(*) FROM jobs"), 2);
  auto c = store_->CreateSweep(MakeSweep("same", 2, "another-spec"));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(PgJobStoreTest, ConcurrentLeasesNeverHandOneJobToTwoWorkers) {
  constexpr int kJobs = 60, kThreads = 8;
  ASSERT_TRUE(store_->CreateSweep(MakeSweep("conc", kJobs)).ok());
  std::mutex mu;
  std::vector<int64_t> leased;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      while (true) {
        auto g = store_->LeaseNextJob("w" + std::to_string(t), 60);
        ASSERT_TRUE(g.ok()) << g.status();
        if (!g->has_value()) return;
        std::lock_guard<std::mutex> lock(mu);
        leased.push_back((*g)->job.id);
      }
    });
  }
  for (auto& t : threads) t.join();
  std::set<int64_t> unique(leased.begin(), leased.end());
  EXPECT_EQ(leased.size(), static_cast<size_t>(kJobs));
  EXPECT_EQ(unique.size(), static_cast<size_t>(kJobs));
  EXPECT_EQ(Count("SELECT count(*) FROM jobs WHERE state = 'leased' AND attempt = 1 AND lease_epoch = 1"), kJobs);
}

TEST_F(PgJobStoreTest, ExpiredLeaseIsRequeuedWithAttemptIncrementedAndStaleEpochIsFenced) {
  ASSERT_TRUE(store_->CreateSweep(MakeSweep("exp", 1)).ok());
  auto first = store_->LeaseNextJob("w1", 0);  // expires at once
  ASSERT_TRUE(first.ok() && first->has_value());
  Lease old = (*first)->lease;
  EXPECT_EQ(old.attempt, 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  auto ex = store_->ExpireLeases(3);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->requeued, 1);
  EXPECT_EQ(Count("SELECT count(*) FROM job_attempts WHERE outcome = 'expired' AND attempt = 1"), 1);

  auto second = store_->LeaseNextJob("w2", 60);
  ASSERT_TRUE(second.ok() && second->has_value());
  Lease cur = (*second)->lease;
  EXPECT_EQ(cur.job_id, old.job_id);
  EXPECT_EQ(cur.attempt, 2);
  EXPECT_EQ(cur.lease_epoch, old.lease_epoch + 1);

  // The zombie's writes are all rejected.
  auto hb = store_->Heartbeat("w1", old, 5, 60);
  EXPECT_EQ(hb.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(hb.status().message()), HasSubstr("stale lease"));
  auto m = store_->AppendMetrics(old, {{1, "train/loss", 3.0, 0}});
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->RecordCheckpoint(old, 1, "/x").code(), absl::StatusCode::kFailedPrecondition);
  auto done = store_->CompleteJob(old, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 3);
  EXPECT_EQ(done.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Count("SELECT count(*) FROM metrics"), 0);

  // The current holder proceeds.
  auto hb2 = store_->Heartbeat("w2", cur, 0, 60);
  ASSERT_TRUE(hb2.ok()) << hb2.status();
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "running");
  auto unknown = store_->Heartbeat("w2", Lease{999999, 1, 1, 0}, 0, 60);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
}

// F16: a failover to an asynchronous replica that had not received the grant rolls the job back to queued, and the
// next grant hands out the same attempt and epoch numbers again. Only the nonce tells the two holders apart: every
// write of the old holder is fenced, and the error says that the epoch was reissued.
TEST_F(PgJobStoreTest, EpochReissuedAfterARollbackIsFencedByTheNonce) {
  ASSERT_TRUE(store_->CreateSweep(MakeSweep("reissue", 1)).ok());
  auto first = store_->LeaseNextJob("w1", 60);
  ASSERT_TRUE(first.ok() && first->has_value());
  Lease old = (*first)->lease;
  ASSERT_TRUE(store_->Heartbeat("w1", old, 3, 60).ok());
  // What the promoted replica has: the job as it was before the grant (queued, attempt 0, epoch 0), no attempt row.
  db_->Query("UPDATE jobs SET state = 'queued', attempt = attempt - 1, lease_epoch = lease_epoch - 1, "
             "lease_nonce = DEFAULT, worker_id = NULL, lease_expires_at = NULL, latest_step = 0");
  db_->Query("DELETE FROM job_attempts");
  auto second = store_->LeaseNextJob("w2", 60);
  ASSERT_TRUE(second.ok() && second->has_value());
  Lease cur = (*second)->lease;
  ASSERT_EQ(cur.job_id, old.job_id);
  EXPECT_EQ(cur.attempt, old.attempt);
  EXPECT_EQ(cur.lease_epoch, old.lease_epoch);
  EXPECT_NE(cur.lease_nonce, old.lease_nonce);

  auto hb = store_->Heartbeat("w1", old, 5, 60);
  EXPECT_EQ(hb.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(hb.status().message()), HasSubstr("the epoch was reissued"));
  auto m = store_->AppendMetrics(old, {{1, "train/loss", 3.0, 0}});
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->RecordCheckpoint(old, 1, "/old-holder").code(), absl::StatusCode::kFailedPrecondition);
  auto done = store_->CompleteJob(old, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 3);
  EXPECT_EQ(done.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(done.status().message()), HasSubstr("the epoch was reissued"));
  EXPECT_EQ(Count("SELECT count(*) FROM metrics"), 0);
  EXPECT_EQ(Count("SELECT count(*) FROM checkpoints"), 0);
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "leased");
  EXPECT_EQ(db_->Query("SELECT worker_id FROM jobs"), "w2");

  // The new holder's writes go through.
  ASSERT_TRUE(store_->Heartbeat("w2", cur, 1, 60).ok());
  ASSERT_TRUE(store_->AppendMetrics(cur, {{1, "train/loss", 2.0, 0}}).ok());
  ASSERT_TRUE(store_->RecordCheckpoint(cur, 1, "/new-holder").ok());
  auto ok = store_->CompleteJob(cur, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 3);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "succeeded");
}

// A connection to a server that takes no writes (a standby reached during a failover, F16) fails the write with
// kUnavailable (retryable, the worker keeps its lease), and is dropped: the next call connects again and succeeds
// once the server takes writes. Kept in the pool, it would fail every write for as long as it lived.
TEST_F(PgJobStoreTest, ReadOnlyServerIsUnavailableAndItsConnectionIsDropped) {
  const std::string db = db_->Query("SELECT current_database()");
  db_->Query("ALTER DATABASE " + db + " SET default_transaction_read_only = on");
  auto fresh = std::make_unique<pg::PgJobStore>(db_->dsn(), 1);  // one connection: a kept one would be reused
  auto r = fresh->CreateSweep(MakeSweep("ro", 1));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("read-only"));
  db_->Query("SET TRANSACTION READ WRITE; ALTER DATABASE " + db + " RESET default_transaction_read_only");
  auto again = fresh->CreateSweep(MakeSweep("ro", 1));
  EXPECT_TRUE(again.ok()) << again.status();
}

TEST_F(PgJobStoreTest, ExpiryFailsTheJobAfterMaxAttempts) {
  ASSERT_TRUE(store_->CreateSweep(MakeSweep("maxatt", 1)).ok());
  for (int attempt = 1; attempt <= 2; ++attempt) {
    auto g = store_->LeaseNextJob("w", 0);
    ASSERT_TRUE(g.ok() && g->has_value());
    EXPECT_EQ((*g)->lease.attempt, attempt);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_TRUE(store_->ExpireLeases(2).ok());
  }
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "failed");
  EXPECT_EQ(db_->Query("SELECT state FROM sweeps"), "failed");
  auto none = store_->LeaseNextJob("w", 60);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

TEST_F(PgJobStoreTest, MetricsAreIdempotentOnRetry) {
  ASSERT_TRUE(store_->CreateSweep(MakeSweep("met", 1)).ok());
  auto g = store_->LeaseNextJob("w", 60);
  ASSERT_TRUE(g.ok() && g->has_value());
  std::vector<MetricSample> batch = {{10, "train/loss", 3.5, 1764390000000},
                                     {10, "train/tokens_per_sec", 5e4, 1764390000000},
                                     {20, "train/loss", std::nan(""), 0}};
  auto a = store_->AppendMetrics((*g)->lease, batch);
  auto b = store_->AppendMetrics((*g)->lease, batch);  // the worker retried the same batch
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_EQ(a->inserted, 3);
  EXPECT_EQ(b->inserted, 0);
  EXPECT_EQ(b->accepted, 3);
  EXPECT_EQ(Count("SELECT count(*) FROM metrics"), 3);
  auto job = store_->GetJob((*g)->job.id);
  ASSERT_TRUE(job.ok());
  EXPECT_TRUE(std::isnan(job->latest_metrics.at("train/loss")));  // step 20 is the latest
  EXPECT_EQ(job->latest_metrics.at("train/tokens_per_sec"), 5e4);
}

TEST_F(PgJobStoreTest, FailedAttemptsRetryUnlessInvalidConfig) {
  auto s = store_->CreateSweep(MakeSweep("retry", 2));
  ASSERT_TRUE(s.ok());
  auto g1 = store_->LeaseNextJob("w", 60);
  auto r1 = store_->CompleteJob((*g1)->lease, Outcome::kFailed, FailureClass::kOom, "CUDA OOM", 4, 3);
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(*r1, JobState::kQueued);  // retried

  auto g2 = store_->LeaseNextJob("w", 60);  // the other (older-queued) job
  auto r2 = store_->CompleteJob((*g2)->lease, Outcome::kFailed, FailureClass::kInvalidConfig, "bad flag", 2, 3);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(*r2, JobState::kFailed);  // never retried

  auto g3 = store_->LeaseNextJob("w", 60);
  ASSERT_TRUE(g3->has_value());
  EXPECT_EQ((*g3)->job.id, (*g1)->job.id);
  EXPECT_EQ((*g3)->lease.attempt, 2);
  ASSERT_TRUE(store_->RecordCheckpoint((*g3)->lease, 5, "/ckpt/5").ok());
  auto r3 = store_->CompleteJob((*g3)->lease, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 3);
  ASSERT_EQ(*r3, JobState::kSucceeded);
  auto sweep = store_->GetSweep(s->sweep.id);
  ASSERT_TRUE(sweep.ok());
  EXPECT_EQ(sweep->state, SweepState::kFailed);  // every job terminal, one failed
  EXPECT_EQ(Count("SELECT count(*) FROM job_attempts"), 3);
  // Completing twice is fenced: the lease is no longer live.
  auto again = store_->CompleteJob((*g3)->lease, Outcome::kSucceeded, FailureClass::kUnspecified, "", 0, 3);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(PgJobStoreTest, CancelSweepCancelsQueuedAndFlagsRunning) {
  auto s = store_->CreateSweep(MakeSweep("cancel", 3));
  auto g = store_->LeaseNextJob("w", 60);
  ASSERT_TRUE(g.ok() && g->has_value());
  auto n = store_->CancelSweep(s->sweep.id);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 3);
  EXPECT_EQ(Count("SELECT count(*) FROM jobs WHERE state = 'cancelled'"), 2);
  auto hb = store_->Heartbeat("w", (*g)->lease, 1, 60);
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->cancel_requested);
  EXPECT_EQ(store_->GetSweep(s->sweep.id)->state, SweepState::kActive);
  // A failure after cancel is not retried.
  auto r = store_->CompleteJob((*g)->lease, Outcome::kFailed, FailureClass::kCrash, "killed", -9, 3);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, JobState::kCancelled);
  EXPECT_EQ(store_->GetSweep(s->sweep.id)->state, SweepState::kCancelled);
  EXPECT_EQ(store_->CancelSweep(424242).status().code(), absl::StatusCode::kNotFound);
}

// F17/F36: a statement waiting for a table lock that someone else holds ends at the call's budget with kUnavailable
// (the server's lock_timeout is set to what is left of it), not after lock_timeout (5 s), and its connection stays
// usable.
TEST_F(PgJobStoreTest, StatementBehindALockEndsAtTheCallBudget) {
  ASSERT_TRUE(store_->CreateSweep(MakeSweep("lock", 1)).ok());
  auto g = store_->LeaseNextJob("w1", 60);
  ASSERT_TRUE(g.ok() && g->has_value());
  auto locker = pg::Connect(db_->dsn());
  ASSERT_TRUE(locker.ok()) << locker.status();
  ASSERT_TRUE(pg::ExecScript(locker->get(), "lock", "BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE").ok());
  const auto t0 = std::chrono::steady_clock::now();
  {
    CallBudget budget(std::chrono::milliseconds(400));
    auto hb = store_->Heartbeat("w1", (*g)->lease, 1, 60);
    EXPECT_EQ(hb.status().code(), absl::StatusCode::kUnavailable) << hb.status();
  }
  const auto took =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(took, 200);
  EXPECT_LT(took, 1500);
  ASSERT_TRUE(pg::ExecScript(locker->get(), "unlock", "COMMIT").ok());
  auto hb = store_->Heartbeat("w1", (*g)->lease, 2, 60);
  EXPECT_TRUE(hb.ok()) << hb.status();
  EXPECT_EQ(Count("SELECT latest_step FROM jobs"), 2);
}

// F17/F18: an expiry pass that the database held up (here behind a lock on jobs) reaps nothing, since the holders'
// renewals were held up too; the next pass, without a stall, reaps as before.
TEST_F(PgJobStoreTest, ExpireReapsNothingAfterAStall) {
  store_->set_reap_stall_limit_ms(200);
  ASSERT_TRUE(store_->CreateSweep(MakeSweep("stall", 1)).ok());
  auto g = store_->LeaseNextJob("w1", 0);  // expires at once
  ASSERT_TRUE(g.ok() && g->has_value());
  auto locker = pg::Connect(db_->dsn());
  ASSERT_TRUE(locker.ok()) << locker.status();
  ASSERT_TRUE(pg::ExecScript(locker->get(), "lock", "BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE").ok());
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
    (void)pg::ExecScript(locker->get(), "unlock", "COMMIT");
  });
  auto stalled = store_->ExpireLeases(3);
  release.join();
  EXPECT_EQ(stalled.status().code(), absl::StatusCode::kUnavailable) << stalled.status();
  EXPECT_EQ(db_->Query("SELECT state FROM jobs"), "leased");
  auto again = store_->ExpireLeases(3);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->requeued, 1);
}

}  // namespace
}  // namespace ablate::scheduler
