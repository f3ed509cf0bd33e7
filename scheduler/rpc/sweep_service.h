// SweepService (people, via the ablate CLI). Synchronous gRPC API for the walking skeleton: each call runs on a
// gRPC thread and blocks on the store; the callback API + a DB executor (STYLE.md §3.5) can come later.
#pragma once
#include "ablate/v1/ablate.grpc.pb.h"
#include "scheduler/rpc/convert.h"

namespace ablate::scheduler::rpc {

class SweepServiceImpl final : public v1::SweepService::Service {
 public:
  explicit SweepServiceImpl(ServiceContext* ctx) : ctx_(ctx) {}

  grpc::Status SubmitSweep(grpc::ServerContext*, const v1::SubmitSweepRequest*, v1::SubmitSweepResponse*) override;
  grpc::Status GetSweep(grpc::ServerContext*, const v1::GetSweepRequest*, v1::Sweep*) override;
  grpc::Status ListSweeps(grpc::ServerContext*, const v1::ListSweepsRequest*, v1::ListSweepsResponse*) override;
  grpc::Status CancelSweep(grpc::ServerContext*, const v1::CancelSweepRequest*, v1::CancelSweepResponse*) override;
  grpc::Status ListJobs(grpc::ServerContext*, const v1::ListJobsRequest*, v1::ListJobsResponse*) override;
  grpc::Status GetJob(grpc::ServerContext*, const v1::GetJobRequest*, v1::Job*) override;
  grpc::Status WatchSweep(grpc::ServerContext*, const v1::WatchSweepRequest*,
                          grpc::ServerWriter<v1::SweepEvent>*) override;
  grpc::Status CompareSweep(grpc::ServerContext*, const v1::CompareSweepRequest*,
                            v1::CompareSweepResponse*) override;
  grpc::Status GetJobMetrics(grpc::ServerContext*, const v1::GetJobMetricsRequest*,
                             v1::GetJobMetricsResponse*) override;
  grpc::Status CancelJob(grpc::ServerContext*, const v1::CancelJobRequest*, v1::CancelJobResponse*) override;
  grpc::Status ExtendSweep(grpc::ServerContext*, const v1::ExtendSweepRequest*, v1::ExtendSweepResponse*) override;
  grpc::Status CreateSchedule(grpc::ServerContext*, const v1::CreateScheduleRequest*, v1::Schedule*) override;
  grpc::Status ListSchedules(grpc::ServerContext*, const v1::ListSchedulesRequest*,
                             v1::ListSchedulesResponse*) override;
  grpc::Status DeleteSchedule(grpc::ServerContext*, const v1::DeleteScheduleRequest*,
                              v1::DeleteScheduleResponse*) override;
  grpc::Status QuarantineWorker(grpc::ServerContext*, const v1::QuarantineWorkerRequest*,
                                v1::QuarantineWorkerResponse*) override;

 private:
  ServiceContext* ctx_;
};

}  // namespace ablate::scheduler::rpc
