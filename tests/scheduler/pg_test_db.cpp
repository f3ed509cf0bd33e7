#include "tests/scheduler/pg_test_db.h"

#include <libpq-fe.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace ablate::scheduler::testing {
namespace {

std::string Exec(const std::string& dsn, const std::string& sql, std::string* error) {
  PGconn* c = PQconnectdb(dsn.c_str());
  std::string out;
  if (PQstatus(c) != CONNECTION_OK) {
    *error = PQerrorMessage(c);
  } else {
    PGresult* r = PQexec(c, sql.c_str());
    auto st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) *error = PQresultErrorMessage(r);
    else if (st == PGRES_TUPLES_OK && PQntuples(r) > 0) out = PQgetvalue(r, 0, 0);
    PQclear(r);
  }
  PQfinish(c);
  return out;
}

}  // namespace

TestDb::TestDb(std::string admin_dsn, std::string name)
    : admin_dsn_(std::move(admin_dsn)), name_(std::move(name)), dsn_(admin_dsn_ + " dbname=" + name_) {}

std::unique_ptr<TestDb> TestDb::Create(std::string* why) {
  const char* env = std::getenv("ABLATE_TEST_PG_DSN");
  if (!env || !*env) {
    *why = "ABLATE_TEST_PG_DSN is not set (run through ctest, which starts the test cluster)";
    return nullptr;
  }
  static std::atomic<int> counter{0};
  std::string name = "test_sched_" + std::to_string(getpid()) + "_" + std::to_string(counter++);
  std::string err;
  Exec(env, "DROP DATABASE IF EXISTS " + name, &err);
  err.clear();
  Exec(env, "CREATE DATABASE " + name, &err);
  if (!err.empty()) {
    *why = "cannot create test database: " + err;
    return nullptr;
  }
  return std::unique_ptr<TestDb>(new TestDb(env, name));
}

TestDb::~TestDb() {
  std::string err;
  Exec(admin_dsn_, "DROP DATABASE IF EXISTS " + name_ + " WITH (FORCE)", &err);
}

std::string TestDb::Query(const std::string& sql) const {
  std::string err;
  std::string out = Exec(dsn_, sql, &err);
  if (!err.empty()) throw std::runtime_error("test query failed: " + sql + ": " + err);
  return out;
}

}  // namespace ablate::scheduler::testing
