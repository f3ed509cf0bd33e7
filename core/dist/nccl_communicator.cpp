// NCCL backend (ABLATE_WITH_CUDA builds). Bootstrap: rank 0 creates the ncclUniqueId and publishes it in the
// rendezvous store (TCPStore from MASTER_ADDR/MASTER_PORT, or whatever store the caller passes, e.g. one fed by
// the scheduler for gang-scheduled multi-worker jobs); the other ranks read it and all call ncclCommInitRank.
//
// Ordering: each collective runs on this communicator's own high-priority stream. Before it, an event recorded on
// the caller's current (compute) stream is waited on by the communication stream, so the inputs are complete;
// after it, an event is recorded on the communication stream, and Work::wait() makes the caller's current stream
// wait on that event (the host never blocks). Tensors used on the communication stream are recorded with the
// caching allocator so their memory is not reused before the collective finishes.
//
// Watchdog: the base class tracks every enqueued collective until its end event completes (polled here); one
// older than the timeout makes the watchdog call ncclCommAbort and the hang handler. An asynchronous NCCL error
// (a peer's network failed, ...) aborts too and exits with code 1 (crash).
#include <nccl.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <cstring>
#include <deque>
#include <iostream>
#include <mutex>

#include "core/dist/communicator.h"

namespace ablate::dist {
namespace {

ncclDataType_t nccl_type(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return ncclFloat32;
    case c10::kDouble: return ncclFloat64;
    case c10::kHalf: return ncclFloat16;
    case c10::kBFloat16: return ncclBfloat16;
    case c10::kLong: return ncclInt64;
    case c10::kInt: return ncclInt32;
    case c10::kByte: return ncclUint8;
    case c10::kChar: return ncclInt8;
    default: throw DistError(std::string("nccl communicator: unsupported dtype ") + c10::toString(t));
  }
}

class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<c10::cuda::CUDAEvent> done, c10::DeviceIndex device)
      : done_(std::move(done)), device_(device) {}
  void wait() override { done_->block(c10::cuda::getCurrentCUDAStream(device_)); }

 private:
  std::shared_ptr<c10::cuda::CUDAEvent> done_;
  c10::DeviceIndex device_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int world, int device, Options opts)
      : Communicator(rank, world, std::move(opts)),
        device_(static_cast<c10::DeviceIndex>(device)),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_)) {
    c10::cuda::CUDAGuard guard(device_);
    ncclUniqueId id;
    const std::string key = "ablate/nccl/unique_id";
    if (rank == 0) {
      check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      const auto* b = reinterpret_cast<const uint8_t*>(&id);
      store->set(key, std::vector<uint8_t>(b, b + sizeof id));
    } else {
      const auto v = store->get(key);  // waits up to the store's timeout
      if (v.size() != sizeof id) throw DistError("nccl communicator: malformed unique id in the store");
      std::memcpy(&id, v.data(), sizeof id);
    }
    check(ncclCommInitRank(&comm_, world, id, rank), "ncclCommInitRank");
    start_watchdog();
  }

  ~NcclCommunicator() override {
    stop_watchdog();
    if (comm_ && !aborted_) {
      ncclCommFinalize(comm_);
      ncclCommDestroy(comm_);
    }
  }

  std::string backend() const override { return "nccl"; }
  torch::Device device() const override { return torch::Device(torch::kCUDA, device_); }

  WorkPtr all_reduce_async(const torch::Tensor& t, ReduceOp op) override {
    check_tensor(t, "all_reduce");
    return enqueue("all_reduce", {t}, [&](cudaStream_t s) {
      check(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()),
                          op == ReduceOp::kAvg ? ncclAvg : ncclSum, comm_, s),
            "ncclAllReduce");
    });
  }

  WorkPtr reduce_scatter_async(const torch::Tensor& in, const torch::Tensor& out, ReduceOp op) override {
    check_tensor(in, "reduce_scatter");
    check_tensor(out, "reduce_scatter");
    TORCH_CHECK(in.numel() == world_ * out.numel() && in.scalar_type() == out.scalar_type(),
                "reduce_scatter: input must be world x output elements of the same dtype");
    return enqueue("reduce_scatter", {in, out}, [&](cudaStream_t s) {
      check(ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                              nccl_type(out.scalar_type()), op == ReduceOp::kAvg ? ncclAvg : ncclSum, comm_, s),
            "ncclReduceScatter");
    });
  }

  WorkPtr all_gather_async(const torch::Tensor& in, const torch::Tensor& out) override {
    check_tensor(in, "all_gather");
    check_tensor(out, "all_gather");
    TORCH_CHECK(out.numel() == world_ * in.numel() && in.scalar_type() == out.scalar_type(),
                "all_gather: output must be world x input elements of the same dtype");
    return enqueue("all_gather", {in, out}, [&](cudaStream_t s) {
      check(ncclAllGather(in.data_ptr(), out.data_ptr(), static_cast<size_t>(in.numel()), nccl_type(in.scalar_type()),
                          comm_, s),
            "ncclAllGather");
    });
  }

  WorkPtr broadcast_async(const torch::Tensor& t, int root) override {
    check_tensor(t, "broadcast");
    return enqueue("broadcast", {t}, [&](cudaStream_t s) {
      check(ncclBroadcast(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), nccl_type(t.scalar_type()), root,
                          comm_, s),
            "ncclBroadcast");
    });
  }

 protected:
  void abort() override {
    if (aborted_.exchange(true)) return;
    ncclCommAbort(comm_);
  }

  void poll_pending() override {
    // The watchdog thread's current device would be 0: without this, rank 1's process would make a context there.
    c10::cuda::CUDAGuard guard(device_);
    {
      // try_lock: a launch can block inside NCCL while holding mu_ (the first collective connects the peers and
      // waits for them; a full work queue waits for the GPU). The watchdog must not wait with it: the op was
      // registered before the launch, so it still ages and times out.
      std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
      while (lock.owns_lock() && !pending_.empty() && pending_.front().second->query()) {  // in-order stream
        end_op(pending_.front().first);
        pending_.pop_front();
      }
    }
    ncclResult_t async = ncclSuccess;
    if (!aborted_ && ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess &&
        async != ncclInProgress) {
      std::cerr << "ablate-train: NCCL asynchronous error on rank " << rank_ << ": " << ncclGetErrorString(async)
                << "; aborting" << std::endl;
      abort();
      std::_Exit(1);
    }
  }

 private:
  void check(ncclResult_t r, const char* what) const {
    if (r != ncclSuccess && r != ncclInProgress)
      throw DistError(std::string(what) + " failed on rank " + std::to_string(rank_) + ": " + ncclGetErrorString(r) +
                      (comm_ ? std::string(" (") + ncclGetLastError(comm_) + ")" : std::string()));
  }

  void check_tensor(const torch::Tensor& t, const char* op) const {
    TORCH_CHECK(t.defined() && t.is_cuda() && t.device().index() == device_ && t.is_contiguous(), op,
                ": the nccl communicator takes contiguous tensors on cuda:", static_cast<int>(device_));
  }

  template <class F>
  WorkPtr enqueue(const char* what, std::initializer_list<torch::Tensor> tensors, F&& launch) {
    if (aborted_) throw DistError(std::string(what) + ": the communicator was aborted");
    c10::cuda::CUDAGuard guard(device_);
    const auto compute = c10::cuda::getCurrentCUDAStream(device_);
    c10::cuda::CUDAEvent ready;
    ready.record(compute);
    ready.block(stream_);  // inputs written by the compute stream are complete before the collective reads them
    auto done = std::make_shared<c10::cuda::CUDAEvent>();
    std::lock_guard<std::mutex> lock(mu_);  // one launcher at a time (autograd hooks and the main thread)
    const int64_t id = begin_op(what);
    try {
      launch(stream_.stream());
    } catch (...) {
      end_op(id);
      throw;
    }
    for (const auto& t : tensors) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream_);
    done->record(stream_);
    pending_.emplace_back(id, done);
    return std::make_shared<NcclWork>(done, device_);
  }

  c10::DeviceIndex device_;
  c10::cuda::CUDAStream stream_;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> aborted_{false};
  std::mutex mu_;
  std::deque<std::pair<int64_t, std::shared_ptr<c10::cuda::CUDAEvent>>> pending_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(c10::intrusive_ptr<c10d::Store> store, int rank, int world,
                                                     int device, Options opts) {
  return std::make_unique<NcclCommunicator>(std::move(store), rank, world, device, std::move(opts));
}

}  // namespace ablate::dist
