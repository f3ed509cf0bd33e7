// CPU backend: the ranks form a ring of TCP connections (each rank connects to rank+1 and accepts rank-1; each
// connection carries data one way), and a communication thread runs the collectives in issue order:
//   reduce-scatter: N-1 steps; at step s rank r sends chunk (r-s-1) mod N to its successor, receives chunk
//                   (r-s-2) mod N from its predecessor and adds it to its own copy. Chunk c is therefore summed in
//                   the fixed order c+1, c+2, ..., c (mod N), the same every run: results are reproducible.
//   all-gather:     N-1 steps forwarding chunk (r-s) mod N.
//   all-reduce:     reduce-scatter + all-gather over N equal chunks (zero padded), so every rank ends with the
//                   same bits. Average divides the sum by N.
//   broadcast:      the root's tensor travels around the ring.
// Send and receive of a step proceed together (poll on non-blocking sockets), so large chunks cannot deadlock.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <thread>

#include "core/dist/communicator.h"

namespace ablate::dist {
namespace {

constexpr uint32_t kHelloMagic = 0xab1a7e01;

[[noreturn]] void sys_fail(const std::string& what) {
  throw DistError(what + ": " + std::strerror(errno));
}

class CpuWork : public Work {
 public:
  explicit CpuWork(std::shared_future<void> f) : f_(std::move(f)) {}
  void wait() override { f_.get(); }

 private:
  std::shared_future<void> f_;
};

void write_all_blocking(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t k = ::send(fd, c, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) sys_fail("communicator handshake send");
    c += k;
    n -= static_cast<size_t>(k);
  }
}

void read_all_blocking(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t k = ::recv(fd, c, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k == 0) throw DistError("communicator handshake: peer closed the connection");
    if (k < 0) sys_fail("communicator handshake recv");
    c += k;
    n -= static_cast<size_t>(k);
  }
}

class SocketCommunicator final : public Communicator {
 public:
  SocketCommunicator(c10::intrusive_ptr<c10d::Store> store, int rank, int world, Options opts)
      : Communicator(rank, world, std::move(opts)) {
    if (world > 1) connect_ring(*store);
    thread_ = std::thread([this] { run(); });
    start_watchdog();
  }

  ~SocketCommunicator() override {
    stop_watchdog();
    // Normally nothing is pending here. When training failed with collectives still queued (an exception on this
    // rank only), closing the ring makes them fail at once instead of waiting for peers that will never come.
    abort();
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    for (int fd : {send_fd_, recv_fd_})
      if (fd >= 0) ::close(fd);
  }

  std::string backend() const override { return "cpu"; }
  torch::Device device() const override { return torch::kCPU; }

  WorkPtr all_reduce_async(const torch::Tensor& t, ReduceOp op) override {
    check(t, "all_reduce");
    return enqueue("all_reduce", [this, t, op] {
      const int64_t n = t.numel(), S = (n + world_ - 1) / world_;
      if (world_ == 1) return finish_avg(t, op);
      auto w = torch::zeros({world_ * S}, t.options());
      w.narrow(0, 0, n).copy_(t.view({-1}));
      ring_reduce_scatter(w, S);
      ring_all_gather(w, S);
      t.view({-1}).copy_(w.narrow(0, 0, n));
      finish_avg(t, op);
    });
  }

  WorkPtr reduce_scatter_async(const torch::Tensor& in, const torch::Tensor& out, ReduceOp op) override {
    check(in, "reduce_scatter");
    check(out, "reduce_scatter");
    TORCH_CHECK(in.numel() == world_ * out.numel() && in.scalar_type() == out.scalar_type(),
                "reduce_scatter: input has ", in.numel(), " elements, expected world ", world_, " x output ",
                out.numel(), " of the same dtype");
    return enqueue("reduce_scatter", [this, in, out, op] {
      const int64_t S = out.numel();
      auto w = in.reshape({-1}).clone();
      ring_reduce_scatter(w, S);
      out.view({-1}).copy_(w.narrow(0, rank_ * S, S));
      finish_avg(out, op);
    });
  }

  WorkPtr all_gather_async(const torch::Tensor& in, const torch::Tensor& out) override {
    check(in, "all_gather");
    check(out, "all_gather");
    TORCH_CHECK(out.numel() == world_ * in.numel() && in.scalar_type() == out.scalar_type(), "all_gather: output has ",
                out.numel(), " elements, expected world ", world_, " x input ", in.numel(), " of the same dtype");
    return enqueue("all_gather", [this, in, out] {
      const int64_t S = in.numel();
      auto w = out.view({-1});
      w.narrow(0, rank_ * S, S).copy_(in.view({-1}));
      ring_all_gather(w, S);
    });
  }

