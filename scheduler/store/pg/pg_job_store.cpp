#include "scheduler/store/pg/pg_job_store.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <set>

#include "absl/status/status.h"
#include "scheduler/util/call_budget.h"

namespace ablate::scheduler::pg {
namespace {

using nlohmann::json;

#define ABLATE_MS(col) "coalesce((extract(epoch from " col ") * 1000)::bigint, 0)"

// Column list shared by every query that returns a JobRecord (see ReadJob).
constexpr const char* kJobCols =
    "j.id, j.sweep_id, j.cell_index, j.state, j.attempt, j.lease_epoch, " ABLATE_MS("j.lease_expires_at") ", "
    "coalesce(j.worker_id, ''), j.factors::text, j.params::text, j.config_hash, j.last_error, j.failure_class, "
    ABLATE_MS("j.created_at") ", " ABLATE_MS("j.started_at") ", " ABLATE_MS("j.finished_at") ", "
    "j.latest_step, j.total_steps, j.cancel_requested, coalesce(j.reused_from, 0), j.mem_estimate_bytes, j.gpus, "
    "CASE WHEN isfinite(j.not_before) THEN (extract(epoch from j.not_before) * 1000)::bigint ELSE 0 END, "
    "j.lease_nonce, j.ranks";

// The fence: the lease is current (job, attempt, epoch and nonce) and the job still leased or running.
#define ABLATE_FENCE(a, b, c, d) \
  "id = " a " AND attempt = " b " AND lease_epoch = " c " AND lease_nonce = " d " AND state IN ('leased', 'running')"

constexpr const char* kSweepCols =
    "s.id, s.name, s.state, s.spec_yaml, s.idempotency_key, " ABLATE_MS("s.created_at") ", s.factor_names::text, "
    "s.cancel_requested";

// Derives a sweep's state from its jobs; run after any job reaches a terminal state.
constexpr const char* kRefreshSweepState =
    "UPDATE sweeps s SET state = CASE"
    "  WHEN c.live > 0 THEN 'active'"
    "  WHEN s.cancel_requested THEN 'cancelled'"
    "  WHEN c.failed > 0 THEN 'failed'"
    "  WHEN c.cancelled > 0 THEN 'cancelled'"
    "  ELSE 'succeeded' END "
    "FROM (SELECT count(*) FILTER (WHERE state IN ('queued', 'leased', 'running')) AS live,"
    "             count(*) FILTER (WHERE state = 'failed') AS failed,"
    "             count(*) FILTER (WHERE state = 'cancelled') AS cancelled"
    "      FROM jobs WHERE sweep_id = $1) c "
    "WHERE s.id = $1";

std::map<std::string, std::string> JsonObjectToMap(const std::string& text) {
  std::map<std::string, std::string> out;
  json j = json::parse(text, nullptr, false);
  if (!j.is_object()) return out;
  for (auto& [k, v] : j.items()) out[k] = v.is_string() ? v.get<std::string>() : v.dump();
  return out;
}

JobRecord ReadJob(const PgResult& r, int row) {
  JobRecord j;
  j.id = r.Int(row, 0);
  j.sweep_id = r.Int(row, 1);
  j.cell_index = static_cast<int32_t>(r.Int(row, 2));
  j.state = JobStateFromName(r.Str(row, 3)).value_or(JobState::kQueued);
  j.attempt = static_cast<int32_t>(r.Int(row, 4));
  j.lease_epoch = r.Int(row, 5);
  j.lease_expires_unix_ms = r.Int(row, 6);
  j.worker_id = r.Str(row, 7);
  j.factors = JsonObjectToMap(r.Str(row, 8));
  j.params = JsonObjectToMap(r.Str(row, 9));
  j.config_hash = r.Str(row, 10);
  j.last_error = r.Str(row, 11);
  j.failure_class = FailureClassFromName(r.Str(row, 12));
  j.created_unix_ms = r.Int(row, 13);
  j.started_unix_ms = r.Int(row, 14);
  j.finished_unix_ms = r.Int(row, 15);
  j.latest_step = r.Int(row, 16);
  j.total_steps = r.Int(row, 17);
  j.cancel_requested = r.Bool(row, 18);
  j.reused_from = r.Int(row, 19);
  j.mem_estimate_bytes = r.Int(row, 20);
  j.gpus = static_cast<int32_t>(r.Int(row, 21));
  j.not_before_unix_ms = r.Int(row, 22);
  j.lease_nonce = r.Str(row, 23);
  j.ranks = static_cast<int32_t>(r.Int(row, 24));
  return j;
}

SweepRecord ReadSweep(const PgResult& r, int row) {
  SweepRecord s;
  s.id = r.Int(row, 0);
  s.name = r.Str(row, 1);
  s.state = SweepStateFromName(r.Str(row, 2)).value_or(SweepState::kActive);
  s.spec_yaml = r.Str(row, 3);
  s.idempotency_key = r.Str(row, 4);
  s.created_unix_ms = r.Int(row, 5);
  json f = json::parse(r.Str(row, 6), nullptr, false);
  if (f.is_array()) {
    for (auto& v : f) if (v.is_string()) s.factor_names.push_back(v.get<std::string>());
  }
  s.cancel_requested = r.Bool(row, 7);
  return s;
}

std::string Num(int64_t v) { return std::to_string(v); }

// Postgres float8 input accepts NaN/Infinity spelled this way; JSON has no NaN, so values travel as text.
std::string FloatText(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// Explains why a fenced write matched no row: unknown job (kNotFound) or stale lease (kFailedPrecondition).
absl::Status FenceError(PGconn* c, const Lease& lease, const char* what) {
  auto r = Exec(c, "fence lookup", "SELECT state, attempt, lease_epoch, lease_nonce = $2 FROM jobs WHERE id = $1",
                {Num(lease.job_id), lease.lease_nonce});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::NotFoundError("job " + Num(lease.job_id) + " not found");
  bool same_epoch = r->Str(0, 1) == Num(lease.attempt) && r->Str(0, 2) == Num(lease.lease_epoch);
  return absl::FailedPreconditionError(
      std::string(what) + " rejected: stale lease for job " + Num(lease.job_id) + ": got attempt " +
      Num(lease.attempt) + " epoch " + Num(lease.lease_epoch) + ", current is attempt " + r->Str(0, 1) + " epoch " +
      r->Str(0, 2) + " in state " + r->Str(0, 0) +
      (same_epoch && !r->Bool(0, 3) ? " (same epoch, different lease nonce: the epoch was reissued)" : "") +
      " (writes need the current lease and state leased|running)");
}

absl::Status RefreshSweep(PGconn* c, int64_t sweep_id) {
  auto r = Exec(c, "refresh sweep state", kRefreshSweepState, {Num(sweep_id)});
  return r.ok() ? absl::OkStatus() : r.status();
}

absl::Status FillJobCounts(PGconn* c, std::vector<SweepRecord>* sweeps) {
  if (sweeps->empty()) return absl::OkStatus();
  std::string ids = "{";
  for (size_t i = 0; i < sweeps->size(); ++i) ids += (i ? "," : "") + Num((*sweeps)[i].id);
  ids += "}";
  auto r = Exec(c, "job counts", "SELECT sweep_id, state, count(*) FROM jobs WHERE sweep_id = ANY($1::bigint[]) "
                "GROUP BY sweep_id, state", {ids});
  if (!r.ok()) return r.status();
  std::map<int64_t, SweepRecord*> by_id;
  for (auto& s : *sweeps) by_id[s.id] = &s;
  for (int i = 0; i < r->rows(); ++i) {
    SweepRecord* s = by_id[r->Int(i, 0)];
    int32_t n = static_cast<int32_t>(r->Int(i, 2));
    s->job_counts[r->Str(i, 1)] = n;
    s->total_jobs += n;
  }
  return absl::OkStatus();
}

absl::Status FillLatestMetrics(PGconn* c, const char* where, const std::string& id, std::vector<JobRecord>* jobs) {
  // Latest value per (job, name): the newest attempt's highest step.
  std::string sql =
      "SELECT DISTINCT ON (j.id, m.name) j.id, m.name, m.value FROM jobs j "
      "JOIN metrics m ON m.job_id = coalesce(j.reused_from, j.id) "
      "WHERE " + std::string(where) + " ORDER BY j.id, m.name, m.step DESC";
  auto r = Exec(c, "latest metrics", sql.c_str(), {id});
  if (!r.ok()) return r.status();
  std::map<int64_t, JobRecord*> by_id;
  for (auto& j : *jobs) by_id[j.id] = &j;
  for (int i = 0; i < r->rows(); ++i) {
    if (auto it = by_id.find(r->Int(i, 0)); it != by_id.end()) it->second->latest_metrics[r->Str(i, 1)] = r->Double(i, 2);
  }
  return absl::OkStatus();
}

// Inserts jobs (json array of cell_index, factors, params, config_hash, total_steps, mem, gpus). With `reuse`, a
// cell whose config_hash already succeeded (as a job that ran) is stored succeeded, pointing at that job.
// Returns (rows inserted, rows reused).
absl::StatusOr<std::pair<int64_t, int64_t>> InsertJobs(PGconn* c, int64_t sweep_id, const json& jobs, bool reuse) {
  auto jr = Exec(c, "insert jobs",
                 "WITH ins AS (INSERT INTO jobs (sweep_id, cell_index, factors, params, config_hash, total_steps, "
                 "  mem_estimate_bytes, gpus, ranks, state, reused_from, latest_step, started_at, finished_at) "
                 "SELECT $1, x.cell_index, x.factors, x.params, x.config_hash, x.total_steps, "
                 "  coalesce(x.mem, 0), coalesce(x.gpus, 1), greatest(coalesce(x.ranks, 1), 1), CASE WHEN r.id IS NULL THEN 'queued' ELSE 'succeeded' END, "
                 "  r.id, coalesce(r.latest_step, 0), r.started_at, CASE WHEN r.id IS NULL THEN NULL ELSE now() END "
                 "FROM jsonb_to_recordset($2::jsonb) AS x(cell_index int, factors jsonb, params jsonb, "
                 "  config_hash text, total_steps bigint, mem bigint, gpus int, ranks int) "
                 "LEFT JOIN LATERAL (SELECT o.id, o.latest_step, o.started_at FROM jobs o "
                 "  WHERE $3::boolean AND o.config_hash = x.config_hash AND o.state = 'succeeded' "
                 "  AND o.reused_from IS NULL ORDER BY o.id LIMIT 1) r ON TRUE "
                 "RETURNING reused_from) "
                 "SELECT count(*), count(reused_from) FROM ins",
                 {Num(sweep_id), jobs.dump(), reuse ? "true" : "false"});
  if (!jr.ok()) return jr.status();
  return std::make_pair(jr->Int(0, 0), jr->Int(0, 1));
}

// What happens to a job after an attempt ends (docs/control-plane.md, failure-class policy).
struct Decision {
  std::string next;            // queued | succeeded | failed | cancelled
  std::string class_failures;  // updated JSON
  int64_t backoff_ms = 0;
  bool preempted = false;
  bool worker_fault = false;   // counts towards the worker's quarantine
  bool worker_ok = false;      // resets it
};

Decision Decide(Outcome outcome, FailureClass fc, const std::string& class_failures_text, bool cancel_requested,
                const RetryPolicy& policy) {
  Decision d;
  json cf = json::parse(class_failures_text, nullptr, false);
  if (!cf.is_object()) cf = json::object();
  d.class_failures = cf.dump();
  if (outcome == Outcome::kSucceeded) {
    d.next = "succeeded";
    d.worker_ok = true;
    return d;
  }
  if (outcome == Outcome::kCancelled || cancel_requested) {
    d.next = "cancelled";
    return d;
  }
  if (outcome == Outcome::kPreempted) {
    d.next = "queued";
    d.preempted = true;
    return d;
  }
  std::string name(FailureClassName(fc));
  if (name.empty()) name = "unspecified";
  int n = cf.value(name, 0) + 1;
  cf[name] = n;
  int total = 0;
  for (auto& [k, v] : cf.items()) total += v.is_number_integer() ? v.get<int>() : 0;
  d.class_failures = cf.dump();
  d.worker_fault = fc == FailureClass::kCrash || fc == FailureClass::kHang || fc == FailureClass::kInfra;
  if (n <= policy.MaxRetries(fc) && total < policy.max_failed_attempts) {
    d.next = "queued";
    d.backoff_ms = RetryBackoffMs(policy, fc, n);
  } else {
    d.next = "failed";
  }
  return d;
}

// Counts a worker's consecutive faulty attempts; quarantines it at policy.quarantine_after. Returns true when the
// worker is (now) quarantined because of this failure.
absl::StatusOr<bool> NoteWorkerResult(PGconn* c, const std::string& worker_id, const Decision& d,
                                      const RetryPolicy& policy, const std::string& why) {
  if (worker_id.empty() || (!d.worker_fault && !d.worker_ok)) return false;
  auto r = Exec(c, "worker failures",
                "UPDATE workers SET consecutive_failures = CASE WHEN $2::boolean THEN consecutive_failures + 1 ELSE 0 END, "
                "quarantined_until = CASE WHEN $2::boolean AND $3::int > 0 AND consecutive_failures + 1 >= $3::int "
                "  THEN now() + make_interval(secs => $4::int) ELSE quarantined_until END, "
                "quarantine_reason = CASE WHEN $2::boolean AND $3::int > 0 AND consecutive_failures + 1 >= $3::int "
                "  THEN (consecutive_failures + 1)::text || ' consecutive failed attempts, last: ' || $5 "
                "  ELSE quarantine_reason END "
                "WHERE id = $1 RETURNING $2::boolean AND $3::int > 0 AND consecutive_failures >= $3::int",
                {worker_id, d.worker_fault ? "true" : "false", std::to_string(policy.quarantine_after),
                 std::to_string(policy.quarantine_s), why.substr(0, 500)});
  if (!r.ok()) return r.status();
  return r->rows() == 1 && r->Bool(0, 0);
}

}  // namespace

PgJobStore::PgJobStore(std::string dsn, int pool_size) : pool_(std::move(dsn), pool_size) {}

absl::StatusOr<CreateSweepResult> PgJobStore::CreateSweep(const NewSweep& sw) {
  int64_t sweep_id = 0;
  bool created = false;
  {  // the connection goes back to the pool before GetSweep takes one
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();

  json jobs = json::array();
  for (const auto& j : sw.jobs) {
    json factors = json::object();
    for (const auto& [k, v] : j.factors) factors[k] = v;
    jobs.push_back({{"cell_index", j.cell_index},
                    {"factors", factors},
                    {"params", j.params},
                    {"config_hash", j.config_hash},
                    {"total_steps", j.total_steps},
                    {"mem", j.mem_estimate_bytes},
                    {"gpus", j.gpus}, {"ranks", j.ranks}});
  }

  {
    PgTransaction tx(c);
    if (auto st = tx.Begin(); !st.ok()) return st;
    // ON CONFLICT DO NOTHING: a concurrent submit with the same key loses quietly and reads the winner below.
    auto ins = Exec(c, "insert sweep",
                    "INSERT INTO sweeps (name, spec_yaml, spec_hash, idempotency_key, factor_names) "
                    "VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                    {sw.name, sw.spec_yaml, sw.spec_hash, sw.idempotency_key, json(sw.factor_names).dump()});
    if (!ins.ok()) return ins.status();
    if (ins->rows() == 1) {
      sweep_id = ins->Int(0, 0);
      auto jr = InsertJobs(c, sweep_id, jobs, sw.reuse_succeeded);
      if (!jr.ok()) return jr.status();  // tx rolls back: no sweep without its jobs
      if (jr->first != static_cast<int64_t>(sw.jobs.size())) {
        return absl::InternalError("inserted " + Num(jr->first) + " jobs, expected " + Num(sw.jobs.size()));
      }
      if (jr->second > 0) {
        if (auto st = RefreshSweep(c, sweep_id); !st.ok()) return st;
      }
      if (auto st = tx.Commit(); !st.ok()) return st;
      created = true;
    }
  }
  if (!created) {
    auto ex = Exec(c, "find sweep by idempotency key", "SELECT id, spec_hash FROM sweeps WHERE idempotency_key = $1",
                   {sw.idempotency_key});
    if (!ex.ok()) return ex.status();
    if (ex->rows() == 0) return absl::AbortedError("idempotency key conflict vanished; retry");
    if (ex->Str(0, 1) != sw.spec_hash) {
      return absl::AlreadyExistsError("idempotency key '" + sw.idempotency_key + "' is already used by sweep " +
                                      ex->Str(0, 0) + " with a different spec");
    }
    sweep_id = ex->Int(0, 0);
  }
  }
  auto s = GetSweep(sweep_id);
  if (!s.ok()) return s.status();
  return CreateSweepResult{*std::move(s), created};
}

absl::StatusOr<SweepRecord> PgJobStore::GetSweep(int64_t sweep_id) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  std::string sql = std::string("SELECT ") + kSweepCols + " FROM sweeps s WHERE s.id = $1";
  auto r = Exec(conn->get(), "get sweep", sql.c_str(), {Num(sweep_id)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::NotFoundError("sweep " + Num(sweep_id) + " not found");
  std::vector<SweepRecord> v{ReadSweep(*r, 0)};
  if (auto st = FillJobCounts(conn->get(), &v); !st.ok()) return st;
  return v[0];
}

absl::StatusOr<std::vector<SweepRecord>> PgJobStore::ListSweeps(int32_t limit) {
  if (limit <= 0 || limit > 1000) limit = limit <= 0 ? 100 : 1000;
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  std::string sql = std::string("SELECT ") + kSweepCols + " FROM sweeps s ORDER BY s.id DESC LIMIT $1";
  auto r = Exec(conn->get(), "list sweeps", sql.c_str(), {Num(limit)});
  if (!r.ok()) return r.status();
  std::vector<SweepRecord> out;
  for (int i = 0; i < r->rows(); ++i) out.push_back(ReadSweep(*r, i));
  if (auto st = FillJobCounts(conn->get(), &out); !st.ok()) return st;
  return out;
}

absl::StatusOr<int32_t> PgJobStore::CancelSweep(int64_t sweep_id) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  auto s = Exec(c, "lock sweep", "UPDATE sweeps SET cancel_requested = TRUE WHERE id = $1 RETURNING id",
                {Num(sweep_id)});
  if (!s.ok()) return s.status();
  if (s->rows() == 0) return absl::NotFoundError("sweep " + Num(sweep_id) + " not found");
  auto q = Exec(c, "cancel queued jobs",
                "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE sweep_id = $1 AND state = 'queued'",
                {Num(sweep_id)});
  if (!q.ok()) return q.status();
  auto l = Exec(c, "flag live jobs",
                "UPDATE jobs SET cancel_requested = TRUE WHERE sweep_id = $1 AND state IN ('leased', 'running') "
                "AND NOT cancel_requested",
                {Num(sweep_id)});
  if (!l.ok()) return l.status();
  if (auto st = RefreshSweep(c, sweep_id); !st.ok()) return st;
  if (auto st = tx.Commit(); !st.ok()) return st;
  return static_cast<int32_t>(q->Affected() + l->Affected());
}

absl::StatusOr<std::vector<JobRecord>> PgJobStore::ListJobs(int64_t sweep_id) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  std::string sql = std::string("SELECT ") + kJobCols + " FROM jobs j WHERE j.sweep_id = $1 ORDER BY j.cell_index";
  auto r = Exec(conn->get(), "list jobs", sql.c_str(), {Num(sweep_id)});
  if (!r.ok()) return r.status();
  std::vector<JobRecord> out;
  for (int i = 0; i < r->rows(); ++i) out.push_back(ReadJob(*r, i));
  if (out.empty()) {
    // Distinguish "no such sweep" from an (impossible) empty one.
    auto s = Exec(conn->get(), "sweep exists", "SELECT 1 FROM sweeps WHERE id = $1", {Num(sweep_id)});
    if (!s.ok()) return s.status();
    if (s->rows() == 0) return absl::NotFoundError("sweep " + Num(sweep_id) + " not found");
  }
  if (auto st = FillLatestMetrics(conn->get(), "j.sweep_id = $1", Num(sweep_id), &out); !st.ok()) return st;
  return out;
}

absl::StatusOr<JobRecord> PgJobStore::GetJob(int64_t job_id) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  std::string sql = std::string("SELECT ") + kJobCols + " FROM jobs j WHERE j.id = $1";
  auto r = Exec(conn->get(), "get job", sql.c_str(), {Num(job_id)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::NotFoundError("job " + Num(job_id) + " not found");
  std::vector<JobRecord> v{ReadJob(*r, 0)};
  if (auto st = FillLatestMetrics(conn->get(), "j.id = $1", Num(job_id), &v); !st.ok()) return st;
  return v[0];
}

absl::StatusOr<std::vector<MetricSample>> PgJobStore::JobMetrics(int64_t job_id,
                                                                 const std::vector<std::string>& names) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  std::string arr = "{";  // a text[] literal, every element quoted
  for (size_t i = 0; i < names.size(); ++i) {
    arr += i ? ",\"" : "\"";
    for (char ch : names[i]) {
      if (ch == '"' || ch == '\\') arr += '\\';
      arr += ch;
    }
    arr += '"';
  }
  arr += "}";
  auto r = Exec(conn->get(), "job metrics",
                "SELECT DISTINCT ON (name, step) step, name, value, "
                "(extract(epoch FROM time) * 1000)::bigint FROM metrics "
                "WHERE job_id = $1 AND (cardinality($2::text[]) = 0 OR name = ANY($2::text[])) "
                "ORDER BY name, step, attempt DESC",
                {Num(job_id), arr});
  if (!r.ok()) return r.status();
  std::vector<MetricSample> out;
  out.reserve(r->rows());
  for (int i = 0; i < r->rows(); ++i) out.push_back({r->Int(i, 0), r->Str(i, 1), r->Double(i, 2), r->Int(i, 3)});
  return out;
}

absl::StatusOr<std::map<int64_t, double>> PgJobStore::MaxMetric(int64_t sweep_id, const std::string& metric) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  // NaN sorts above every number in Postgres; leave it out of a maximum.
  auto r = Exec(conn->get(), "max metric",
                "SELECT j.id, max(m.value) FROM jobs j JOIN metrics m ON m.job_id = coalesce(j.reused_from, j.id) "
                "WHERE j.sweep_id = $1 AND m.name = $2 AND m.value <> 'NaN'::float8 GROUP BY j.id",
                {Num(sweep_id), metric});
  if (!r.ok()) return r.status();
  std::map<int64_t, double> out;
  for (int i = 0; i < r->rows(); ++i) out[r->Int(i, 0)] = r->Double(i, 1);
  return out;
}

absl::Status PgJobStore::UpsertWorker(const WorkerInfo& w) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "upsert worker",
                "INSERT INTO workers (id, hostname, resources, version) VALUES ($1, $2, $3::jsonb, $4) "
                "ON CONFLICT (id) DO UPDATE SET hostname = EXCLUDED.hostname, resources = EXCLUDED.resources, "
                "version = EXCLUDED.version, last_seen = now()",
                {w.worker_id, w.hostname, w.resources_json.empty() ? "{}" : w.resources_json, w.version});
  return r.ok() ? absl::OkStatus() : r.status();
}

