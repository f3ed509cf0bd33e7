// Placement (PgJobStore::LeaseJobFor): which queued job a worker gets for the GPUs / host memory it offers, and
// which GPU indices it is assigned. Table-driven; each case queues its jobs in a fresh sweep (oldest first) and
// asks once. Real PostgreSQL (label pg).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

#include "scheduler/store/pg/migrate.h"
#include "scheduler/store/pg/pg_job_store.h"
#include "tests/scheduler/pg_store_test.h"

namespace ablate::scheduler {
namespace {

constexpr int64_t G = int64_t{1} << 30;

struct JobSpec {
  int32_t gpus;
  int64_t mem;  // per GPU
};

NewSweep Sweep(const std::string& key, const std::vector<JobSpec>& jobs) {
  NewSweep s;
  s.name = "placement";
  s.spec_yaml = "name: placement\n";
  s.idempotency_key = key;
  s.spec_hash = key;
  s.factor_names = {"cell"};
  s.reuse_succeeded = false;
  for (size_t i = 0; i < jobs.size(); ++i) {
    NewJob j;
    j.cell_index = static_cast<int32_t>(i);
    j.factors = {{"cell", std::to_string(i)}};
    j.params = {{"cell", std::to_string(i)}, {"num_train_steps", "10"}};
    j.config_hash = key + "-" + std::to_string(i);
    j.total_steps = 10;
    j.gpus = jobs[i].gpus;
    j.mem_estimate_bytes = jobs[i].mem;
    s.jobs.push_back(j);
  }
  return s;
}

Capacity Gpus(std::vector<std::pair<int32_t, int64_t>> gpus) {
  Capacity c;
  for (auto [i, m] : gpus) c.gpus.push_back({i, m});
  return c;
}
Capacity Host(int64_t mem) {
  Capacity c;
  c.host_memory_bytes = mem;
  return c;
}
Capacity Any() {
  Capacity c;
  c.unlimited = true;
  return c;
}

class PgPlacementTest : public testing::PgStoreTest {
 protected:
  PgPlacementTest() : PgStoreTest(4) {}
};

TEST_F(PgPlacementTest, WhichJobAndWhichGpus) {
  struct Case {
    std::string name;
    std::vector<JobSpec> jobs;  // queued in this order
    Capacity offer;
    std::optional<int32_t> want_cell;  // nullopt: nothing fits
    std::vector<int32_t> want_gpus;
  };
  const std::vector<Case> cases = {
      {"oldest job that fits, a younger one when the oldest needs more GPUs", {{2, 40 * G}, {1, 10 * G}},
       Gpus({{0, 80 * G}}), 1, {0}},
      {"oldest first when both fit", {{2, 40 * G}, {1, 10 * G}}, Gpus({{3, 80 * G}, {5, 80 * G}}), 0, {3, 5}},
      {"oldest first among equal jobs", {{1, 10 * G}, {1, 10 * G}}, Gpus({{0, 80 * G}}), 0, {0}},
      {"first GPU with enough memory", {{1, 80 * G}}, Gpus({{0, 40 * G}, {1, 80 * G}, {2, 80 * G}}), 0, {1}},
      {"memory exactly equal fits", {{1, 80 * G}}, Gpus({{0, 80 * G}}), 0, {0}},
      {"the N GPUs with enough memory, in offered order", {{2, 40 * G}},
       Gpus({{0, 24 * G}, {1, 48 * G}, {2, 48 * G}}), 0, {1, 2}},
      {"all or nothing: one GPU short", {{2, 40 * G}}, Gpus({{0, 24 * G}, {1, 48 * G}}), std::nullopt, {}},
      {"per-GPU memory, not the sum", {{1, 100 * G}}, Gpus({{0, 80 * G}, {1, 80 * G}}), std::nullopt, {}},
      {"CPU worker: host memory is one device", {{1, 16 * G}}, Host(64 * G), 0, {}},
      {"CPU worker: too little host memory", {{1, 100 * G}}, Host(64 * G), std::nullopt, {}},
      {"CPU worker: one device only", {{2, 1 * G}}, Host(64 * G), std::nullopt, {}},
      {"CPU worker skips to a job it can run", {{2, 1 * G}, {1, 1 * G}}, Host(64 * G), 1, {}},
      {"offering nothing fits only a zero estimate", {{1, 1 * G}}, Capacity{}, std::nullopt, {}},
      {"unconstrained (legacy) worker takes the oldest", {{8, 500 * G}, {1, 1 * G}}, Any(), 0, {}},
  };
  int n = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    // Earlier cases' leftovers must not compete: only this case's jobs are queued.
    db_->Query("UPDATE jobs SET state = 'cancelled' WHERE state = 'queued'");
    auto sw = store_->CreateSweep(Sweep("case" + std::to_string(n++), c.jobs));
    ASSERT_TRUE(sw.ok()) << sw.status();
    auto r = store_->LeaseJobFor("w-" + std::to_string(n), c.offer, 60);
    ASSERT_TRUE(r.ok()) << r.status();
    if (!c.want_cell) {
      EXPECT_FALSE(r->grant.has_value()) << "got cell " << r->grant->job.cell_index;
      continue;
    }
    ASSERT_TRUE(r->grant.has_value());
    EXPECT_EQ(r->grant->job.sweep_id, sw->sweep.id);
    EXPECT_EQ(r->grant->job.cell_index, *c.want_cell);
    EXPECT_EQ(r->grant->assigned_gpus, c.want_gpus);
    EXPECT_EQ(r->grant->job.state, JobState::kLeased);
  }
}

TEST_F(PgPlacementTest, JobsInRetryBackoffAreSkipped) {
  auto sw = store_->CreateSweep(Sweep("backoff", {{1, 1 * G}, {1, 1 * G}}));
  ASSERT_TRUE(sw.ok()) << sw.status();
  db_->Query("UPDATE jobs SET not_before = now() + interval '1 hour' WHERE cell_index = 0");
  auto r = store_->LeaseJobFor("w1", Gpus({{0, 80 * G}}), 60);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_TRUE(r->grant.has_value());
  EXPECT_EQ(r->grant->job.cell_index, 1);
  auto none = store_->LeaseJobFor("w2", Gpus({{0, 80 * G}}), 60);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->grant.has_value());
}

TEST_F(PgPlacementTest, QuarantinedWorkerGetsNothing) {
  ASSERT_TRUE(store_->UpsertWorker({"wq", "host", "{}", "t"}).ok());
  ASSERT_TRUE(store_->SetQuarantine("wq", true, 600, "test").ok());
  ASSERT_TRUE(store_->CreateSweep(Sweep("quarantine", {{1, 1 * G}})).ok());
  auto r = store_->LeaseJobFor("wq", Gpus({{0, 80 * G}}), 60);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->grant.has_value());
  EXPECT_GT(r->quarantined_until_unix_ms, 0);
  auto other = store_->LeaseJobFor("wok", Gpus({{0, 80 * G}}), 60);
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->grant.has_value());
}

}  // namespace
}  // namespace ablate::scheduler
