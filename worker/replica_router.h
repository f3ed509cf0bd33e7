// Where the worker's calls other than heartbeats go when it was given several scheduler replicas.
//
// They use the main channel (pick_first over every replica) until a call on it is answered "scheduler up, database
// down" (the ablate-store-unavailable trailer). pick_first never moves on from such a replica: it is up and keeps its
// connections, it has only lost its own path to PostgreSQL. From then on the calls go to one replica at a time over
// channels of their own, moving to the next on the same answer, or when that replica cannot be reached (UNAVAILABLE,
// DEADLINE_EXCEEDED). Heartbeats have their own fan-out to every replica (worker.cpp); this covers LeaseJob,
// CompleteJob, the metric streams and checkpoint reports. Thread-safe: the metric sender, the checkpoint reporter and
// the main loop share one router.
#pragma once
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "ablate/v1/ablate.grpc.pb.h"

namespace ablate::worker {

// Whether the answer carries the scheduler's "database down" trailer.
bool HasStoreTrailer(const grpc::ClientContext& ctx);

class ReplicaRouter {
 public:
  using Stub = v1::WorkerService::Stub;
  // main: the pick_first channel's stub; replicas: one per replica (empty with a single scheduler address).
  // switches: a counter to bump on every move as well (the worker's Prometheus metric), or null.
  ReplicaRouter(Stub* main, std::vector<Stub*> replicas, std::atomic<int64_t>* switches = nullptr)
      : main_(main), replicas_(std::move(replicas)), switches_(switches) {}

  // The stub the next call should use.
  Stub* Pick() const {
    const int a = active_.load();
    return a < 0 ? main_ : replicas_[static_cast<size_t>(a)];
  }

  // How a call on `used` ended (store_down: its answer carried the trailer). Returns true when the calls move to the
  // next replica. A report about a stub that is no longer the current one changes nothing (another thread's failure
  // on the same replica already moved them).
  bool Report(Stub* used, const grpc::Status& s, bool store_down);

  // Another path found replica r healthy while the current target was not (the heartbeat fan-out: r renewed a lease
  // after the heartbeat channel's pick failed): the calls go to r from now on. Returns true when they moved.
  bool UseReplica(size_t r);

  // Calls f(stub) on the current stub and reports its outcome; ctx is the call's context (for the trailer).
  template <typename F>
  grpc::Status Call(grpc::ClientContext* ctx, F&& f) {
    Stub* stub = Pick();
    grpc::Status s = f(stub);
    Report(stub, s, !s.ok() && HasStoreTrailer(*ctx));
    return s;
  }

  int64_t moves() const { return moves_.load(); }
  bool has_replicas() const { return !replicas_.empty(); }

 private:
  Stub* main_;
  std::vector<Stub*> replicas_;
  std::atomic<int> active_{-1};  // -1: the main channel; else an index into replicas_
  std::atomic<int64_t> moves_{0};
  std::atomic<int64_t>* switches_;
};

}  // namespace ablate::worker