absl::Status PgJobStore::SetQuarantine(const std::string& worker_id, bool quarantined, int duration_s,
                                       const std::string& reason) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "set quarantine",
                "UPDATE workers SET quarantined_until = CASE WHEN $2::boolean THEN now() + make_interval(secs => $3::int) "
                "ELSE NULL END, quarantine_reason = $4, consecutive_failures = 0 WHERE id = $1 RETURNING id",
                {worker_id, quarantined ? "true" : "false", std::to_string(std::max(duration_s, 1)), reason});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::NotFoundError("worker '" + worker_id + "' not registered");
  return absl::OkStatus();
}

namespace {
// Gang placement (jobs with ranks > 1), one transaction. Returns a grant when this call completed the gang or the
// worker's rank of an already granted gang is waiting for it; `pending` is set when the worker holds (or just
// took) a slot of a gang still forming: it must not take another job meanwhile. See docs/control-plane.md.
absl::StatusOr<std::optional<LeaseGrant>> LeaseGangSlot(PGconn* c, const std::string& worker_id, const Capacity& free,
                                                       int lease_ttl_s, const std::string& mems, int form_timeout_s,
                                                       int unformable_after, bool* pending,
                                                       std::vector<UnschedulableGang>* failed) {
  *pending = false;
  const std::string ttl = std::to_string(lease_ttl_s);
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  // Release pending slots that were not renewed in time, and slots of jobs that left leased/running.
  auto gc = Exec(c, "release gang slots",
                 "DELETE FROM gang_slots s USING jobs j WHERE s.job_id = j.id AND "
                 "((j.state = 'queued' AND s.expires_at < now()) OR j.state NOT IN ('queued', 'leased', 'running') "
                 " OR (j.state <> 'queued' AND s.attempt <> j.attempt))");
  if (!gc.ok()) return gc.status();
  // Formation deadline: a gang still incomplete that long after its first slot releases every slot and is held
  // back as long (not_before), so its members take other work instead of waiting for workers that may never come.
  // At each deadline it also counts the live registered workers (seen within max(TTL, deadline)) that could hold
  // one of its ranks (the same fit as placement: `gpus` devices with its per-GPU memory; a worker that advertises
  // nothing fits anything). Fewer than its ranks: one more miss in a row; enough: the count starts again (the fleet
  // is big enough, only busy). See docs/control-plane.md, "Gangs".
  auto late = Exec(c, "release late gangs",
                   "WITH late AS (SELECT s.job_id, count(*) AS joined FROM gang_slots s JOIN jobs j ON j.id = s.job_id "
                   "  WHERE j.state = 'queued' GROUP BY s.job_id "
                   "  HAVING min(s.joined_at) < now() - make_interval(secs => $1::int)), "
                   "fit AS (SELECT l.job_id, l.joined, (SELECT count(*) FROM workers w "
                   "    WHERE w.last_seen > now() - make_interval(secs => $2::int) AND CASE "
                   "      WHEN jsonb_typeof(w.resources->'gpus') = 'array' AND jsonb_array_length(w.resources->'gpus') > 0 "
                   "      THEN (SELECT count(*) FROM jsonb_array_elements(w.resources->'gpus') g "
                   "            WHERE coalesce((g->>'memoryBytes')::bigint, 0) >= j.mem_estimate_bytes) >= j.gpus "
                   "      ELSE coalesce((w.resources->>'memoryBytes')::bigint, 0) <= 0 "
                   "        OR (j.gpus <= 1 AND (w.resources->>'memoryBytes')::bigint >= j.mem_estimate_bytes) END) AS live "
                   "  FROM late l JOIN jobs j ON j.id = l.job_id), "
                   "held AS (UPDATE jobs j SET not_before = now() + make_interval(secs => $1::int), "
                   "  gang_form_misses = CASE WHEN j.ranks > f.live THEN j.gang_form_misses + 1 ELSE 0 END "
                   "  FROM fit f WHERE j.id = f.job_id AND j.state = 'queued' "
                   "  RETURNING j.id, j.sweep_id, j.ranks, j.gang_form_misses, f.joined, f.live), "
                   "gone AS (DELETE FROM gang_slots WHERE job_id IN (SELECT id FROM held)) "
                   "SELECT id, sweep_id, ranks, gang_form_misses, joined, live FROM held",
                   {std::to_string(form_timeout_s), std::to_string(std::max(lease_ttl_s, form_timeout_s))});
  if (!late.ok()) return late.status();
  // A gang that missed `unformable_after` deadlines in a row, each with fewer such workers than ranks, fails by
  // itself (class unschedulable, never retried) instead of forming and releasing forever.
  for (int i = 0; unformable_after > 0 && i < late->rows(); ++i) {
    const int32_t misses = static_cast<int32_t>(late->Int(i, 3));
    if (misses < unformable_after) continue;
    UnschedulableGang u;
    u.job_id = late->Int(i, 0);
    u.sweep_id = late->Int(i, 1);
    u.ranks = static_cast<int32_t>(late->Int(i, 2));
    u.live_workers = late->Int(i, 5);
    u.deadlines = misses;
    u.reason = "unschedulable: this gang needs " + Num(u.ranks) + " workers that can each hold one rank, but only " +
               Num(u.live_workers) + " live worker(s) that fit were registered at " + Num(misses) +
               " formation deadline(s) in a row (" + Num(late->Int(i, 4)) + " of " + Num(u.ranks) +
               " ranks joined within --gang_form_timeout_s " + Num(form_timeout_s) +
               " s); add workers or lower resources.ranks, then resubmit";
    auto f = Exec(c, "fail unformable gang",
                  "UPDATE jobs SET state = 'failed', failure_class = 'unschedulable', last_error = $2, "
                  "  finished_at = now() WHERE id = $1 AND state = 'queued'",
                  {Num(u.job_id), u.reason});
    if (!f.ok()) return f.status();
    if (auto st = RefreshSweep(c, u.sweep_id); !st.ok()) return st;
    failed->push_back(std::move(u));
  }
  // This worker's slot, if any (at most one live: a member never joins a second gang).
  auto mine = Exec(c, "my gang slot",
                   "SELECT s.job_id, s.rank, j.state FROM gang_slots s JOIN jobs j ON j.id = s.job_id "
                   "WHERE s.worker_id = $1 AND NOT s.done ORDER BY s.job_id LIMIT 1 FOR UPDATE OF j",
                   {worker_id});
  if (!mine.ok()) return mine.status();
  int64_t job_id = 0;
  int32_t ranks = 0;
  if (mine->rows() == 1) {
    job_id = mine->Int(0, 0);
    if (mine->Str(0, 2) != "queued") {
      // Granted (by another member's call): hand this worker its rank.
      auto g = Exec(c, "granted slot", "UPDATE gang_slots SET expires_at = now() + make_interval(secs => $3::int) "
                    "WHERE job_id = $1 AND worker_id = $2", {Num(job_id), worker_id, ttl});
      if (!g.ok()) return g.status();
    } else {
      auto g = Exec(c, "renew slot", "UPDATE gang_slots SET expires_at = now() + make_interval(secs => $3::int) "
                    "WHERE job_id = $1 AND worker_id = $2", {Num(job_id), worker_id, ttl});
      if (!g.ok()) return g.status();
    }
  } else {
    // The oldest forming gang that fits. FOR UPDATE without SKIP LOCKED: concurrent claimers queue up behind each
    // other and all join the same (oldest) gang, so two gangs never each hold part of the workers.
    auto next = Exec(c, "next gang",
                     "SELECT id FROM jobs WHERE state = 'queued' AND ranks > 1 AND not_before <= now() "
                     "  AND NOT cancel_requested "
                     "  AND ($2::boolean OR (SELECT count(*) FROM unnest($3::bigint[]) AS d(mem) "
                     "                       WHERE d.mem >= jobs.mem_estimate_bytes) >= jobs.gpus) "
                     "  AND NOT EXISTS (SELECT 1 FROM gang_slots s WHERE s.job_id = jobs.id AND s.worker_id = $1) "
                     "ORDER BY queued_at, id LIMIT 1 FOR UPDATE",
                     {worker_id, free.unlimited ? "true" : "false", mems});
    if (!next.ok()) return next.status();
    if (next->rows() == 0) {
      if (auto st = tx.Commit(); !st.ok()) return st;
      return std::optional<LeaseGrant>();
    }
    job_id = next->Int(0, 0);
    // The lowest free rank (a released slot leaves a hole that the next joiner fills).
    auto ins = Exec(c, "join gang",
                    "INSERT INTO gang_slots (job_id, rank, worker_id, rendezvous_addr, expires_at) "
                    "SELECT $1::bigint, (SELECT min(r) FROM generate_series(0, j.ranks - 1) AS r "
                    "            WHERE NOT EXISTS (SELECT 1 FROM gang_slots s WHERE s.job_id = $1::bigint AND s.rank = r)), "
                    "       $2::text, $3::text, now() + make_interval(secs => $4::int) FROM jobs j WHERE j.id = $1::bigint "
                    "RETURNING rank",
                    {Num(job_id), worker_id, free.rendezvous_addr, ttl});
    if (!ins.ok()) return ins.status();
  }
  auto job = Exec(c, "gang job", "SELECT state, ranks, (SELECT count(*) FROM gang_slots s WHERE s.job_id = $1) "
                  "FROM jobs WHERE id = $1", {Num(job_id)});
  if (!job.ok()) return job.status();
  if (job->rows() == 0) return absl::AbortedError("gang job vanished");
  ranks = static_cast<int32_t>(job->Int(0, 1));
  if (job->Str(0, 0) == "queued") {
    if (job->Int(0, 2) < ranks) {  // still forming: hold the slot
      *pending = true;
      if (auto st = tx.Commit(); !st.ok()) return st;
      return std::optional<LeaseGrant>();
    }
    // The last slot: lease the job once for the whole gang (rank 0's worker is the job's worker_id).
    auto up = Exec(c, "lease gang",
                   "UPDATE jobs j SET state = 'leased', attempt = j.attempt + 1, lease_epoch = j.lease_epoch + 1, "
                   "  lease_nonce = replace(gen_random_uuid()::text, '-', ''), "
                   "  lease_expires_at = now() + make_interval(secs => $2::int), gang_form_misses = 0, "
                   "  worker_id = (SELECT worker_id FROM gang_slots WHERE job_id = $1 AND rank = 0), "
                   "  started_at = coalesce(j.started_at, now()) WHERE j.id = $1 RETURNING attempt",
                   {Num(job_id), ttl});
    if (!up.ok()) return up.status();
    auto hist = Exec(c, "gang attempt",
                     "INSERT INTO job_attempts (job_id, attempt, lease_epoch, lease_nonce, worker_id, outcome, acquired_at) "
                     "SELECT id, attempt, lease_epoch, lease_nonce, worker_id, 'running', now() FROM jobs WHERE id = $1 "
                     "ON CONFLICT (job_id, attempt) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch, "
                     "lease_nonce = EXCLUDED.lease_nonce, worker_id = EXCLUDED.worker_id, outcome = 'running', "
                     "acquired_at = EXCLUDED.acquired_at, finished_at = NULL",
                     {Num(job_id)});
    if (!hist.ok()) return hist.status();
    auto sl = Exec(c, "arm slots",
                   "UPDATE gang_slots SET attempt = $2::int, expires_at = now() + make_interval(secs => $3::int) "
                   "WHERE job_id = $1", {Num(job_id), Num(up->Int(0, 0)), ttl});
    if (!sl.ok()) return sl.status();
  }
  std::string sql = std::string("SELECT ") + kJobCols +
                    ", s.rank, (SELECT rendezvous_addr FROM gang_slots WHERE job_id = j.id AND rank = 0) "
                    "FROM jobs j JOIN gang_slots s ON s.job_id = j.id AND s.worker_id = $2 WHERE j.id = $1";
  auto r = Exec(c, "gang grant", sql.c_str(), {Num(job_id), worker_id});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::AbortedError("gang slot vanished");
  LeaseGrant g;
  g.job = ReadJob(*r, 0);
  g.rank = static_cast<int32_t>(r->Int(0, 25));
  g.world_size = g.job.ranks;
  g.master_addr = r->Str(0, 26);
  g.lease = Lease{g.job.id, g.job.attempt, g.job.lease_epoch, g.job.lease_expires_unix_ms, g.job.lease_nonce, g.rank};
  auto cp = Exec(c, "resume checkpoints",
                 "SELECT step, path FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 8", {Num(g.job.id)});
  if (cp.ok()) {
    for (int i = 0; i < cp->rows(); ++i) g.checkpoints.emplace_back(cp->Int(i, 0), cp->Str(i, 1));
    if (!g.checkpoints.empty()) g.resume_checkpoint = g.checkpoints.front().second;
  }
  for (const auto& gpu : free.gpus) {
    if (static_cast<int32_t>(g.assigned_gpus.size()) >= g.job.gpus) break;
    if (gpu.memory_bytes >= g.job.mem_estimate_bytes) g.assigned_gpus.push_back(gpu.index);
  }
  if (auto st = tx.Commit(); !st.ok()) return st;
  return std::optional<LeaseGrant>(std::move(g));
}
}  // namespace

