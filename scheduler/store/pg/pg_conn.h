// libpq plumbing for the Postgres store: RAII handles, a small connection pool, parameterized execution and
// SQLSTATE → absl::Status classification. libpq types never leave scheduler/store/pg/.
#pragma once
#include <libpq-fe.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ablate::scheduler::pg {

// Closes a connection (PQfinish) and forgets what pg_conn.cpp knew about its session.
void FinishConn(PGconn* c);
struct PgConnDeleter {
  void operator()(PGconn* c) const { FinishConn(c); }
};
struct PgResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};
using PgConnPtr = std::unique_ptr<PGconn, PgConnDeleter>;
using PgResultPtr = std::unique_ptr<PGresult, PgResultDeleter>;

// Parameters travel separately from the SQL text (PQexecParams); nullopt is SQL NULL.
using Params = std::vector<std::optional<std::string>>;

class PgResult {
 public:
  explicit PgResult(PgResultPtr r) : r_(std::move(r)) {}
  int rows() const { return PQntuples(r_.get()); }
  bool IsNull(int row, int col) const { return PQgetisnull(r_.get(), row, col) != 0; }
  std::string Str(int row, int col) const { return PQgetvalue(r_.get(), row, col); }
  int64_t Int(int row, int col) const { return IsNull(row, col) ? 0 : std::stoll(Str(row, col)); }
  double Double(int row, int col) const;
  bool Bool(int row, int col) const { return Str(row, col) == "t"; }
  int Col(const char* name) const { return PQfnumber(r_.get(), name); }
  // Rows changed by INSERT/UPDATE/DELETE.
  int64_t Affected() const {
    const char* n = PQcmdTuples(r_.get());
    return (n && *n) ? std::stoll(n) : 0;
  }

 private:
  PgResultPtr r_;
};

// Maps a failed result's SQLSTATE onto canonical codes (STYLE.md §3.3): class 08 → kUnavailable,
// 40001/40P01 → kAborted, 23505 → kAlreadyExists, other 23 → kFailedPrecondition, 53/57P0x → kUnavailable,
// 57014 (statement_timeout), 55P03 (lock_timeout) and 25006 (read-only server: a standby; the connection is then
// dropped) → kUnavailable, 22 → kInvalidArgument, the rest → kInternal.
absl::Status StatusFromSqlState(const std::string& sqlstate, const std::string& message);

// Runs one parameterized statement. `what` names it in error messages. Never waits past the thread's CallBudget
// (scheduler/util/call_budget.h; without one, 20 s): the statement runs with at most the time left as its
// statement_timeout and lock_timeout, and a connection that does not answer by the deadline is abandoned (shut
// down, then dropped by the pool) with kUnavailable.
absl::StatusOr<PgResult> Exec(PGconn* conn, const char* what, const char* sql, const Params& params = {});
// Runs trusted, parameterless SQL that may hold several statements (migrations, BEGIN/COMMIT). Same time bounds.
absl::Status ExecScript(PGconn* conn, const char* what, const char* sql);

// Connects (non-blocking, at most 5 s and never past the CallBudget) with TCP keepalives and tcp_user_timeout,
// and sets the session: UTC, statement_timeout 15 s, lock_timeout 5 s, idle_in_transaction_session_timeout 60 s.
absl::StatusOr<PgConnPtr> Connect(const std::string& dsn);

class PgPool;

// A pooled connection, returned to the pool on destruction (dropped if broken).
class PooledConn {
 public:
  PooledConn(PgPool* pool, PgConnPtr conn) : pool_(pool), conn_(std::move(conn)) {}
  PooledConn(PooledConn&&) = default;
  PooledConn& operator=(PooledConn&&) = delete;
  ~PooledConn();
  PGconn* get() const { return conn_.get(); }

 private:
  PgPool* pool_;
  PgConnPtr conn_;
};

// At most `max_size` connections; Acquire blocks when all are in use, up to 30 s and never past the CallBudget.
class PgPool {
 public:
  PgPool(std::string dsn, int max_size) : dsn_(std::move(dsn)), max_size_(max_size) {}
  absl::StatusOr<PooledConn> Acquire();

 private:
  friend class PooledConn;
  void Release(PgConnPtr conn);

  const std::string dsn_;
  const int max_size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<PgConnPtr> idle_;
  int open_ = 0;
};

// BEGIN on Begin(); ROLLBACK in the destructor unless Commit() succeeded.
class PgTransaction {
 public:
  explicit PgTransaction(PGconn* conn) : conn_(conn) {}
  ~PgTransaction();
  absl::Status Begin();
  absl::Status Commit();

 private:
  PGconn* conn_;
  bool open_ = false;
};

}  // namespace ablate::scheduler::pg
