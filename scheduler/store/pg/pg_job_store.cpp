#include "scheduler/store/pg/pg_job_store.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <set>

#include "absl/status/status.h"

namespace ablate::scheduler::pg {
namespace {

using nlohmann::json;

#define ABLATE_MS(col) "coalesce((extract(epoch from " col ") * 1000)::bigint, 0)"

// Column list shared by every query that returns a JobRecord (see ReadJob).
constexpr const char* kJobCols =
    "j.id, j.sweep_id, j.cell_index, j.state, j.attempt, j.lease_epoch, " ABLATE_MS("j.lease_expires_at") ", "
    "coalesce(j.worker_id, ''), j.factors::text, j.params::text, j.config_hash, j.last_error, j.failure_class, "
    ABLATE_MS("j.created_at") ", " ABLATE_MS("j.started_at") ", " ABLATE_MS("j.finished_at") ", "
    "j.latest_step, j.total_steps, j.cancel_requested";

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
  auto r = Exec(c, "fence lookup", "SELECT state, attempt, lease_epoch FROM jobs WHERE id = $1", {Num(lease.job_id)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return absl::NotFoundError("job " + Num(lease.job_id) + " not found");
  return absl::FailedPreconditionError(
      std::string(what) + " rejected: stale lease for job " + Num(lease.job_id) + ": got attempt " +
      Num(lease.attempt) + " epoch " + Num(lease.lease_epoch) + ", current is attempt " + r->Str(0, 1) + " epoch " +
      r->Str(0, 2) + " in state " + r->Str(0, 0) + " (writes need the current lease and state leased|running)");
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
      "SELECT DISTINCT ON (m.job_id, m.name) m.job_id, m.name, m.value FROM metrics m JOIN jobs j ON j.id = m.job_id "
      "WHERE " + std::string(where) + " ORDER BY m.job_id, m.name, m.attempt DESC, m.step DESC";
  auto r = Exec(c, "latest metrics", sql.c_str(), {id});
  if (!r.ok()) return r.status();
  std::map<int64_t, JobRecord*> by_id;
  for (auto& j : *jobs) by_id[j.id] = &j;
  for (int i = 0; i < r->rows(); ++i) {
    if (auto it = by_id.find(r->Int(i, 0)); it != by_id.end()) it->second->latest_metrics[r->Str(i, 1)] = r->Double(i, 2);
  }
  return absl::OkStatus();
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
                    {"total_steps", j.total_steps}});
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
      auto jr = Exec(c, "insert jobs",
                     "INSERT INTO jobs (sweep_id, cell_index, factors, params, config_hash, total_steps) "
                     "SELECT $1, x.cell_index, x.factors, x.params, x.config_hash, x.total_steps "
                     "FROM jsonb_to_recordset($2::jsonb) AS x(cell_index int, factors jsonb, params jsonb, "
                     "config_hash text, total_steps bigint)",
                     {Num(sweep_id), jobs.dump()});
      if (!jr.ok()) return jr.status();  // tx rolls back: no sweep without its jobs
      if (jr->Affected() != static_cast<int64_t>(sw.jobs.size())) {
        return absl::InternalError("inserted " + Num(jr->Affected()) + " jobs, expected " + Num(sw.jobs.size()));
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

absl::StatusOr<std::map<int64_t, double>> PgJobStore::MaxMetric(int64_t sweep_id, const std::string& metric) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  // NaN sorts above every number in Postgres; leave it out of a maximum.
  auto r = Exec(conn->get(), "max metric",
                "SELECT m.job_id, max(m.value) FROM metrics m JOIN jobs j ON j.id = m.job_id "
                "WHERE j.sweep_id = $1 AND m.name = $2 AND m.value <> 'NaN'::float8 GROUP BY m.job_id",
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

absl::StatusOr<std::optional<LeaseGrant>> PgJobStore::LeaseNextJob(const std::string& worker_id, int lease_ttl_s) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  (void)Exec(c, "touch worker", "UPDATE workers SET last_seen = now() WHERE id = $1", {worker_id});
  // One statement, autocommit: SKIP LOCKED lets concurrent claimers pass over a row another one is taking,
  // so no job is handed out twice and nobody waits.
  std::string sql =
      "WITH next AS (SELECT id FROM jobs WHERE state = 'queued' ORDER BY queued_at, id LIMIT 1 "
      "FOR UPDATE SKIP LOCKED) "
      "UPDATE jobs j SET state = 'leased', attempt = j.attempt + 1, lease_epoch = j.lease_epoch + 1, "
      "lease_expires_at = now() + make_interval(secs => $2::int), worker_id = $1, "
      "started_at = coalesce(j.started_at, now()) FROM next WHERE j.id = next.id RETURNING " +
      std::string(kJobCols);
  auto r = Exec(c, "lease next job", sql.c_str(), {worker_id, std::to_string(lease_ttl_s)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return std::optional<LeaseGrant>();
  LeaseGrant g;
  g.job = ReadJob(*r, 0);
  g.lease = Lease{g.job.id, g.job.attempt, g.job.lease_epoch, g.job.lease_expires_unix_ms};
  auto cp = Exec(c, "resume checkpoint", "SELECT path FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 1",
                 {Num(g.job.id)});
  if (cp.ok() && cp->rows() == 1) g.resume_checkpoint = cp->Str(0, 0);
  return std::optional<LeaseGrant>(std::move(g));
}

absl::StatusOr<HeartbeatResult> PgJobStore::Heartbeat(const std::string& worker_id, const Lease& lease, int64_t step,
                                                      int lease_ttl_s) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  (void)Exec(c, "touch worker", "UPDATE workers SET last_seen = now() WHERE id = $1", {worker_id});
  auto r = Exec(c, "heartbeat",
                "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $5::int), "
                "state = CASE WHEN state = 'leased' AND $4::bigint >= 0 THEN 'running' ELSE state END, "
                "latest_step = greatest(latest_step, $4::bigint) "
                "WHERE id = $1 AND attempt = $2 AND lease_epoch = $3 AND state IN ('leased', 'running') "
                "RETURNING " ABLATE_MS("lease_expires_at") ", cancel_requested",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), Num(step), std::to_string(lease_ttl_s)});
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
  // Fence and bulk insert in one statement; FOR SHARE keeps the job's lease from changing underneath.
  auto r = Exec(c, "append metrics",
                "WITH fence AS (SELECT id FROM jobs WHERE id = $1 AND attempt = $2 AND lease_epoch = $3 "
                "               AND state IN ('leased', 'running') FOR SHARE), "
                "ins AS (INSERT INTO metrics (job_id, attempt, step, name, value, time) "
                "        SELECT $1, $2, x.step, x.name, x.value::float8, "
                "               CASE WHEN x.time_ms > 0 THEN to_timestamp(x.time_ms / 1000.0) ELSE now() END "
                "        FROM jsonb_to_recordset($4::jsonb) AS x(step bigint, name text, value text, time_ms bigint) "
                "        WHERE EXISTS (SELECT 1 FROM fence) "
                "        ON CONFLICT DO NOTHING RETURNING 1) "
                "SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM ins)",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), rows.dump()});
  if (!r.ok()) return r.status();
  if (r->Int(0, 0) == 0) return FenceError(c, lease, "metrics");
  return AppendMetricsResult{static_cast<int64_t>(points.size()), r->Int(0, 1)};
}