absl::StatusOr<LeaseAttempt> PgJobStore::LeaseJobFor(const std::string& worker_id, const Capacity& free,
                                                     int lease_ttl_s) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  LeaseAttempt out;
  auto w = Exec(c, "touch worker",
                "UPDATE workers SET last_seen = now() WHERE id = $1 RETURNING "
                "CASE WHEN quarantined_until > now() THEN " ABLATE_MS("quarantined_until") " ELSE 0 END, "
                "(extract(epoch from clock_timestamp()) * 1000)::bigint",
                {worker_id});
  if (!w.ok()) return w.status();
  if (w->rows() == 1 && w->Int(0, 0) > 0) {
    out.quarantined_until_unix_ms = w->Int(0, 0);
    return out;
  }
  // The latest database time at which the lease statement below may still grant: the caller's budget from now on,
  // in the database's own clock. A statement that reaches the server later (sent, then held up by the network and
  // delivered after the caller gave up on it) grants nothing, so no lease goes to a worker that never hears of it.
  std::optional<std::string> grant_until;
  if (auto b = CallBudget::Deadline(); b && w->rows() == 1) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*b - std::chrono::steady_clock::now()).count();
    grant_until = Num(w->Int(0, 1) + std::max<int64_t>(0, left));
  }
  // Device memories offered: the free GPUs, or the host memory as one device on a CPU worker.
  std::vector<int64_t> mems;
  for (const auto& g : free.gpus) mems.push_back(g.memory_bytes);
  if (mems.empty()) mems.push_back(free.host_memory_bytes > 0 ? free.host_memory_bytes : 0);
  std::string arr = "{";
  for (size_t i = 0; i < mems.size(); ++i) arr += (i ? "," : "") + Num(mems[i]);
  arr += "}";
  {
    bool pending = false;
    auto gang = LeaseGangSlot(c, worker_id, free, lease_ttl_s, arr, gang_form_timeout_s_, gang_unformable_after_,
                              &pending, &out.unschedulable);
    if (!gang.ok()) return gang.status();
    if (gang->has_value()) {
      out.grant = std::move(**gang);
      return out;
    }
    if (pending) return out;  // holding a slot of a forming gang: no other job meanwhile
  }
  // One statement, autocommit: SKIP LOCKED lets concurrent claimers pass over a row another one is taking, so no
  // job is handed out twice and nobody waits. A job fits when at least `gpus` offered devices each have its
  // per-GPU memory estimate: all of them at once, or the job is not leased here.
  std::string sql =
      "WITH next AS (SELECT id FROM jobs WHERE state = 'queued' AND ranks = 1 AND not_before <= now() "
      "  AND ($5::float8 IS NULL OR clock_timestamp() <= to_timestamp($5::float8 / 1000.0)) "
      "  AND ($3::boolean OR (SELECT count(*) FROM unnest($4::bigint[]) AS d(mem) "
      "                       WHERE d.mem >= jobs.mem_estimate_bytes) >= jobs.gpus) "
      "  ORDER BY queued_at, id LIMIT 1 FOR UPDATE SKIP LOCKED), "
      "upd AS (UPDATE jobs j SET state = 'leased', attempt = j.attempt + 1, lease_epoch = j.lease_epoch + 1, "
      "  lease_nonce = replace(gen_random_uuid()::text, '-', ''), "
      "  lease_expires_at = now() + make_interval(secs => $2::int), worker_id = $1, "
      "  started_at = coalesce(j.started_at, now()) FROM next WHERE j.id = next.id RETURNING j.*), "
      "hist AS (INSERT INTO job_attempts (job_id, attempt, lease_epoch, lease_nonce, worker_id, outcome, acquired_at) "
      "  SELECT id, attempt, lease_epoch, lease_nonce, worker_id, 'running', now() FROM upd "
      "  ON CONFLICT (job_id, attempt) DO UPDATE SET lease_epoch = EXCLUDED.lease_epoch, "
      "  lease_nonce = EXCLUDED.lease_nonce, worker_id = EXCLUDED.worker_id, outcome = 'running', "
      "  acquired_at = EXCLUDED.acquired_at, finished_at = NULL) "
      "SELECT " + std::string(kJobCols) + " FROM upd j";
  auto r = Exec(c, "lease next job", sql.c_str(),
                {worker_id, std::to_string(lease_ttl_s), free.unlimited ? "true" : "false", arr, grant_until});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return out;
  LeaseGrant g;
  g.job = ReadJob(*r, 0);
  g.lease = Lease{g.job.id, g.job.attempt, g.job.lease_epoch, g.job.lease_expires_unix_ms, g.job.lease_nonce};
  auto cp = Exec(c, "resume checkpoints",
                 "SELECT step, path FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 8", {Num(g.job.id)});
  if (cp.ok()) {
    for (int i = 0; i < cp->rows(); ++i) g.checkpoints.emplace_back(cp->Int(i, 0), cp->Str(i, 1));
    if (!g.checkpoints.empty()) g.resume_checkpoint = g.checkpoints.front().second;
  }
  // GPU indices: the first `gpus` offered GPUs with enough memory.
  for (const auto& gpu : free.gpus) {
    if (static_cast<int32_t>(g.assigned_gpus.size()) >= g.job.gpus) break;
    if (gpu.memory_bytes >= g.job.mem_estimate_bytes) g.assigned_gpus.push_back(gpu.index);
  }
  out.grant = std::move(g);
  return out;
}

