#include "scheduler/store/pg/migrate.h"

#include <map>

#include "absl/status/status.h"
#include "scheduler/store/pg/migrations_embedded.h"
#include "scheduler/store/pg/pg_conn.h"
#include "scheduler/util/log.h"
#include "scheduler/util/sha256.h"

namespace ablate::scheduler::pg {
namespace {

// Arbitrary but fixed: "ablate" in ASCII. Only ablate-scheduler takes this lock.
constexpr const char* kMigrationLockKey = "6513719744473189";

absl::StatusOr<std::map<int, std::string>> AppliedVersions(PGconn* c) {
  auto r = Exec(c, "read schema_migrations", "SELECT version, checksum FROM schema_migrations ORDER BY version");
  if (!r.ok()) return r.status();
  std::map<int, std::string> out;
  for (int i = 0; i < r->rows(); ++i) out[static_cast<int>(r->Int(i, 0))] = r->Str(i, 1);
  return out;
}

absl::Status ApplyAll(PGconn* c, MigrateResult* result) {
  if (auto st = ExecScript(c, "create schema_migrations",
                           "CREATE TABLE IF NOT EXISTS schema_migrations ("
                           " version INT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
                           " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())");
      !st.ok()) {
    return st;
  }
  auto applied = AppliedVersions(c);
  if (!applied.ok()) return applied.status();
  int latest = LatestMigrationVersion();
  if (!applied->empty() && applied->rbegin()->first > latest) {
    return absl::FailedPreconditionError("database schema version " + std::to_string(applied->rbegin()->first) +
                                         " is newer than this binary's " + std::to_string(latest) +
                                         "; run a newer ablate-scheduler");
  }
  for (const auto& m : kEmbeddedMigrations) {
    std::string checksum = Sha256Hex(m.sql);
    if (auto it = applied->find(m.version); it != applied->end()) {
      if (it->second != checksum) {
        return absl::FailedPreconditionError("migration " + std::to_string(m.version) + "_" + m.name +
                                             " was changed after being applied (checksum " + it->second +
                                             " in the database, " + checksum + " in this binary)");
      }
      continue;
    }
    PgTransaction tx(c);
    if (auto st = tx.Begin(); !st.ok()) return st;
    std::string what = "migration " + std::to_string(m.version) + "_" + m.name;
    if (auto st = ExecScript(c, what.c_str(), m.sql); !st.ok()) return st;
    auto ins = Exec(c, "record migration", "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    {std::to_string(m.version), std::string(m.name), checksum});
    if (!ins.ok()) return ins.status();
    if (auto st = tx.Commit(); !st.ok()) return st;
    LogInfo("migration_applied", {{"version", std::to_string(m.version)}, {"name", m.name}});
    ++result->applied;
  }
  result->schema_version = latest;
  return absl::OkStatus();
}

}  // namespace

int LatestMigrationVersion() {
  int v = 0;
  for (const auto& m : kEmbeddedMigrations) v = std::max(v, m.version);
  return v;
}

absl::StatusOr<MigrateResult> Migrate(const std::string& dsn) {
  auto conn = Connect(dsn);
  if (!conn.ok()) return conn.status();
  PGconn* c = conn->get();
  // Session-level lock: held across the per-migration transactions, released explicitly (and on disconnect).
  if (auto r = Exec(c, "advisory lock", "SELECT pg_advisory_lock($1::bigint)", {kMigrationLockKey}); !r.ok()) {
    return r.status();
  }
  MigrateResult result;
  absl::Status st = ApplyAll(c, &result);
  (void)Exec(c, "advisory unlock", "SELECT pg_advisory_unlock($1::bigint)", {kMigrationLockKey});
  if (!st.ok()) return st;
  return result;
}

absl::Status CheckSchemaCurrent(const std::string& dsn) {
  auto conn = Connect(dsn);
  if (!conn.ok()) return conn.status();
  auto r = Exec(conn->get(), "read schema version", "SELECT coalesce(max(version), 0) FROM schema_migrations");
  if (!r.ok()) return absl::FailedPreconditionError("database has no schema; run `ablate-scheduler migrate`: " +
                                                    std::string(r.status().message()));
  int v = static_cast<int>(r->Int(0, 0));
  if (v != LatestMigrationVersion()) {
    return absl::FailedPreconditionError("database schema version " + std::to_string(v) + ", this binary expects " +
                                         std::to_string(LatestMigrationVersion()));
  }
  return absl::OkStatus();
}

}  // namespace ablate::scheduler::pg
