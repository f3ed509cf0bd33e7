// The worker daemon's loop: register, lease, supervise one ablate-train child per job, report back.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "ablate/v1/ablate.grpc.pb.h"
#include "worker/metrics.h"
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
};

// CPU cores, memory and (when nvidia-smi is on PATH and answers) GPUs of this node.
v1::Resources DetectResources();

// "lease returned a job": the flag and the job itself (both must be there).
bool LeaseHasJob(const v1::LeaseJobResponse& r);

class Worker {
 public:
  Worker(WorkerOptions opts, std::shared_ptr<grpc::Channel> channel, WorkerMetrics* metrics, Stopper* stop);
  // Returns the process exit code: 0 after a clean stop / max_jobs / once.
  int Run();

 private:
  bool Register();
  void RunJob(const v1::LeaseJobResponse& leased);
  void Complete(const v1::Lease& lease, v1::Outcome outcome, v1::FailureClass fc, const std::string& message,
                int exit_code);

  WorkerOptions opts_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  WorkerMetrics* metrics_;
  Stopper* stop_;
  v1::Resources resources_;
  std::chrono::milliseconds heartbeat_interval_{5000};
};

}  // namespace ablate::worker