absl::StatusOr<HeartbeatResult> PgJobStore::Heartbeat(const std::string& worker_id, const Lease& lease, int64_t step,
                                                      int lease_ttl_s) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  // Single-row updates, no table locks: the worker's row and the job's row.
  (void)Exec(c, "touch worker", "UPDATE workers SET last_seen = now() WHERE id = $1", {worker_id});
  // A gang member renews its own slot; the job's expiry is the earliest of its ranks' (a rank whose worker stopped
  // heartbeating expires the whole gang). Ordinary jobs have no slots: least() ignores the NULL.
  auto r = Exec(c, "heartbeat",
                "WITH slot AS (UPDATE gang_slots SET expires_at = now() + make_interval(secs => $5::int) "
                "  WHERE job_id = $1 AND rank = $7::int AND attempt = $2::int RETURNING 1) "
                "UPDATE jobs SET lease_expires_at = least(now() + make_interval(secs => $5::int), "
                "  (SELECT min(expires_at) FROM gang_slots WHERE job_id = $1 AND rank <> $7::int "
                "   AND attempt = $2::int AND NOT done)), "
                "state = CASE WHEN state = 'leased' AND $4::bigint >= 0 THEN 'running' ELSE state END, "
                "latest_step = greatest(latest_step, $4::bigint) "
                "WHERE " ABLATE_FENCE("$1", "$2", "$3", "$6") " "
                "RETURNING " ABLATE_MS("lease_expires_at") ", cancel_requested",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), Num(step), std::to_string(lease_ttl_s),
                 lease.lease_nonce, std::to_string(lease.rank)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return FenceError(c, lease, "heartbeat");
  HeartbeatResult out;
  out.lease = lease;
  out.lease.expires_unix_ms = r->Int(0, 0);
  out.cancel_requested = r->Bool(0, 1);
  return out;
}

