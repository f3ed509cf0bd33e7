#include "scheduler/store/pg/pg_conn.h"

#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <unordered_map>

#include "absl/status/status.h"
#include "scheduler/util/call_budget.h"

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
  // A statement that ran out of its time (statement_timeout: the call's budget, F36) or waited too long for a lock
  // (lock_timeout: a table locked by someone else, F17): the database cannot serve this now; retry later.
  if (st == "57014" || st == "55P03") return absl::UnavailableError(message);
  // read_only_sql_transaction: the server takes no writes now (a standby: a failover in progress, or a DSN or
  // address that points at a replica, F16). Retry later, on another connection.
  if (st == "25006") return absl::UnavailableError(message);
  if (st == "40001" || st == "40P01") return absl::AbortedError(message);
  if (st == "23505") return absl::AlreadyExistsError(message);
  if (cls == "23") return absl::FailedPreconditionError(message);
  if (cls == "22") return absl::InvalidArgumentError(message);
  return absl::InternalError(message);
}

namespace {
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Session defaults (RELIABILITY §4.5). A statement with less time left in its call's budget gets that instead.
constexpr int64_t kStatementTimeoutMs = 15000;
constexpr int64_t kLockTimeoutMs = 5000;
// Outside any CallBudget scope no statement waits longer than this for its answer.
constexpr milliseconds kDefaultBudget{kStatementTimeoutMs + 5000};
// Connection establishment (TCP, startup, authentication, session settings) at most this long.
constexpr milliseconds kConnectTimeout{5000};

int64_t MsLeft(Clock::time_point deadline) {
  return std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
}

Clock::time_point StatementDeadline() {
  auto d = Clock::now() + kDefaultBudget;
  if (auto b = CallBudget::Deadline(); b && *b < d) d = *b;
  return d;
}

// The statement_timeout and lock_timeout each open connection has, as far as we know: recorded only when set
// outside a transaction (no ROLLBACK can undo it then). A connection missing here gets them set before its next
// statement.
struct Limits {
  int64_t statement_ms;
  int64_t lock_ms;
};
std::mutex& LimitsMu() {
  static auto* mu = new std::mutex;
  return *mu;
}
std::unordered_map<const PGconn*, Limits>& LimitsOf() {
  static auto* m = new std::unordered_map<const PGconn*, Limits>;
  return *m;
}
void SetKnownLimits(const PGconn* c, std::optional<Limits> l) {
  std::lock_guard<std::mutex> g(LimitsMu());
  if (l) LimitsOf()[c] = *l;
  else LimitsOf().erase(c);
}
std::optional<Limits> KnownLimits(const PGconn* c) {
  std::lock_guard<std::mutex> g(LimitsMu());
  auto it = LimitsOf().find(c);
  if (it == LimitsOf().end()) return std::nullopt;
  return it->second;
}

// Until the connection's socket is ready (true) or the deadline passes (false).
bool WaitSocket(PGconn* c, bool for_write, Clock::time_point deadline) {
  for (;;) {
    int fd = PQsocket(c);
    if (fd < 0) return true;  // libpq dropped the connection; it reports why
    int64_t left = MsLeft(deadline);
    if (left <= 0) return false;
    pollfd p{fd, static_cast<short>(for_write ? POLLOUT : POLLIN), 0};
    int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 60000)));
    if (n > 0 || (n < 0 && errno != EINTR)) return true;
  }
}

// Gives up on a connection that did not answer in time (a half-open TCP connection, a stalled server, F18): its
// socket is shut down, so libpq sees the connection closed, answers at once from now on, and the pool drops it
// instead of reusing it. The server ends that session when its statement ends or it notices the close.
void Abandon(PGconn* c) {
  int fd = PQsocket(c);
  if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
  (void)PQconsumeInput(c);
  for (int i = 0; i < 64; ++i) {
    PGresult* r = PQgetResult(c);
    if (!r) break;
    PQclear(r);
  }
}

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
  if (std::string(sqlstate) == "25006") {
    // Connected to a server that takes no writes (a standby, F16): drop this connection (the pool discards a
    // broken one), so that the next call connects again and reaches the primary once the DSN or the address leads
    // there. Kept, it would fail every write for as long as it lived.
    Abandon(conn);
  }
  return StatusFromSqlState(sqlstate, msg);
}

absl::Status TimedOut(const char* what, Clock::time_point started, Clock::time_point deadline) {
  auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - started).count();
  auto budget = std::chrono::duration_cast<milliseconds>(deadline - started).count();
  return absl::UnavailableError(std::string(what) + ": no answer from PostgreSQL within " + std::to_string(waited) +
                                " ms (the call's budget was " + std::to_string(std::max<int64_t>(budget, 0)) +
                                " ms); connection dropped");
}