  WorkPtr broadcast_async(const torch::Tensor& t, int root) override {
    check(t, "broadcast");
    TORCH_CHECK(root >= 0 && root < world_, "broadcast: root ", root, " is not a rank of ", world_);
    return enqueue("broadcast", [this, t, root] {
      if (world_ == 1) return;
      const int k = (rank_ - root + world_) % world_;  // position after the root along the ring
      auto flat = t.view({-1});
      const size_t bytes = static_cast<size_t>(flat.numel()) * flat.element_size();
      if (k > 0) exchange(nullptr, 0, flat.data_ptr(), bytes);
      if (k < world_ - 1) exchange(flat.data_ptr(), bytes, nullptr, 0);
    });
  }

 protected:
  void abort() override {
    aborted_ = true;
    for (int fd : {send_fd_, recv_fd_})
      if (fd >= 0) ::shutdown(fd, SHUT_RDWR);  // wakes a blocked poll; the fds are closed by the destructor
  }

 private:
  void check(const torch::Tensor& t, const char* op) const {
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous(), op,
                ": the cpu communicator takes defined, contiguous CPU tensors");
  }

  void finish_avg(const torch::Tensor& t, ReduceOp op) const {
    if (op != ReduceOp::kAvg || world_ == 1) return;
    TORCH_CHECK(t.is_floating_point(), "ReduceOp::kAvg needs a floating tensor");
    t.div_(static_cast<double>(world_));
  }

  WorkPtr enqueue(const char* what, std::function<void()> fn) {
    auto p = std::make_shared<std::promise<void>>();
    std::shared_future<void> f = p->get_future().share();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(Task{what, std::move(fn), std::move(p)});
    }
    cv_.notify_all();
    return std::make_shared<CpuWork>(std::move(f));
  }

  void run() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and nothing left
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      if (!broken_.empty()) {  // after a failure every later collective fails too: the ring is out of step
        task.done->set_exception(std::make_exception_ptr(DistError(broken_)));
        continue;
      }
      const int64_t id = begin_op(task.what);
      try {
        task.fn();
        end_op(id);
        task.done->set_value();
      } catch (const std::exception& e) {
        end_op(id);
        broken_ = std::string(task.what) + " on rank " + std::to_string(rank_) + ": " + e.what();
        task.done->set_exception(std::make_exception_ptr(DistError(broken_)));
      }
    }
  }

  // Reduce-scatter in place over w = world chunks of S elements: chunk rank_ ends with the sum over ranks.
  void ring_reduce_scatter(const torch::Tensor& w, int64_t S) {
    if (world_ == 1 || S == 0) return;
    auto tmp = torch::empty({S}, w.options());
    const size_t bytes = static_cast<size_t>(S) * w.element_size();
    for (int s = 0; s < world_ - 1; ++s) {
      const int send_c = mod(rank_ - s - 1), recv_c = mod(rank_ - s - 2);
      exchange(w.narrow(0, send_c * S, S).data_ptr(), bytes, tmp.data_ptr(), bytes);
      w.narrow(0, recv_c * S, S).add_(tmp);
    }
  }

  // All-gather in place over w: chunk rank_ holds this rank's part; afterwards every chunk is filled.
  void ring_all_gather(const torch::Tensor& w, int64_t S) {
    if (world_ == 1 || S == 0) return;
    const size_t bytes = static_cast<size_t>(S) * w.element_size();
    for (int s = 0; s < world_ - 1; ++s) {
      const int send_c = mod(rank_ - s), recv_c = mod(rank_ - s - 1);
      exchange(w.narrow(0, send_c * S, S).data_ptr(), bytes, w.narrow(0, recv_c * S, S).data_ptr(), bytes);
    }
  }

  int mod(int x) const { return ((x % world_) + world_) % world_; }

  // Sends `ns` bytes to the successor while receiving `nr` bytes from the predecessor.
  void exchange(const void* sbuf, size_t ns, void* rbuf, size_t nr) {
    const char* sp = static_cast<const char*>(sbuf);
    char* rp = static_cast<char*>(rbuf);
    size_t so = 0, ro = 0;
    const int next = mod(rank_ + 1), prev = mod(rank_ - 1);
    while (so < ns || ro < nr) {
      pollfd fds[2];
      int n = 0, si = -1, ri = -1;
      if (so < ns) fds[si = n++] = pollfd{send_fd_, POLLOUT, 0};
      if (ro < nr) fds[ri = n++] = pollfd{recv_fd_, POLLIN, 0};
      const int rc = ::poll(fds, static_cast<nfds_t>(n), 1000);
      if (aborted_) throw DistError("aborted by the watchdog");
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0) sys_fail("poll");
      if (si >= 0 && fds[si].revents) {
        const ssize_t k = ::send(send_fd_, sp + so, ns - so, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k > 0) {
          so += static_cast<size_t>(k);
        } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          sys_fail("send to rank " + std::to_string(next) + " failed (did it exit?)");
        }
      }
      if (ri >= 0 && fds[ri].revents) {
        const ssize_t k = ::recv(recv_fd_, rp + ro, nr - ro, MSG_DONTWAIT);
        if (k > 0) {
          ro += static_cast<size_t>(k);
        } else if (k == 0) {
          throw DistError("rank " + std::to_string(prev) + " closed its connection (it exited or failed)");
        } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          sys_fail("receive from rank " + std::to_string(prev) + " failed");
        }
      }
    }
  }

  void connect_ring(c10d::Store& store) {
    const char* host_env = std::getenv("ABLATE_DIST_HOST");
    const std::string host = host_env && *host_env ? host_env : "127.0.0.1";
    const int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) sys_fail("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
      ::close(lfd);
      throw DistError("ABLATE_DIST_HOST '" + host + "' is not an IPv4 address");
    }
    if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(lfd, 4) != 0) {
      const int e = errno;
      ::close(lfd);
      errno = e;
      sys_fail("cannot listen on " + host);
    }
    socklen_t len = sizeof addr;
    ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
    const std::string me = host + ":" + std::to_string(ntohs(addr.sin_port));
    store.set("ablate/cpu/addr/" + std::to_string(rank_), std::vector<uint8_t>(me.begin(), me.end()));

    try {
      // Connect to the successor.
      const int next = mod(rank_ + 1);
      const auto raw = store.get("ablate/cpu/addr/" + std::to_string(next));  // waits (store timeout)
      const std::string peer(raw.begin(), raw.end());
      const auto colon = peer.rfind(':');
      sockaddr_in pa{};
      pa.sin_family = AF_INET;
      pa.sin_port = htons(static_cast<uint16_t>(std::stoi(peer.substr(colon + 1))));
      ::inet_pton(AF_INET, peer.substr(0, colon).c_str(), &pa.sin_addr);
      send_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (send_fd_ < 0) sys_fail("socket");
      if (::connect(send_fd_, reinterpret_cast<sockaddr*>(&pa), sizeof pa) != 0)
        sys_fail("cannot connect to rank " + std::to_string(next) + " at " + peer);
      const uint32_t hello[2] = {kHelloMagic, static_cast<uint32_t>(rank_)};
      write_all_blocking(send_fd_, hello, sizeof hello);

      // Accept the predecessor (bounded by the timeout).
      pollfd pfd{lfd, POLLIN, 0};
      const int rc = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(opts_.timeout.count(), INT32_MAX)));
      if (rc <= 0) throw DistError("rank " + std::to_string(mod(rank_ - 1)) + " did not connect within the timeout");
      recv_fd_ = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
      if (recv_fd_ < 0) sys_fail("accept");
      uint32_t got[2] = {0, 0};
      read_all_blocking(recv_fd_, got, sizeof got);
      if (got[0] != kHelloMagic || static_cast<int>(got[1]) != mod(rank_ - 1))
        throw DistError("unexpected connection on the ring port (from rank " + std::to_string(got[1]) + ")");
    } catch (...) {
      ::close(lfd);
      throw;
    }
    ::close(lfd);
    for (int fd : {send_fd_, recv_fd_}) {
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    }
  }

  struct Task {
    const char* what = "";
    std::function<void()> fn;
    std::shared_ptr<std::promise<void>> done;
  };

  int send_fd_ = -1, recv_fd_ = -1;
  std::atomic<bool> aborted_{false};
  std::string broken_;  // touched by the communication thread only
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<Communicator> make_cpu_communicator(c10::intrusive_ptr<c10d::Store> store, int rank, int world,
                                                    Options opts) {
  return std::make_unique<SocketCommunicator>(std::move(store), rank, world, std::move(opts));
}

#if !ABLATE_WITH_CUDA
std::unique_ptr<Communicator> make_nccl_communicator(c10::intrusive_ptr<c10d::Store>, int, int, int, Options) {
  throw std::invalid_argument("the nccl backend needs an ablate-train built with ABLATE_WITH_CUDA=ON");
}
#endif

}  // namespace ablate::dist