absl::StatusOr<AppendMetricsResult> PgJobStore::AppendMetrics(const Lease& lease,
                                                              const std::vector<MetricSample>& points) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  json rows = json::array();
  for (const auto& p : points) {
    rows.push_back({{"step", p.step}, {"name", p.name}, {"value", FloatText(p.value)}, {"time_ms", p.time_unix_ms}});
  }
  // Fence and bulk upsert in one statement; FOR SHARE keeps the job's lease from changing underneath. Unique on
  // (job, name, step): a retried batch changes nothing, a step replayed by a newer attempt (resume) replaces the
  // older attempt's value. DISTINCT ON: a batch naming a point twice keeps one.
  auto r = Exec(c, "append metrics",
                "WITH fence AS (SELECT id FROM jobs WHERE " ABLATE_FENCE("$1", "$2", "$3", "$5") " FOR SHARE), "
                "ins AS (INSERT INTO metrics (job_id, attempt, step, name, value, time) "
                "        SELECT DISTINCT ON (x.name, x.step) $1::bigint, $2::int, x.step, x.name, x.value::float8, "
                "               CASE WHEN x.time_ms > 0 THEN to_timestamp(x.time_ms / 1000.0) ELSE now() END "
                "        FROM jsonb_to_recordset($4::jsonb) AS x(step bigint, name text, value text, time_ms bigint) "
                "        WHERE EXISTS (SELECT 1 FROM fence) "
                "        ON CONFLICT (job_id, name, step) DO UPDATE SET value = EXCLUDED.value, "
                "           attempt = EXCLUDED.attempt, time = EXCLUDED.time, ingested_at = now() "
                "        WHERE metrics.attempt < EXCLUDED.attempt RETURNING 1) "
                "SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM ins)",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), rows.dump(), lease.lease_nonce});
  if (!r.ok()) return r.status();
  if (r->Int(0, 0) == 0) return FenceError(c, lease, "metrics");
  return AppendMetricsResult{static_cast<int64_t>(points.size()), r->Int(0, 1)};
}