// Sends one query (params == nullptr: a parameterless script, several statements allowed) and collects its result
// without ever waiting past `deadline`. Like PQexec: the last result, or the first error.
absl::StatusOr<PgResultPtr> RunUntil(PGconn* conn, const char* what, const char* sql, const Params* params,
                                     Clock::time_point deadline) {
  const auto started = Clock::now();
  if (PQstatus(conn) != CONNECTION_OK) {
    std::string msg = PQerrorMessage(conn);
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return absl::UnavailableError(std::string(what) + ": connection to PostgreSQL lost: " + msg);
  }
  if (MsLeft(deadline) <= 0) {
    return absl::UnavailableError(std::string(what) + ": the call's time budget is spent; not sent to PostgreSQL");
  }
  int sent;
  if (params) {
    std::vector<const char*> values;
    values.reserve(params->size());
    for (const auto& p : *params) values.push_back(p ? p->c_str() : nullptr);
    sent = PQsendQueryParams(conn, sql, static_cast<int>(values.size()), nullptr, values.data(), nullptr, nullptr, 0);
  } else {
    sent = PQsendQuery(conn, sql);
  }
  if (!sent) return ResultStatus(conn, nullptr, what);
  // Non-blocking connection: push the query out, reading whatever arrives meanwhile.
  for (;;) {
    int f = PQflush(conn);
    if (f == 0) break;
    if (f < 0) return ResultStatus(conn, nullptr, what);
    if (!WaitSocket(conn, true, deadline)) {
      Abandon(conn);
      return TimedOut(what, started, deadline);
    }
    if (!PQconsumeInput(conn)) break;  // the connection broke; PQgetResult reports it
  }
  PgResultPtr keep;
  for (;;) {
    while (PQisBusy(conn) && PQstatus(conn) == CONNECTION_OK && PQsocket(conn) >= 0) {
      if (!WaitSocket(conn, false, deadline)) {
        Abandon(conn);
        return TimedOut(what, started, deadline);
      }
      if (!PQconsumeInput(conn)) break;
    }
    PgResultPtr r(PQgetResult(conn));
    if (!r) break;
    ExecStatusType s = PQresultStatus(r.get());
    bool keep_is_error = keep && PQresultStatus(keep.get()) != PGRES_COMMAND_OK &&
                         PQresultStatus(keep.get()) != PGRES_TUPLES_OK;
    if (!keep_is_error) keep = std::move(r);
    if (s == PGRES_COPY_IN || s == PGRES_COPY_OUT || s == PGRES_COPY_BOTH) break;  // not used here
  }
  if (auto st = ResultStatus(conn, keep.get(), what); !st.ok()) return st;
  return keep;
}

// Before a statement: makes the session's statement_timeout and lock_timeout fit the time left, so that the server
// ends a slow or lock-waiting statement itself (the connection stays usable) shortly before the client would have
// to give up on it. Set only when the current limits are too long for this call, or much shorter than it could use.
absl::Status FitLimits(PGconn* conn, Clock::time_point deadline) {
  const int64_t left = MsLeft(deadline);
  // What the server should use (the answer needs a moment to travel back), and the most it may use.
  const int64_t target = std::max<int64_t>(1, left - std::max<int64_t>(20, left / 10));
  const int64_t most = std::max<int64_t>(1, left - std::max<int64_t>(10, left / 20));
  Limits want{std::min(target, kStatementTimeoutMs), std::min(target, kLockTimeoutMs)};
  auto have = KnownLimits(conn);
  if (have && have->statement_ms <= std::min(most, kStatementTimeoutMs) &&
      have->lock_ms <= std::min(most, kLockTimeoutMs) && have->statement_ms * 2 >= want.statement_ms &&
      have->lock_ms * 2 >= want.lock_ms) {
    return absl::OkStatus();
  }
  const bool in_tx = PQtransactionStatus(conn) != PQTRANS_IDLE;
  Params p = {std::to_string(want.statement_ms), std::to_string(want.lock_ms)};
  auto r = RunUntil(conn, "session limits",
                    "SELECT set_config('statement_timeout', $1, false), set_config('lock_timeout', $2, false)", &p,
                    deadline);
  if (!r.ok()) {
    SetKnownLimits(conn, std::nullopt);
    return r.status();
  }
  // Inside a transaction a ROLLBACK would undo it: then it is not known for the statements after this transaction.
  SetKnownLimits(conn, in_tx ? std::nullopt : std::optional<Limits>(want));
  return absl::OkStatus();
}

absl::StatusOr<PgResultPtr> Run(PGconn* conn, const char* what, const char* sql, const Params* params) {
  const auto deadline = StatementDeadline();
  if (auto st = FitLimits(conn, deadline); !st.ok()) {
    return absl::Status(st.code(), std::string(what) + ": " + std::string(st.message()));
  }
  return RunUntil(conn, what, sql, params, deadline);
}
}  // namespace

void FinishConn(PGconn* c) {
  if (!c) return;
  SetKnownLimits(c, std::nullopt);
  PQfinish(c);
}

absl::StatusOr<PgResult> Exec(PGconn* conn, const char* what, const char* sql, const Params& params) {
  auto r = Run(conn, what, sql, &params);
  if (!r.ok()) return r.status();
  return PgResult(std::move(*r));
}