absl::Status PgJobStore::RecordCheckpoint(const Lease& lease, int64_t step, const std::string& path) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  auto r = Exec(c, "record checkpoint",
                "WITH fence AS (SELECT id FROM jobs WHERE id = $1 AND attempt = $2 AND lease_epoch = $3 "
                "               AND state IN ('leased', 'running') FOR SHARE), "
                "ins AS (INSERT INTO checkpoints (job_id, attempt, step, path) "
                "        SELECT $1, $2, $4, $5 WHERE EXISTS (SELECT 1 FROM fence) "
                "        ON CONFLICT (job_id, step) DO UPDATE SET path = EXCLUDED.path, attempt = EXCLUDED.attempt "
                "        RETURNING 1) "
                "SELECT (SELECT count(*) FROM fence), (SELECT count(*) FROM ins)",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), Num(step), path});
  if (!r.ok()) return r.status();
  if (r->Int(0, 0) == 0) return FenceError(c, lease, "checkpoint");
  return absl::OkStatus();
}

absl::StatusOr<JobState> PgJobStore::CompleteJob(const Lease& lease, Outcome outcome, FailureClass fc,
                                                 const std::string& message, int32_t exit_code, int max_attempts) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  std::string outcome_s = outcome == Outcome::kSucceeded ? "succeeded"
                          : outcome == Outcome::kCancelled ? "cancelled" : "failed";
  std::string fc_s(outcome == Outcome::kFailed ? FailureClassName(fc) : "");
  std::string retryable = (outcome == Outcome::kFailed && IsRetryable(fc)) ? "true" : "false";
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  auto hist = Exec(c, "record attempt",
                   "INSERT INTO job_attempts (job_id, attempt, lease_epoch, worker_id, outcome, failure_class, message, "
                   "exit_code) SELECT id, attempt, lease_epoch, worker_id, $4, $5, $6, $7 FROM jobs "
                   "WHERE id = $1 AND attempt = $2 AND lease_epoch = $3 AND state IN ('leased', 'running') "
                   "ON CONFLICT (job_id, attempt) DO NOTHING",
                   {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), outcome_s, fc_s, message,
                    std::to_string(exit_code)});
  if (!hist.ok()) return hist.status();
  // The fence is the WHERE of this UPDATE; a failed attempt goes back to the queue while attempts remain,
  // unless its class is never retried or the sweep was cancelled.
  auto r = Exec(c, "complete job",
                "UPDATE jobs SET state = n.next, last_error = $5, failure_class = $6, lease_expires_at = NULL, "
                "finished_at = CASE WHEN n.next = 'queued' THEN NULL ELSE now() END, "
                "queued_at = CASE WHEN n.next = 'queued' THEN now() ELSE queued_at END, "
                "worker_id = CASE WHEN n.next = 'queued' THEN NULL ELSE worker_id END "
                "FROM (SELECT CASE WHEN $4 = 'succeeded' THEN 'succeeded' WHEN $4 = 'cancelled' THEN 'cancelled' "
                "             WHEN cancel_requested THEN 'cancelled' "
                "             WHEN $7::boolean AND attempt < $8::int THEN 'queued' ELSE 'failed' END AS next "
                "      FROM jobs WHERE id = $1) n "
                "WHERE id = $1 AND attempt = $2 AND lease_epoch = $3 AND state IN ('leased', 'running') "
                "RETURNING state, sweep_id",
                {Num(lease.job_id), Num(lease.attempt), Num(lease.lease_epoch), outcome_s,
                 outcome == Outcome::kSucceeded ? "" : message, fc_s, retryable, std::to_string(max_attempts)});
  if (!r.ok()) return r.status();
  if (r->rows() == 0) return FenceError(c, lease, "completion");
  JobState next = JobStateFromName(r->Str(0, 0)).value_or(JobState::kFailed);
  if (IsTerminal(next)) {
    if (auto st = RefreshSweep(c, r->Int(0, 1)); !st.ok()) return st;
  }
  if (auto st = tx.Commit(); !st.ok()) return st;
  return next;
}

