#include "scheduler/store/pg/leader.h"

namespace ablate::scheduler::pg {
namespace {
// "ablate" + 1: distinct from the migration lock.
constexpr const char* kLeaderLockKey = "107083551646054";
}  // namespace

int64_t LeaderElector::Tick(bool* became, bool* lost, std::string* error) {
  *became = *lost = false;
  auto drop = [&](const std::string& why) {
    if (epoch_ != 0) *lost = true;
    epoch_ = 0;
    conn_.reset();
    *error = why;
    return int64_t{0};
  };
  if (!conn_) {
    auto c = Connect(dsn_);
    if (!c.ok()) return drop(std::string(c.status().message()));
    conn_ = std::move(*c);
  }
  if (epoch_ != 0) {
    // Still leading only if the session (and with it the lock) is alive and nobody bumped the epoch.
    auto r = Exec(conn_.get(), "leader check", "SELECT epoch FROM leader WHERE id = 1");
    if (!r.ok()) return drop(std::string(r.status().message()));
    if (r->rows() == 0 || r->Int(0, 0) != epoch_) return drop("leader epoch moved on");
    return epoch_;
  }
  auto r = Exec(conn_.get(), "leader lock", (std::string("SELECT pg_try_advisory_lock(") + kLeaderLockKey + ")").c_str());
  if (!r.ok()) return drop(std::string(r.status().message()));
  if (!r->Bool(0, 0)) return 0;
  auto e = Exec(conn_.get(), "leader epoch",
                "WITH up AS (INSERT INTO leader (id, epoch, holder) VALUES (1, 1, $1) "
                "ON CONFLICT (id) DO UPDATE SET epoch = leader.epoch + 1, holder = EXCLUDED.holder, acquired_at = now() "
                "RETURNING epoch) "
                "INSERT INTO leader_history (epoch, holder) SELECT epoch, $1 FROM up RETURNING epoch",
                {holder_});
  if (!e.ok()) return drop(std::string(e.status().message()));
  epoch_ = e->Int(0, 0);
  *became = true;
  return epoch_;
}

void LeaderElector::Release() {
  if (conn_ && epoch_ != 0) {
    (void)Exec(conn_.get(), "leader unlock", (std::string("SELECT pg_advisory_unlock(") + kLeaderLockKey + ")").c_str());
  }
  epoch_ = 0;
  conn_.reset();
}

}  // namespace ablate::scheduler::pg