absl::Status ExecScript(PGconn* conn, const char* what, const char* sql) {
  auto r = Run(conn, what, sql, nullptr);
  return r.ok() ? absl::OkStatus() : r.status();
}

absl::StatusOr<PgConnPtr> Connect(const std::string& dsn) {
  const auto started = Clock::now();
  auto deadline = std::min(StatementDeadline(), started + kConnectTimeout);
  // Defaults first, the DSN after them (expand_dbname), so anything the operator wrote wins: keepalives and
  // tcp_user_timeout make the kernel notice a dead peer on an idle or a sending connection; the deadline above and
  // each statement's budget bound the rest (a peer whose kernel answers but whose server never does, F18).
  const char* keys[] = {"connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                        "keepalives_count", "tcp_user_timeout", "dbname", nullptr};
  const char* vals[] = {"5", "1", "10", "3", "3", "10000", dsn.c_str(), nullptr};
  PgConnPtr c(PQconnectStartParams(keys, vals, 1));
  auto failed = [&](const std::string& why) {
    // libpq's message names host/socket and user, never the password.
    std::string msg = why;
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return absl::UnavailableError("connecting to PostgreSQL: " + msg);
  };
  if (!c) return failed("out of memory");
  if (PQstatus(c.get()) == CONNECTION_BAD) return failed(PQerrorMessage(c.get()));
  // As the libpq manual says: poll for writing first, then as PQconnectPoll asks, until OK or FAILED.
  PostgresPollingStatusType ps = PGRES_POLLING_WRITING;
  while (ps != PGRES_POLLING_OK) {
    if (ps == PGRES_POLLING_FAILED) return failed(PQerrorMessage(c.get()));
    if (!WaitSocket(c.get(), ps == PGRES_POLLING_WRITING, deadline)) {
      return failed("no answer within " +
                    std::to_string(std::chrono::duration_cast<milliseconds>(Clock::now() - started).count()) + " ms");
    }
    ps = PQconnectPoll(c.get());
  }
  // From now on libpq never blocks in a send: RunUntil flushes and waits with the statement's deadline.
  if (PQsetnonblocking(c.get(), 1) != 0) return failed(PQerrorMessage(c.get()));
  // Timestamps are converted to unix ms in SQL; keep sessions in UTC so nothing depends on the server's zone.
  auto r = RunUntil(c.get(), "session settings",
                    "SET TIME ZONE 'UTC'; SET client_min_messages = warning; "
                    "SET statement_timeout = '15s'; SET lock_timeout = '5s'; "
                    "SET idle_in_transaction_session_timeout = '60s'",
                    nullptr, deadline);
  if (!r.ok()) return r.status();
  SetKnownLimits(c.get(), Limits{kStatementTimeoutMs, kLockTimeoutMs});
  return c;
}

PooledConn::~PooledConn() {
  if (pool_ && conn_) pool_->Release(std::move(conn_));
}

absl::StatusOr<PooledConn> PgPool::Acquire() {
  // Wait for a free connection at most 30 s, and never past the call's budget.
  auto until = Clock::now() + std::chrono::seconds(30);
  if (auto b = CallBudget::Deadline(); b && *b < until) until = *b;
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_until(lock, until, [&] { return !idle_.empty() || open_ < max_size_; })) {
    return absl::UnavailableError("PostgreSQL connection pool exhausted (" + std::to_string(max_size_) +
                                  " connections busy for the whole wait)");
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
  // A broken connection (or one abandoned mid-statement), or one left inside a transaction by a bug, is dropped
  // rather than reused.
  if (PQstatus(conn.get()) == CONNECTION_OK && PQtransactionStatus(conn.get()) == PQTRANS_IDLE) {
    idle_.push_back(std::move(conn));
  } else {
    --open_;
  }
  cv_.notify_one();
}

PgTransaction::~PgTransaction() {
  if (!open_) return;
  // A moment past the call's budget: on a healthy connection ROLLBACK takes no time, and a connection that does not
  // answer is dropped by the pool anyway (which ends the transaction on the server).
  Clock::time_point deadline = Clock::now() + milliseconds(250);
  (void)RunUntil(conn_, "rollback", "ROLLBACK", nullptr, deadline);
}

absl::Status PgTransaction::Begin() {
  auto st = ExecScript(conn_, "begin", "BEGIN");
  open_ = st.ok();
  return st;
}

absl::Status PgTransaction::Commit() {
  // COMMIT is sent even when the call's budget is (nearly) spent, with a moment's grace: the work is done, and a
  // commit that was never sent would be reported as an unknown outcome.
  auto deadline = std::max(StatementDeadline(), Clock::now() + milliseconds(250));
  auto r = RunUntil(conn_, "commit", "COMMIT", nullptr, deadline);
  absl::Status st = r.ok() ? absl::OkStatus() : r.status();
  // After a failed COMMIT the server has ended the transaction; the outcome may be unknown (kUnknown).
  open_ = false;
  if (!st.ok() && absl::IsUnavailable(st)) return absl::UnknownError("commit outcome unknown: " + st.ToString());
  return st;
}

}  // namespace ablate::scheduler::pg
