// Numbered, forward-only migrations embedded in the binary (migrations/NNNN_name.sql), recorded in
// schema_migrations and applied under a Postgres advisory lock so concurrent schedulers don't race.
#pragma once
#include <string>

#include "absl/status/statusor.h"

namespace ablate::scheduler::pg {

struct Migration {
  int version;
  const char* name;
  const char* sql;
};

struct MigrateResult {
  int applied = 0;         // migrations applied by this call
  int schema_version = 0;  // version afterwards
};

// Applies every pending migration, each in its own transaction. Fails if an applied migration's checksum
// changed, or the database is newer than this binary.
absl::StatusOr<MigrateResult> Migrate(const std::string& dsn);
// Fails (kFailedPrecondition) unless the schema is exactly at the compiled-in latest version.
absl::Status CheckSchemaCurrent(const std::string& dsn);
int LatestMigrationVersion();

}  // namespace ablate::scheduler::pg