absl::StatusOr<std::vector<std::string>> PgJobStore::LeaseHolders(const Lease& lease) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "lease holders",
                "WITH cur AS (SELECT id, attempt, worker_id FROM jobs WHERE " ABLATE_FENCE("$1", "$2", "$3", "$4") ") "
                "SELECT coalesce(worker_id, '') FROM cur "
                "UNION SELECT s.worker_id FROM gang_slots s JOIN cur ON s.job_id = cur.id AND s.attempt = cur.attempt",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), lease.lease_nonce});
  if (!r.ok()) return r.status();
  std::vector<std::string> out;
  for (int i = 0; i < r->rows(); ++i)
    if (!r->Str(i, 0).empty()) out.push_back(r->Str(i, 0));
  return out;
}

absl::Status PgJobStore::RecordCheckpoint(const Lease& lease, int64_t step, const std::string& path) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  auto r = Exec(c, "record checkpoint",
                "WITH fence AS (SELECT id FROM jobs WHERE " ABLATE_FENCE("$1", "$2", "$3", "$6") " FOR SHARE), "
                "ins AS (INSERT INTO checkpoints (job_id, attempt, step, path, lease_epoch) "
                "        SELECT $1, $2, $4, $5, $3 WHERE EXISTS (SELECT 1 FROM fence) "
                "        ON CONFLICT (job_id, step) DO UPDATE SET path = EXCLUDED.path, attempt = EXCLUDED.attempt, "
                "        lease_epoch = EXCLUDED.lease_epoch, created_at = now() "
                "        RETURNING 1) "
                "SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM ins)",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), Num(step), path, lease.lease_nonce});
  if (!r.ok()) return r.status();
  if (r->Int(0, 0) == 0) return FenceError(c, lease, "checkpoint");
  return absl::OkStatus();
}

namespace {
const char* OutcomeName(Outcome o) {
  switch (o) {
    case Outcome::kSucceeded: return "succeeded";
    case Outcome::kCancelled: return "cancelled";
    case Outcome::kPreempted: return "preempted";
    default: return "failed";
  }
}

// Moves one job after its attempt ended (completion or expiry). The caller holds the job row FOR UPDATE and has
// checked the fence; this UPDATE repeats the fence in its WHERE.
absl::StatusOr<std::string> ApplyDecision(PGconn* c, const Lease& lease, const Decision& d, const std::string& fc_s,
                                          const std::string& message) {
  auto r = Exec(c, "move job",
                "UPDATE jobs SET state = $5, last_error = $6, failure_class = $7, lease_expires_at = NULL, "
                "class_failures = $8::jsonb, preemptions = preemptions + $9::int, "
                "not_before = CASE WHEN $5 = 'queued' THEN now() + make_interval(secs => $10::float8 / 1000.0) "
                "  ELSE not_before END, "
                "finished_at = CASE WHEN $5 = 'queued' THEN NULL ELSE now() END, "
                "queued_at = CASE WHEN $5 = 'queued' THEN now() ELSE queued_at END, "
                "worker_id = CASE WHEN $5 = 'queued' THEN NULL ELSE worker_id END "
                "WHERE " ABLATE_FENCE("$1", "$2", "$3", "$4") " RETURNING sweep_id",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), lease.lease_nonce, d.next,
                 d.next == "succeeded" ? "" : message, fc_s, d.class_failures, d.preempted ? "1" : "0",
                 Num(d.backoff_ms)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::AbortedError("job " + Num(lease.job_id) + " changed underneath; retry");
  // A gang's slots end with its attempt (the other ranks' heartbeats are fenced from now on: they stop).
  auto gs = Exec(c, "drop gang slots", "DELETE FROM gang_slots WHERE job_id = $1", {Num(lease.job_id)});
  if (!gs.ok()) return gs.status();
  return r->Str(0, 0);
}
}  // namespace

