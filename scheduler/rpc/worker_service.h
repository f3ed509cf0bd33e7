// WorkerService (ablate-worker daemons). Synchronous gRPC API for now (see sweep_service.h).
#pragma once
#include "ablate/v1/ablate.grpc.pb.h"
#include "scheduler/rpc/convert.h"

namespace ablate::scheduler::rpc {

class WorkerServiceImpl final : public v1::WorkerService::Service {
 public:
  explicit WorkerServiceImpl(ServiceContext* ctx) : ctx_(ctx) {}

  grpc::Status RegisterWorker(grpc::ServerContext*, const v1::RegisterWorkerRequest*,
                              v1::RegisterWorkerResponse*) override;
  grpc::Status LeaseJob(grpc::ServerContext*, const v1::LeaseJobRequest*, v1::LeaseJobResponse*) override;
  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest*, v1::HeartbeatResponse*) override;
  grpc::Status ReportMetrics(grpc::ServerContext*, grpc::ServerReader<v1::MetricBatch>*,
                             v1::ReportMetricsResponse*) override;
  grpc::Status ReportCheckpoint(grpc::ServerContext*, const v1::ReportCheckpointRequest*,
                                v1::ReportCheckpointResponse*) override;
  grpc::Status CompleteJob(grpc::ServerContext*, const v1::CompleteJobRequest*, v1::CompleteJobResponse*) override;

 private:
  ServiceContext* ctx_;
};

}  // namespace ablate::scheduler::rpc
