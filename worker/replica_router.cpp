#include "worker/replica_router.h"

#include <string>

namespace ablate::worker {

bool HasStoreTrailer(const grpc::ClientContext& ctx) {
  for (const auto& [k, v] : ctx.GetServerTrailingMetadata()) {
    if (std::string(k.data(), k.size()) == "ablate-store-unavailable") return true;
  }
  return false;
}

bool ReplicaRouter::Report(Stub* used, const grpc::Status& s, bool store_down) {
  if (replicas_.empty() || s.ok()) return false;
  int cur = active_.load();
  if (used != (cur < 0 ? main_ : replicas_[static_cast<size_t>(cur)])) return false;
  const bool unreachable =
      s.error_code() == grpc::StatusCode::UNAVAILABLE || s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
  // On the main channel only "database down" moves the calls: an unreachable replica is pick_first's own business.
  if (!store_down && !(cur >= 0 && unreachable)) return false;
  const int next = (cur + 1) % static_cast<int>(replicas_.size());
  if (!active_.compare_exchange_strong(cur, next)) return false;
  ++moves_;
  if (switches_ != nullptr) ++*switches_;
  return true;
}

bool ReplicaRouter::UseReplica(size_t r) {
  if (r >= replicas_.size()) return false;
  const int want = static_cast<int>(r);
  if (active_.exchange(want) == want) return false;
  ++moves_;
  if (switches_ != nullptr) ++*switches_;
  return true;
}

}  // namespace ablate::worker
