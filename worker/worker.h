// The worker daemon's loop: register, lease, supervise one ablate-train child per job, report back.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>
#include <string>

#include "ablate/v1/ablate.grpc.pb.h"
#include "worker/metrics.h"
#include "worker/replica_router.h"
#include "worker/util.h"

namespace ablate::worker {

struct WorkerOptions {
  std::string worker_id;
  std::string train_bin;
  std::string data_root;
  std::string work_dir;
  std::chrono::milliseconds poll_interval{500};
  int64_t max_jobs = 0;  // exit after this many jobs; 0 = forever
  bool once = false;     // one lease attempt (and its job, if any), then exit
  std::chrono::milliseconds kill_grace{10000};  // SIGTERM -> SIGKILL for the child's process group
  std::chrono::milliseconds rpc_timeout{10000};
  std::string version = "0.1.0";
  // Drain (SIGTERM): the child gets SIGTERM (it may write a checkpoint) and this long to exit; the attempt is
  // released as PREEMPTED so the job is re-queued at once without spending its retry budget.
  std::chrono::milliseconds drain_grace{60000};
  // Hang detection when the scheduler sends no progress timeout (0: off).
  std::chrono::milliseconds progress_timeout{0};
  // A child that dies (crash class) within this long and before its "started" event is a node problem (infra).
  std::chrono::milliseconds startup_window{30000};
  // Keep training while the scheduler answers "database unavailable" (nobody can take the lease then), up to this
  // long after the last real renewal; past it, self-fence as if unreachable.
  std::chrono::milliseconds store_outage_tolerance{600000};
  // Back off before leasing again after consecutive failed attempts (crash loop).
  std::chrono::milliseconds failure_backoff_max{60000};
  std::string gpus_override;  // "2x80G:9.0" — advertise fake GPUs (tests, placement drills)
  // Gang-scheduled jobs: the host other ranks reach this node's rank 0 at (MASTER_ADDR); with each LeaseJob the
  // worker offers <rendezvous_host>:<a free port>. Empty: no rendezvous address offered.
  std::string rendezvous_host;
  // Cap of one attempt's on-disk metric spill (<work_dir>/.spill/): past it new points are dropped and counted.
  uint64_t metric_spill_max_bytes = uint64_t{256} << 20;
};

// A TCP port that was free a moment ago (bound to port 0 and closed), 0 on error.
int PickFreePort();

// CPU cores, memory and (when nvidia-smi is on PATH and answers) GPUs of this node; `gpus_override`
// ("2x80G:9.0": count x memory[:compute capability]) replaces the GPU list.
v1::Resources DetectResources(const std::string& gpus_override = "");

// "lease returned a job": the flag and the job itself (both must be there).
bool LeaseHasJob(const v1::LeaseJobResponse& r);

class Worker {
 public:
  // heartbeat_channel: a second connection to the scheduler that carries only lease renewals, so a metric batch or
  // checkpoint record stalled on a slow link cannot hold them back (head-of-line blocking on one TCP connection).
  // Null: heartbeats share `channel`.
  // replica_channels: with several scheduler replicas, one channel per replica. A heartbeat answered "scheduler up,
  // database down" by the replica the heartbeat channel picked is tried on each of them: when only that replica's
  // path to PostgreSQL is broken, another one renews the lease (else the leader, whose path is fine, would reap it
  // while this worker kept training on the store-outage tolerance: a double run).
  // replica_data_channels: with several replicas, one more channel per replica (not the heartbeats' connections),
  // in replica_channels' order, for every other call once `channel`'s pick answered "database down" or a heartbeat
  // was renewed by another replica (ReplicaRouter).
  Worker(WorkerOptions opts, std::shared_ptr<grpc::Channel> channel, WorkerMetrics* metrics, Stopper* stop,
         std::shared_ptr<grpc::Channel> heartbeat_channel = nullptr,
         std::vector<std::shared_ptr<grpc::Channel>> replica_channels = {},
         std::vector<std::shared_ptr<grpc::Channel>> replica_data_channels = {});
  // Returns the process exit code: 0 after a clean stop / max_jobs / once.
  int Run();

 private:
  bool Register();
  // Returns true when the attempt ended in a failure that counts against this node (crash loop backoff).
  bool RunJob(const v1::LeaseJobResponse& leased, std::chrono::steady_clock::time_point lease_sent);
  bool Complete(const v1::Lease& lease, v1::Outcome outcome, v1::FailureClass fc, const std::string& message,
                int exit_code, bool retry = true);

  WorkerOptions opts_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  std::unique_ptr<v1::WorkerService::Stub> hb_stub_;  // heartbeats only
  std::vector<std::unique_ptr<v1::WorkerService::Stub>> replica_hb_stubs_;  // one per replica (several only)
  std::vector<std::unique_ptr<v1::WorkerService::Stub>> replica_stubs_;     // the other calls', per replica
  std::unique_ptr<ReplicaRouter> router_;  // every call but heartbeats: stub_, or one replica after "database down"
  WorkerMetrics* metrics_;
  Stopper* stop_;
  v1::Resources resources_;
  std::chrono::milliseconds heartbeat_interval_{5000};
  std::chrono::milliseconds lease_ttl_{30000};
};

}  // namespace ablate::worker
