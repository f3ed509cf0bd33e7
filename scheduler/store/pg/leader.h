// Leader election among scheduler replicas on one database: a session-level PostgreSQL advisory lock held on a
// dedicated connection. Whoever holds it bumps leader.epoch (the term number); the reaper's and the cron's
// transitions check that epoch in their transaction, so a deposed leader that has not noticed yet changes nothing.
// The lock dies with the session: a killed or partitioned leader loses it as soon as PostgreSQL notices (TCP
// keepalives / tcp_user_timeout on the connection).
#pragma once
#include <cstdint>
#include <string>

#include "scheduler/store/pg/pg_conn.h"

namespace ablate::scheduler::pg {

class LeaderElector {
 public:
  LeaderElector(std::string dsn, std::string holder) : dsn_(std::move(dsn)), holder_(std::move(holder)) {}
  // Tries to become (or checks that we still are) the leader. Returns the epoch while leading, 0 otherwise.
  // *became is set when this call acquired leadership, *lost when it found leadership gone.
  int64_t Tick(bool* became, bool* lost, std::string* error);
  // Gives the lock up (clean shutdown): another replica takes over at its next tick.
  void Release();
  int64_t epoch() const { return epoch_; }

 private:
  std::string dsn_, holder_;
  PgConnPtr conn_;
  int64_t epoch_ = 0;
};

}  // namespace ablate::scheduler::pg