absl::StatusOr<ExpireResult> PgJobStore::ExpireLeases(int max_attempts) {
  auto conn = pool_.Acquire();
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  PgTransaction tx(c);
  if (auto st = tx.Begin(); !st.ok()) return st;
  // All CTEs see the pre-update rows, so the history row records the lease that expired.
  auto r = Exec(c, "expire leases",
                "WITH exp AS (SELECT id FROM jobs WHERE state IN ('leased', 'running') AND lease_expires_at < now() "
                "             FOR UPDATE SKIP LOCKED), "
                "hist AS (INSERT INTO job_attempts (job_id, attempt, lease_epoch, worker_id, outcome, failure_class, "
                "         message) SELECT j.id, j.attempt, j.lease_epoch, j.worker_id, 'expired', 'infra', "
                "         'lease expired: worker ' || coalesce(j.worker_id, '?') || ' stopped heartbeating' "
                "         FROM jobs j JOIN exp ON exp.id = j.id ON CONFLICT (job_id, attempt) DO NOTHING) "
                "UPDATE jobs j SET state = CASE WHEN j.cancel_requested THEN 'cancelled' "
                "                               WHEN j.attempt >= $1::int THEN 'failed' ELSE 'queued' END, "
                "  failure_class = 'infra', "
                "  last_error = 'lease expired: worker ' || coalesce(j.worker_id, '?') || ' stopped heartbeating', "
                "  lease_expires_at = NULL, "
                "  worker_id = CASE WHEN j.cancel_requested OR j.attempt >= $1::int THEN j.worker_id ELSE NULL END, "
                "  queued_at = now(), "
                "  finished_at = CASE WHEN j.cancel_requested OR j.attempt >= $1::int THEN now() ELSE NULL END "
                "FROM exp WHERE j.id = exp.id RETURNING j.state, j.sweep_id",
                {std::to_string(max_attempts)});
  if (!r.ok()) return r.status();
  ExpireResult out;
  std::set<int64_t> touched;
  for (int i = 0; i < r->rows(); ++i) {
    std::string s = r->Str(i, 0);
    if (s == "queued") {
      ++out.requeued;
    } else {
      (s == "failed" ? out.failed : out.cancelled)++;
      touched.insert(r->Int(i, 1));
    }
  }
  for (int64_t sweep_id : touched) {
    if (auto st = RefreshSweep(c, sweep_id); !st.ok()) return st;
  }
  if (auto st = tx.Commit(); !st.ok()) return st;
  return out;
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
