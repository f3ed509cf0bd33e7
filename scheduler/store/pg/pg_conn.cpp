#include "scheduler/store/pg/pg_conn.h"

#include <chrono>
#include <cmath>
#include <cstdlib>

#include "absl/status/status.h"

namespace ablate::scheduler::pg {

double PgResult::Double(int row, int col) const {
  if (IsNull(row, col)) return std::nan("");
  std::string s = Str(row, col);
  if (s == "NaN") return std::nan("");
  if (s == "Infinity") return HUGE_VAL;
  if (s == "-Infinity") return -HUGE_VAL;
  return std::strtod(s.c_str(), nullptr);
}

absl::Status StatusFromSqlState(const std::string& st, const std::string& message) {
  auto cls = st.substr(0, 2);
  if (cls == "08" || cls == "53" || st.rfind("57P0", 0) == 0) return absl::UnavailableError(message);
  if (st == "40001" || st == "40P01") return absl::AbortedError(message);
  if (st == "23505") return absl::AlreadyExistsError(message);
  if (cls == "23") return absl::FailedPreconditionError(message);
  if (st == "57014") return absl::DeadlineExceededError(message);
  if (cls == "22") return absl::InvalidArgumentError(message);
  return absl::InternalError(message);
}

namespace {
absl::Status ResultStatus(PGconn* conn, PGresult* r, const char* what) {
  ExecStatusType s = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
  if (s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK) return absl::OkStatus();
  std::string msg = std::string(what) + ": ";
  msg += r ? PQresultErrorMessage(r) : PQerrorMessage(conn);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  const char* sqlstate = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  if (!sqlstate || PQstatus(conn) != CONNECTION_OK) {
    // No SQLSTATE: the connection itself failed.
    return absl::UnavailableError(msg);
  }
  return StatusFromSqlState(sqlstate, msg);
}
}  // namespace

absl::StatusOr<PgResult> Exec(PGconn* conn, const char* what, const char* sql, const Params& params) {
  std::vector<const char*> values;
  values.reserve(params.size());
  for (const auto& p : params) values.push_back(p ? p->c_str() : nullptr);
  PgResultPtr r(PQexecParams(conn, sql, static_cast<int>(values.size()), nullptr, values.data(), nullptr, nullptr, 0));
  if (auto st = ResultStatus(conn, r.get(), what); !st.ok()) return st;
  return PgResult(std::move(r));
}

absl::Status ExecScript(PGconn* conn, const char* what, const char* sql) {
  PgResultPtr r(PQexec(conn, sql));
  return ResultStatus(conn, r.get(), what);
}

absl::StatusOr<PgConnPtr> Connect(const std::string& dsn) {
  // Defaults first, the DSN after them (expand_dbname), so anything the operator wrote wins: fail fast on a dead
  // server or a half-open TCP connection instead of hanging for the kernel's 15 minutes.
  const char* keys[] = {"connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                        "keepalives_count", "tcp_user_timeout", "dbname", nullptr};
  const char* vals[] = {"5", "1", "10", "3", "3", "10000", dsn.c_str(), nullptr};
  PgConnPtr c(PQconnectdbParams(keys, vals, 1));
  if (!c || PQstatus(c.get()) != CONNECTION_OK) {
    // libpq's message names host/socket and user, never the password.
    std::string msg = c ? PQerrorMessage(c.get()) : "out of memory";
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return absl::UnavailableError("connecting to PostgreSQL: " + msg);
  }
  // Timestamps are converted to unix ms in SQL; keep sessions in UTC so nothing depends on the server's zone.
  if (auto st = ExecScript(c.get(), "session settings", "SET TIME ZONE 'UTC'; SET client_min_messages = warning; "
                                "SET statement_timeout = '15s'; SET lock_timeout = '5s'; "
                                "SET idle_in_transaction_session_timeout = '60s'");
      !st.ok()) {
    return st;
  }
  return c;
}

PooledConn::~PooledConn() {
  if (pool_ && conn_) pool_->Release(std::move(conn_));
}

absl::StatusOr<PooledConn> PgPool::Acquire() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, std::chrono::seconds(30), [&] { return !idle_.empty() || open_ < max_size_; })) {
    return absl::UnavailableError("PostgreSQL connection pool exhausted (" + std::to_string(max_size_) +
                                  " connections busy for 30 s)");
  }
  if (!idle_.empty()) {
    PgConnPtr c = std::move(idle_.back());
    idle_.pop_back();
    return PooledConn(this, std::move(c));
  }
  ++open_;
  lock.unlock();
  auto c = Connect(dsn_);  // outside the lock: connecting can take a while
  if (!c.ok()) {
    std::lock_guard<std::mutex> g(mu_);
    --open_;
    cv_.notify_one();
    return c.status();
  }
  return PooledConn(this, std::move(*c));
}

void PgPool::Release(PgConnPtr conn) {
  std::lock_guard<std::mutex> lock(mu_);
  // A broken connection, or one left inside a transaction by a bug, is dropped rather than reused.
  if (PQstatus(conn.get()) == CONNECTION_OK && PQtransactionStatus(conn.get()) == PQTRANS_IDLE) {
    idle_.push_back(std::move(conn));
  } else {
    --open_;
  }
  cv_.notify_one();
}

PgTransaction::~PgTransaction() {
  if (open_) ExecScript(conn_, "rollback", "ROLLBACK").IgnoreError();
}

absl::Status PgTransaction::Begin() {
  auto st = ExecScript(conn_, "begin", "BEGIN");
  open_ = st.ok();
  return st;
}

absl::Status PgTransaction::Commit() {
  auto st = ExecScript(conn_, "commit", "COMMIT");
  // After a failed COMMIT the server has ended the transaction; the outcome may be unknown (kUnknown).
  open_ = false;
  if (!st.ok() && absl::IsUnavailable(st)) return absl::UnknownError("commit outcome unknown: " + st.ToString());
  return st;
}

}  // namespace ablate::scheduler::pg
