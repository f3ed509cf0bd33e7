// A throwaway database inside the shared test cluster (ABLATE_TEST_PG_DSN): created per test, dropped after.
#pragma once
#include <memory>
#include <string>

namespace ablate::scheduler::testing {

class TestDb {
 public:
  // nullptr (and a reason in *why) when ABLATE_TEST_PG_DSN is unset or the cluster is unreachable.
  static std::unique_ptr<TestDb> Create(std::string* why);
  ~TestDb();
  const std::string& dsn() const { return dsn_; }
  // Runs one SQL statement and returns the first column of the first row ("" if none).
  std::string Query(const std::string& sql) const;

 private:
  TestDb(std::string admin_dsn, std::string name);
  std::string admin_dsn_, name_, dsn_;
};

}  // namespace ablate::scheduler::testing

#define ABLATE_REQUIRE_TEST_DB(var)                               \
  std::string var##_why;                                          \
  auto var = ::ablate::scheduler::testing::TestDb::Create(&var##_why); \
  if (!var) GTEST_SKIP() << var##_why
