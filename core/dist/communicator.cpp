// Communicator base: the watchdog, barrier, rendezvous store and construction from the environment.
#include "core/dist/communicator.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <atomic>
#include <condition_variable>
#include <future>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>

namespace ablate::dist {

namespace {
std::atomic<bool> g_hang_exit{false};
}  // namespace

bool hang_exit_in_progress() { return g_hang_exit.load(); }

void wait_if_hang_exit() {
  while (g_hang_exit.load()) std::this_thread::sleep_for(std::chrono::seconds(1));
}

struct Communicator::Watchdog {
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  int64_t next_id = 0;
  std::map<int64_t, std::pair<std::chrono::steady_clock::time_point, const char*>> pending;  // id -> (start, what)
  std::thread thread;
};

Communicator::Communicator(int rank, int world, Options opts)
    : rank_(rank), world_(world), opts_(std::move(opts)), wd_(std::make_unique<Watchdog>()) {
  if (world < 1 || rank < 0 || rank >= world)
    throw std::invalid_argument("communicator: rank " + std::to_string(rank) + " of world " + std::to_string(world));
}

Communicator::~Communicator() { stop_watchdog(); }

int64_t Communicator::begin_op(const char* what) {
  std::lock_guard<std::mutex> lock(wd_->mu);
  const int64_t id = wd_->next_id++;
  wd_->pending.emplace(id, std::make_pair(std::chrono::steady_clock::now(), what));
  return id;
}

void Communicator::end_op(int64_t id) {
  std::lock_guard<std::mutex> lock(wd_->mu);
  wd_->pending.erase(id);
}

void Communicator::start_watchdog() {
  const auto period = std::min<std::chrono::milliseconds>(std::chrono::milliseconds(100), opts_.timeout / 4 + std::chrono::milliseconds(1));
  wd_->thread = std::thread([this, period] {
    std::unique_lock<std::mutex> lock(wd_->mu);
    while (!wd_->stop) {
      wd_->cv.wait_for(lock, period);
      if (wd_->stop) break;
      lock.unlock();
      poll_pending();
      lock.lock();
      if (wd_->pending.empty()) continue;
      const auto& [id, info] = *wd_->pending.begin();  // ids grow with issue order: the oldest comes first
      const auto age = std::chrono::steady_clock::now() - info.first;
      if (age < opts_.timeout) continue;
      const std::string msg =
          "collective " + std::string(info.second) + " #" + std::to_string(id) + " on rank " + std::to_string(rank_) +
          " of " + std::to_string(world_) + " (" + backend() + ") made no progress for " +
          std::to_string(std::chrono::duration_cast<std::chrono::seconds>(age).count()) +
          " s (--dist_timeout): a peer is stuck or gone; aborting";
      wd_->stop = true;
      lock.unlock();
      g_hang_exit = true;  // from here on, error paths woken by the abort wait for the exit below
      if (opts_.on_hang) opts_.on_hang(msg);
      std::cerr << "ablate-train: " << msg << std::endl;
      // Abort (peers see the connection close), but never wait on it for long: NCCL's abort can block behind a
      // launch stuck in another thread. The exit ends every connection anyway.
      auto aborted = std::make_shared<std::promise<void>>();
      std::thread([this, aborted] {
        abort();
        aborted->set_value();
      }).detach();
      if (aborted->get_future().wait_for(std::chrono::seconds(5)) != std::future_status::ready)
        std::cerr << "ablate-train: the communicator's abort did not return within 5 s; exiting anyway" << std::endl;
      std::_Exit(kExitHang);
    }
  });
}

void Communicator::stop_watchdog() {
  if (!wd_ || !wd_->thread.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(wd_->mu);
    wd_->stop = true;
  }
  wd_->cv.notify_all();
  if (wd_->thread.get_id() == std::this_thread::get_id()) {
    wd_->thread.detach();
  } else {
    wd_->thread.join();
  }
}

void Communicator::barrier() {
  auto t = torch::zeros({1}, torch::TensorOptions().dtype(torch::kFloat).device(device()));
  all_reduce(t, ReduceOp::kSum);
  (void)t.item<float>();  // the host waits for the collective, on CUDA too
}

double Communicator::all_reduce_scalar(double v, ReduceOp op) {
  auto t = torch::full({1}, v, torch::TensorOptions().dtype(torch::kDouble).device(device()));
  all_reduce(t, op);
  return t.item<double>();
}

c10::intrusive_ptr<c10d::Store> make_store(int rank, int world, std::chrono::milliseconds timeout) {
  if (const char* f = std::getenv("ABLATE_DIST_FILE_STORE"); f && *f) {
    auto s = c10::make_intrusive<c10d::FileStore>(f, world);
    s->setTimeout(timeout);
    return s;
  }
  const EnvLayout env = env_layout();
  if (env.master_port <= 0 || env.master_port > 65535)
    throw std::invalid_argument("distributed run: MASTER_PORT is not set (or not a port); ablate-train --nproc N sets it");
  c10d::TCPStoreOptions o;
  o.port = static_cast<uint16_t>(env.master_port);
  o.isServer = rank == 0;
  o.numWorkers = static_cast<size_t>(world);
  o.waitWorkers = true;
  o.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
}

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < 0 || x > (1 << 30))
    throw std::invalid_argument(std::string("environment variable ") + name + "='" + v + "' is not a number");
  return static_cast<int>(x);
}

EnvLayout env_layout() {
  EnvLayout e;
  e.world = env_int("WORLD_SIZE", 1);
  e.rank = env_int("RANK", 0);
  e.local_rank = env_int("LOCAL_RANK", e.rank);
  e.master_port = env_int("MASTER_PORT", 0);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  if (e.world < 1 || e.rank >= e.world)
    throw std::invalid_argument("environment: RANK " + std::to_string(e.rank) + " is not below WORLD_SIZE " +
                                std::to_string(e.world));
  return e;
}

std::unique_ptr<Communicator> init_from_env(const std::string& backend, Options opts) {
  const EnvLayout env = env_layout();
  auto store = make_store(env.rank, env.world, opts.timeout);
  if (backend == "cpu") return make_cpu_communicator(store, env.rank, env.world, std::move(opts));
  if (backend == "nccl") return make_nccl_communicator(store, env.rank, env.world, env.local_rank, std::move(opts));
  throw std::invalid_argument("unknown communicator backend '" + backend + "' (cpu | nccl)");
}

}  // namespace ablate::dist