absl::StatusOr<CompleteResult> PgJobStore::Complete(const Lease& lease, Outcome outcome, FailureClass fc,
                                                    const std::string& message, int32_t exit_code, int64_t last_step,
                                                    const RetryPolicy& policy) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  std::string fc_s(outcome == Outcome::kFailed ? FailureClassName(fc) : "");
  if (lease.rank > 0 && (outcome == Outcome::kSucceeded || outcome == Outcome::kCancelled)) {
    // A gang member other than rank 0 finished cleanly: rank 0 reports the run. Its slot is done (no longer
    // renewed, no longer part of the gang's expiry); the job is not moved. Fenced on the token, not on the state
    // (rank 0 may have completed the job first).
    auto r = Exec(c, "gang member done",
                  "WITH done AS (UPDATE gang_slots SET done = true WHERE job_id = $1 AND rank = $5::int "
                  "  AND attempt = $2::int RETURNING 1) "
                  "SELECT state FROM jobs WHERE id = $1 AND attempt = $2 AND lease_epoch = $3 AND lease_nonce = $4",
                  {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), lease.lease_nonce,
                   std::to_string(lease.rank)});
    if (!r.ok()) return r.status();
    if (r->rows() == 0) return FenceError(c, lease, "completion");
    CompleteResult out;
    out.state = JobStateFromName(r->Str(0, 0)).value_or(JobState::kRunning);
    return out;
  }
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  // Fence check and row lock in one statement.
  auto cur = Exec(c, "lock job",
                  "SELECT class_failures::text, cancel_requested, coalesce(worker_id, '') FROM jobs "
                  "WHERE " ABLATE_FENCE("$1", "$2", "$3", "$4") " FOR UPDATE",
                  {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), lease.lease_nonce});
  if (!cur.ok()) return cur.status();
  if (cur->rows() == 0) return FenceError(c, lease, "completion");
  Decision d = Decide(outcome, fc, cur->Str(0, 0), cur->Bool(0, 1), policy);
  std::string worker_id = cur->Str(0, 2);
  if (lease.rank > 0) {  // a gang member failed (or was drained): the whole gang ends; blame that rank's worker
    auto w = Exec(c, "gang member", "SELECT worker_id FROM gang_slots WHERE job_id = $1 AND rank = $2::int",
                  {Num(lease.job_id), std::to_string(lease.rank)});
    if (!w.ok()) return w.status();
    if (w->rows() == 1) worker_id = w->Str(0, 0);
  }
  auto hist = Exec(c, "close attempt",
                   "INSERT INTO job_attempts (job_id, attempt, lease_epoch, lease_nonce, worker_id, outcome, "
                   "failure_class, message, exit_code, finished_at, last_step) "
                   "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now(), nullif($10::bigint, -1)) "
                   "ON CONFLICT (job_id, attempt) DO UPDATE SET outcome = EXCLUDED.outcome, "
                   "failure_class = EXCLUDED.failure_class, message = EXCLUDED.message, "
                   "exit_code = EXCLUDED.exit_code, finished_at = now(), last_step = EXCLUDED.last_step",
                   {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), lease.lease_nonce, worker_id,
                    OutcomeName(outcome), fc_s, message.substr(0, 4096), std::to_string(exit_code), Num(last_step)});
  if (!hist.ok()) return hist.status();
  auto sweep = ApplyDecision(c, lease, d, fc_s, message.substr(0, 4096));
  if (!sweep.ok()) return sweep.status();
  CompleteResult out;
  out.state = JobStateFromName(d.next).value_or(JobState::kFailed);
  out.retry_in_ms = d.next == "queued" ? d.backoff_ms : 0;
  auto q = NoteWorkerResult(c, worker_id, d, policy, fc_s + ": " + message.substr(0, 200));
  if (!q.ok()) return q.status();
  out.worker_quarantined = *q;
  if (IsTerminal(out.state)) {
    if (auto st = RefreshSweep(c, std::stoll(*sweep)); !st.ok()) return st;
  }
  if (auto st = tx.Commit(); !st.ok()) return st;
  return out;
}

absl::StatusOr<ExpireResult> PgJobStore::Expire(const RetryPolicy& policy, int64_t leader_epoch) {
  const auto started = std::chrono::steady_clock::now();
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  if (leader_epoch > 0) {
    // FOR SHARE: a new leader's epoch bump waits for this transaction, and this one sees a bump that committed.
    auto l = Exec(c, "leader fence", "SELECT epoch FROM leader WHERE id = 1 FOR SHARE");
    if (!l.ok()) return l.status();
    if (l->rows() == 0 || l->Int(0, 0) != leader_epoch) {
      return absl::FailedPreconditionError("not the leader any more (epoch " + Num(leader_epoch) + " is stale)");
    }
  }
  auto r = Exec(c, "expired leases",
                "SELECT id, attempt, lease_epoch, lease_nonce, "
                "coalesce((SELECT s.worker_id FROM gang_slots s WHERE s.job_id = jobs.id AND s.attempt = jobs.attempt "
                "  AND NOT s.done ORDER BY s.expires_at LIMIT 1), worker_id, ''), class_failures::text, "
                "cancel_requested, latest_step FROM jobs "
                "WHERE state IN ('leased', 'running') AND lease_expires_at < now() "
                "ORDER BY lease_expires_at LIMIT 500 FOR UPDATE SKIP LOCKED");
  if (!r.ok()) return r.status();
  // Judging leases right after the database held us up would blame their holders for the stall: their heartbeats
  // were held up (or refused) too. Roll back; the leader treats this as the store being unavailable (grace).
  if (auto held = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started);
      reap_stall_limit_ms_ > 0 && held.count() > reap_stall_limit_ms_) {
    return absl::UnavailableError("expire: the database took " + std::to_string(held.count()) +
                                  " ms to hand out the expired leases (stall limit " +
                                  std::to_string(reap_stall_limit_ms_) + " ms): nothing reaped after a stall");
  }
  ExpireResult out;
  std::set<int64_t> touched;
  for (int i = 0; i < r->rows(); ++i) {
    Lease lease{r->Int(i, 0), static_cast<int32_t>(r->Int(i, 1)), r->Int(i, 2), 0, r->Str(i, 3)};
    std::string worker_id = r->Str(i, 4);
    std::string msg = "lease expired: worker " + (worker_id.empty() ? std::string("?") : worker_id) +
                      " stopped heartbeating";
    Decision d = Decide(Outcome::kFailed, FailureClass::kInfra, r->Str(i, 5), r->Bool(i, 6), policy);
    auto hist = Exec(c, "close expired attempt",
                     "INSERT INTO job_attempts (job_id, attempt, lease_epoch, lease_nonce, worker_id, outcome, "
                     "failure_class, message, finished_at, leader_epoch, last_step) "
                     "VALUES ($1, $2, $3, $4, nullif($5, ''), 'expired', 'infra', $6, now(), nullif($7::bigint, 0), $8) "
                     "ON CONFLICT (job_id, attempt) DO UPDATE SET outcome = 'expired', failure_class = 'infra', "
                     "message = EXCLUDED.message, finished_at = now(), leader_epoch = EXCLUDED.leader_epoch, "
                     "last_step = EXCLUDED.last_step",
                     {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), lease.lease_nonce, worker_id, msg,
                      Num(leader_epoch), Num(r->Int(i, 7))});
    if (!hist.ok()) return hist.status();
    auto sweep = ApplyDecision(c, lease, d, "infra", msg);
    if (!sweep.ok()) return sweep.status();
    if (d.next == "queued") {
      ++out.requeued;
    } else {
      (d.next == "failed" ? out.failed : out.cancelled)++;
      touched.insert(std::stoll(*sweep));
    }
    auto q = NoteWorkerResult(c, worker_id, d, policy, msg);
    if (!q.ok()) return q.status();
    if (*q) out.quarantined_workers.push_back(worker_id);
  }
  for (int64_t sweep_id : touched) {
    if (auto st = RefreshSweep(c, sweep_id); !st.ok()) return st;
  }
  if (auto st = tx.Commit(); !st.ok()) return st;
  return out;
}

absl::StatusOr<bool> PgJobStore::CancelJob(int64_t job_id) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  auto r = Exec(c, "cancel job",
                "UPDATE jobs SET state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END, "
                "finished_at = CASE WHEN state = 'queued' THEN now() ELSE finished_at END, "
                "cancel_requested = TRUE WHERE id = $1 AND state IN ('queued', 'leased', 'running') RETURNING sweep_id",
                {Num(job_id)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) {
    auto e = Exec(c, "job exists", "SELECT 1 FROM jobs WHERE id = $1", {Num(job_id)});
    if (!e.ok()) return e.status();
    if (e->rows() == 0) return absl::NotFoundError("job " + Num(job_id) + " not found");
    return false;
  }
  if (auto st = RefreshSweep(c, r->Int(0, 0)); !st.ok()) return st;
  if (auto st = tx.Commit(); !st.ok()) return st;
  return true;
}

