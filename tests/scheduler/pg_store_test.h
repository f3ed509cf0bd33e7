// Fixture for the PostgreSQL job-store tests: per test a throwaway database (pg_test_db.h), migrated, with a
// PgJobStore of the given pool size on it. Skips, saying why, when the test cluster is not reachable.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>

#include "scheduler/store/pg/migrate.h"
#include "scheduler/store/pg/pg_job_store.h"
#include "tests/scheduler/pg_test_db.h"

namespace ablate::scheduler::testing {

class PgStoreTest : public ::testing::Test {
 protected:
  explicit PgStoreTest(int pool_size) : pool_size_(pool_size) {}
  void SetUp() override {
    std::string why;
    db_ = TestDb::Create(&why);
    if (!db_) GTEST_SKIP() << why;
    auto m = pg::Migrate(db_->dsn());
    ASSERT_TRUE(m.ok()) << m.status();
    store_ = std::make_unique<pg::PgJobStore>(db_->dsn(), pool_size_);
  }
  // The first column of the first row of a COUNT(*)-style query.
  int64_t Count(const std::string& sql) { return std::stoll(db_->Query(sql)); }

  std::unique_ptr<TestDb> db_;
  std::unique_ptr<pg::PgJobStore> store_;

 private:
  int pool_size_;
};

}  // namespace ablate::scheduler::testing
