// Collective communication between the ranks of one training job (data-parallel and sharded training).
//
//   auto comm = ablate::dist::init_from_env(opts);   // RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun's)
//   comm->all_reduce(grads_flat, ReduceOp::kAvg);
//   auto work = comm->all_reduce_async(bucket, ReduceOp::kAvg);  ...  work->wait();
//
// Every operation works on whole, contiguous tensors and must be issued in the same order with the same sizes on
// every rank (like NCCL). Operations run in issue order on one queue per communicator: the CPU backend
// (socket_communicator.cpp: a ring over TCP on one machine, run by a communication thread) or NCCL
// (nccl_communicator.cpp, only with ABLATE_WITH_CUDA: a dedicated CUDA stream ordered against the compute stream by
// events). Reductions are deterministic: the same inputs on the same number of ranks give the same bits.
//
// A watchdog thread checks that every started collective finishes within `timeout`; one that makes no progress
// aborts the communicator and calls the hang handler (by default: message on stderr, exit code kExitHang).
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

namespace c10d {
class Store;
}

namespace ablate::dist {

// Exit code of a process whose collective hung (docs/contracts.md): the worker classifies it as `hang`.
constexpr int kExitHang = 5;

enum class ReduceOp { kSum, kAvg };

// A collective failed (a peer closed its connection, a socket error, an NCCL error). Not a hang.
struct DistError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A pending collective. wait() orders the caller after it: the CPU backend blocks until it is done (and rethrows
// its error); NCCL makes the current CUDA stream wait for it (the host does not block).
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// Called once, from the watchdog thread, when a collective makes no progress for the timeout, before the
// communicator is aborted; afterwards the watchdog prints `message` and calls std::_Exit(kExitHang).
using HangHandler = std::function<void(const std::string& message)>;

// True once a watchdog has decided to end the process as a hang. Aborting the communicator wakes the threads
// blocked in collectives with errors; an error path that sees this flag must wait (the process is about to exit
// with kExitHang) rather than report a crash.
bool hang_exit_in_progress();
// Blocks the calling thread for good when hang_exit_in_progress(); returns at once otherwise.
void wait_if_hang_exit();

struct Options {
  std::chrono::milliseconds timeout{std::chrono::seconds(600)};  // --dist_timeout
  HangHandler on_hang;                                            // empty: the default handler
};

class Communicator {
 public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  virtual std::string backend() const = 0;  // "cpu" | "nccl"
  // Device the tensors must be on: CPU for "cpu", the rank's GPU for "nccl".
  virtual torch::Device device() const = 0;

  // In place; `t` is the same shape on every rank.
  virtual WorkPtr all_reduce_async(const torch::Tensor& t, ReduceOp op) = 0;
  // input.numel() == world * output.numel(); rank r receives the reduction of every rank's r-th slice.
  virtual WorkPtr reduce_scatter_async(const torch::Tensor& input, const torch::Tensor& output, ReduceOp op) = 0;
  // output.numel() == world * input.numel(); output's r-th slice is rank r's input.
  virtual WorkPtr all_gather_async(const torch::Tensor& input, const torch::Tensor& output) = 0;
  // In place: every rank ends with root's `t`.
  virtual WorkPtr broadcast_async(const torch::Tensor& t, int root) = 0;

  void all_reduce(const torch::Tensor& t, ReduceOp op) { all_reduce_async(t, op)->wait(); }
  void reduce_scatter(const torch::Tensor& in, const torch::Tensor& out, ReduceOp op) {
    reduce_scatter_async(in, out, op)->wait();
  }
  void all_gather(const torch::Tensor& in, const torch::Tensor& out) { all_gather_async(in, out)->wait(); }
  void broadcast(const torch::Tensor& t, int root) { broadcast_async(t, root)->wait(); }
  // Returns once every rank has called barrier() (and, on the host, after all earlier collectives finished).
  void barrier();
  // Convenience: all-reduce of one double (host value in, host value out).
  double all_reduce_scalar(double v, ReduceOp op);

 protected:
  Communicator(int rank, int world, Options opts);
  // Watchdog bookkeeping, called by the backends: an operation is pending from begin_op to end_op.
  int64_t begin_op(const char* what);
  void end_op(int64_t id);
  // Backends: stop every pending and future operation (close sockets / ncclCommAbort). Called by the watchdog.
  virtual void abort() = 0;
  // NCCL polls its events here (called by the watchdog thread about every 100 ms before it checks the ages).
  virtual void poll_pending() {}
  // Starts the watchdog thread; backends call it at the end of their constructor and stop_watchdog() first thing
  // in their destructor.
  void start_watchdog();
  void stop_watchdog();

  const int rank_, world_;
  const Options opts_;

 private:
  struct Watchdog;
  std::unique_ptr<Watchdog> wd_;
};

// Rendezvous store for `world` processes: a c10d::TCPStore hosted by rank 0 at master_addr:master_port, or, when
// ABLATE_DIST_FILE_STORE names a file, a c10d::FileStore on it (one machine, or a shared file system).
c10::intrusive_ptr<c10d::Store> make_store(int rank, int world, std::chrono::milliseconds timeout);

// CPU backend: a ring of TCP connections between the ranks, addresses exchanged through `store`.
std::unique_ptr<Communicator> make_cpu_communicator(c10::intrusive_ptr<c10d::Store> store, int rank, int world,
                                                    Options opts);
// NCCL backend (ABLATE_WITH_CUDA builds only; throws elsewhere): rank 0's ncclUniqueId is published through
// `store`; `device` is this rank's GPU.
std::unique_ptr<Communicator> make_nccl_communicator(c10::intrusive_ptr<c10d::Store> store, int rank, int world,
                                                     int device, Options opts);

// The rank layout of this process from the environment (torchrun's names): RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR (default 127.0.0.1), MASTER_PORT (required when WORLD_SIZE > 1). world == 1 without WORLD_SIZE.
struct EnvLayout {
  int rank = 0, world = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
};
EnvLayout env_layout();  // throws std::invalid_argument on malformed values
// A non-negative integer environment variable (dflt when unset or empty); throws std::invalid_argument otherwise.
int env_int(const char* name, int dflt);

// Builds the communicator for this process from the environment: `backend` "cpu" or "nccl" (device = LOCAL_RANK).
std::unique_ptr<Communicator> init_from_env(const std::string& backend, Options opts);

}  // namespace ablate::dist