absl::StatusOr<ExtendResult> PgJobStore::ExtendSweep(int64_t sweep_id, const NewSweep& sw) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  auto s = Exec(c, "lock sweep", "SELECT id FROM sweeps WHERE id = $1 FOR UPDATE", {Num(sweep_id)});
  if (!s.ok()) return s.status();
  if (s->rows() == 0) return absl::NotFoundError("sweep " + Num(sweep_id) + " not found");
  auto have = Exec(c, "sweep cells", "SELECT config_hash, coalesce(max(cell_index) OVER (), -1) FROM jobs "
                   "WHERE sweep_id = $1", {Num(sweep_id)});
  if (!have.ok()) return have.status();
  std::set<std::string> hashes;
  int64_t next_index = 0;
  for (int i = 0; i < have->rows(); ++i) {
    hashes.insert(have->Str(i, 0));
    next_index = std::max<int64_t>(next_index, have->Int(i, 1) + 1);
  }
  ExtendResult out;
  json jobs = json::array();
  for (const auto& j : sw.jobs) {
    if (!hashes.insert(j.config_hash).second) {
      ++out.already_present;
      continue;
    }
    json factors = json::object();
    for (const auto& [k, v] : j.factors) factors[k] = v;
    jobs.push_back({{"cell_index", next_index++}, {"factors", factors}, {"params", j.params},
                    {"config_hash", j.config_hash}, {"total_steps", j.total_steps}, {"mem", j.mem_estimate_bytes},
                    {"gpus", j.gpus}, {"ranks", j.ranks}});
  }
  if (!jobs.empty()) {
    auto ins = InsertJobs(c, sweep_id, jobs, sw.reuse_succeeded);
    if (!ins.ok()) return ins.status();
    out.added = static_cast<int32_t>(ins->first - ins->second);
    out.reused = static_cast<int32_t>(ins->second);
    auto u = Exec(c, "extend sweep", "UPDATE sweeps SET cancel_requested = FALSE, factor_names = $2::jsonb "
                  "WHERE id = $1", {Num(sweep_id), json(sw.factor_names).dump()});
    if (!u.ok()) return u.status();
    if (auto st = RefreshSweep(c, sweep_id); !st.ok()) return st;
  }
  if (auto st = tx.Commit(); !st.ok()) return st;
  return out;
}

namespace {
constexpr const char* kScheduleCols =
    "s.id, s.name, s.cron, s.spec_yaml, " ABLATE_MS("s.next_due") ", "
    "coalesce((SELECT " ABLATE_MS("max(r.due_time)") " FROM schedule_runs r WHERE r.schedule_id = s.id), 0), "
    "coalesce((SELECT r.sweep_id FROM schedule_runs r WHERE r.schedule_id = s.id ORDER BY r.due_time DESC LIMIT 1), 0), "
    ABLATE_MS("s.created_at") ", (SELECT count(*) FROM schedule_runs r WHERE r.schedule_id = s.id), s.skipped_count";

ScheduleRecord ReadSchedule(const PgResult& r, int i) {
  ScheduleRecord s;
  s.id = r.Int(i, 0);
  s.name = r.Str(i, 1);
  s.cron = r.Str(i, 2);
  s.spec_yaml = r.Str(i, 3);
  s.next_due_unix_ms = r.Int(i, 4);
  s.last_fired_unix_ms = r.Int(i, 5);
  s.last_sweep_id = r.Int(i, 6);
  s.created_unix_ms = r.Int(i, 7);
  s.fired_count = static_cast<int32_t>(r.Int(i, 8));
  s.skipped_count = static_cast<int32_t>(r.Int(i, 9));
  return s;
}
std::string MsToTs(int64_t ms) { return "to_timestamp(" + Num(ms) + " / 1000.0)"; }
}  // namespace

absl::StatusOr<ScheduleRecord> PgJobStore::CreateSchedule(const std::string& name, const std::string& cron,
                                                          const std::string& spec_yaml, int64_t next_due_unix_ms) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "create schedule",
                "INSERT INTO schedules (name, cron, spec_yaml, next_due) VALUES ($1, $2, $3, "
                "to_timestamp($4::bigint / 1000.0)) RETURNING id",
                {name, cron, spec_yaml, Num(next_due_unix_ms)});
  if (!r.ok()) return r.status();
  std::string sql = std::string("SELECT ") + kScheduleCols + " FROM schedules s WHERE s.id = $1";
  auto g = Exec(conn->get(), "get schedule", sql.c_str(), {r->Str(0, 0)});
  if (!g.ok()) return g.status();
  return ReadSchedule(*g, 0);
}

absl::StatusOr<std::vector<ScheduleRecord>> PgJobStore::ListSchedules() {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  std::string sql = std::string("SELECT ") + kScheduleCols + " FROM schedules s ORDER BY s.id";
  auto r = Exec(conn->get(), "list schedules", sql.c_str());
  if (!r.ok()) return r.status();
  std::vector<ScheduleRecord> out;
  for (int i = 0; i < r->rows(); ++i) out.push_back(ReadSchedule(*r, i));
  return out;
}

absl::Status PgJobStore::DeleteSchedule(int64_t schedule_id) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "delete schedule", "DELETE FROM schedules WHERE id = $1", {Num(schedule_id)});
  if (!r.ok()) return r.status();
  if (r->Affected() == 0) return absl::NotFoundError("schedule " + Num(schedule_id) + " not found");
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ScheduleRecord>> PgJobStore::DueSchedules(int64_t now_override_unix_ms) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  std::string now = now_override_unix_ms > 0 ? MsToTs(now_override_unix_ms) : "now()";
  std::string sql = std::string("SELECT ") + kScheduleCols + " FROM schedules s WHERE s.next_due <= " + now +
                    " ORDER BY s.next_due LIMIT 100";
  auto r = Exec(conn->get(), "due schedules", sql.c_str());
  if (!r.ok()) return r.status();
  std::vector<ScheduleRecord> out;
  for (int i = 0; i < r->rows(); ++i) out.push_back(ReadSchedule(*r, i));
  return out;
}

absl::StatusOr<bool> PgJobStore::RecordScheduleRun(int64_t schedule_id, int64_t due_unix_ms, int64_t sweep_id,
                                                   int64_t expected_next_due_unix_ms, int64_t new_next_due_unix_ms,
                                                   int32_t skipped) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  auto ins = Exec(c, "schedule run",
                  "INSERT INTO schedule_runs (schedule_id, due_time, sweep_id) "
                  "VALUES ($1, to_timestamp($2::bigint / 1000.0), nullif($3::bigint, 0)) "
                  "ON CONFLICT (schedule_id, due_time) DO NOTHING RETURNING 1",
                  {Num(schedule_id), Num(due_unix_ms), Num(sweep_id)});
  if (!ins.ok()) return ins.status();
  auto upd = Exec(c, "advance schedule",
                  "UPDATE schedules SET next_due = to_timestamp($3::bigint / 1000.0), "
                  "skipped_count = skipped_count + $4::int "
                  "WHERE id = $1 AND next_due = to_timestamp($2::bigint / 1000.0)",
                  {Num(schedule_id), Num(expected_next_due_unix_ms), Num(new_next_due_unix_ms),
                   std::to_string(ins->rows() == 1 ? skipped : 0)});
  if (!upd.ok()) return upd.status();
  if (auto st = tx.Commit(); !st.ok()) return st;
  return ins->rows() == 1;
}

absl::StatusOr<int64_t> PgJobStore::CountQuarantinedWorkers() {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "count quarantined", "SELECT count(*) FROM workers WHERE quarantined_until > now()");
  if (!r.ok()) return r.status();
  return r->Int(0, 0);
}

namespace {
absl::StatusOr<std::map<std::string, int64_t>> CountBy(PgPool* pool, const char* what, const char* sql) {
  auto conn = pool->Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), what, sql);
  if (!r.ok()) return r.status();
  std::map<std::string, int64_t> out;
  for (int i = 0; i < r->rows(); ++i) out[r->Str(i, 0)] = r->Int(i, 1);
  return out;
}
}  // namespace

absl::StatusOr<std::map<std::string, int64_t>> PgJobStore::CountJobsByState() {
  return CountBy(&pool_, "count jobs", "SELECT state, count(*) FROM jobs GROUP BY state");
}

absl::StatusOr<std::map<std::string, int64_t>> PgJobStore::CountSweepsByState() {
  return CountBy(&pool_, "count sweeps", "SELECT state, count(*) FROM sweeps GROUP BY state");
}

absl::StatusOr<int64_t> PgJobStore::CountWorkersSeenWithin(int seconds) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "count workers",
                "SELECT count(*) FROM workers WHERE last_seen > now() - make_interval(secs => $1::int)",
                {std::to_string(seconds)});
  if (!r.ok()) return r.status();
  return r->Int(0, 0);
}

absl::StatusOr<std::vector<RunningJobMetric>> PgJobStore::LatestMetricsOfRunningJobs(int max_series) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "running job metrics",
                "SELECT DISTINCT ON (m.job_id, m.name) m.job_id, m.name, m.value FROM metrics m "
                "JOIN jobs j ON j.id = m.job_id AND m.attempt = j.attempt WHERE j.state = 'running' "
                "ORDER BY m.job_id, m.name, m.step DESC LIMIT $1",
                {std::to_string(max_series)});
  if (!r.ok()) return r.status();
  std::vector<RunningJobMetric> out;
  for (int i = 0; i < r->rows(); ++i) out.push_back({r->Int(i, 0), r->Str(i, 1), r->Double(i, 2)});
  return out;
}

}  // namespace ablate::scheduler::pg
