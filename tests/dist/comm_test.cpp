// The CPU communicator (core/dist) against local computation, with 2 and 3 real processes: the test binary starts
// copies of itself (ABLATE_COMM_CHILD=<mode>) that rendezvous through a TCPStore like the ranks of a run, and
// each child checks every collective against the result computed from all ranks' (regenerated) inputs.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>

#include "core/dist/communicator.h"
#include "core/dist/data_parallel.h"
#include "core/dist/launcher.h"

using namespace ablate::dist;
namespace fs = std::filesystem;

namespace {

// Built twice: dist_comm_test (cpu backend, label unit) and, in CUDA builds, dist_comm_gpu_test (nccl, label gpu).
#ifndef ABLATE_COMM_BACKEND
#define ABLATE_COMM_BACKEND "cpu"
#endif
const std::string kBackend = ABLATE_COMM_BACKEND;
torch::Device g_dev = torch::kCPU;  // the communicator's device, set in child_main

// Rank r's input for test tensor `tag`: regenerable on every rank.
torch::Tensor input(int r, int tag, int64_t n, torch::ScalarType dt = torch::kFloat) {
  auto g = at::detail::createCPUGenerator(1000 * tag + r);
  auto x = at::randn({n}, g, torch::TensorOptions().dtype(torch::kDouble));
  return (dt == torch::kLong ? (x * 1e6).to(torch::kLong) : x.to(dt)).to(g_dev);
}

#define CHILD_CHECK(cond, msg)                                                   \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::cerr << "rank " << rank << ": check failed: " << msg << std::endl;    \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

// fp32 sums of at most 3 terms of |x| < ~5: the ring and torch's local sum differ in association only, so a few
// ulps of the largest partial sum. 1e-5 absolute is ~40 ulps at 5 and still far below any wrong-chunk error.
bool close(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() == torch::kLong) return torch::equal(a, b);
  return torch::allclose(a.to(torch::kDouble), b.to(torch::kDouble), 1e-6, 1e-5);
}

int child_collectives(Communicator& c) {
  const int rank = c.rank(), N = c.world_size();
  for (auto dt : {torch::kFloat, torch::kDouble, torch::kLong}) {
    for (int64_t n : {1, 7, 1000, 1 << 18}) {  // 1<<18 floats = 1 MiB: larger than the socket buffers
      const int tag = static_cast<int>(n % 997) + 10 * static_cast<int>(dt);
      // all_reduce (sum) against the local sum; every rank must hold identical bits afterwards.
      auto x = input(rank, tag, n, dt);
      auto want = input(0, tag, n, dt).clone();
      for (int r = 1; r < N; ++r) want += input(r, tag, n, dt);
      c.all_reduce(x, ReduceOp::kSum);
      CHILD_CHECK(close(x, want), "all_reduce sum n=" << n << " dtype " << dt);
      auto all = torch::empty({N * n}, x.options());
      c.all_gather(x, all);
      for (int r = 0; r < N; ++r) CHILD_CHECK(torch::equal(all.narrow(0, r * n, n), x), "all_reduce results differ across ranks");
      // Reproducible: the same inputs give the same bits.
      auto x2 = input(rank, tag, n, dt);
      c.all_reduce(x2, ReduceOp::kSum);
      CHILD_CHECK(torch::equal(x, x2), "all_reduce is not deterministic");
      if (dt != torch::kLong) {
        auto a = input(rank, tag, n, dt);
        c.all_reduce(a, ReduceOp::kAvg);
        CHILD_CHECK(close(a, want / N), "all_reduce avg n=" << n);
      }
      // reduce_scatter: rank r gets the sum of every rank's r-th slice.
      auto in = input(rank, tag + 1, N * n, dt);
      auto out = torch::empty({n}, in.options());
      c.reduce_scatter(in, out, ReduceOp::kSum);
      auto want_rs = input(0, tag + 1, N * n, dt).narrow(0, rank * n, n).clone();
      for (int r = 1; r < N; ++r) want_rs += input(r, tag + 1, N * n, dt).narrow(0, rank * n, n);
      CHILD_CHECK(close(out, want_rs), "reduce_scatter n=" << n);
      CHILD_CHECK(torch::equal(in, input(rank, tag + 1, N * n, dt)), "reduce_scatter modified its input");
      // all_gather: slice r is rank r's input.
      auto mine = input(rank, tag + 2, n, dt);
      auto gathered = torch::empty({N * n}, mine.options());
      c.all_gather(mine, gathered);
      for (int r = 0; r < N; ++r)
        CHILD_CHECK(torch::equal(gathered.narrow(0, r * n, n), input(r, tag + 2, n, dt)), "all_gather slice " << r);
      // broadcast from every root.
      for (int root = 0; root < N; ++root) {
        auto b = input(rank, tag + 3, n, dt);
        c.broadcast(b, root);
        CHILD_CHECK(torch::equal(b, input(root, tag + 3, n, dt)), "broadcast from " << root);
      }
    }
  }
  // Several asynchronous collectives in flight, waited in reverse order.
  std::vector<torch::Tensor> xs;
  std::vector<WorkPtr> ws;
  for (int k = 0; k < 5; ++k) {
    xs.push_back(input(rank, 500 + k, 4096 + k));
    ws.push_back(c.all_reduce_async(xs.back(), ReduceOp::kAvg));
  }
  for (int k = 4; k >= 0; --k) {
    ws[k]->wait();
    auto want = input(0, 500 + k, 4096 + k);
    for (int r = 1; r < N; ++r) want += input(r, 500 + k, 4096 + k);
    CHILD_CHECK(close(xs[k], want / N), "async all_reduce " << k);
  }
  c.barrier();
  // ZeRO helpers: ownership covers every parameter once and the sharded reduce + gather equals the average.
  const auto owners = ZeroSharding::assign_owners({100, 5000, 7, 4096, 4096, 300}, N);
  std::vector<int64_t> load(N, 0);
  for (size_t i = 0; i < owners.size(); ++i) load[owners[i]] += std::vector<int64_t>{100, 5000, 7, 4096, 4096, 300}[i];
  // Greedy largest-first: no rank exceeds the mean load by more than the largest tensor.
  CHILD_CHECK(*std::max_element(load.begin(), load.end()) <= (100 + 5000 + 7 + 4096 + 4096 + 300) / N + 5000,
              "unbalanced owners");
  NamedTensors ps;
  std::vector<int64_t> shapes = {64, 33, 1, 1000};
  for (size_t i = 0; i < shapes.size(); ++i) {
    auto p = input(0, 700 + static_cast<int>(i), shapes[i]).requires_grad_(true);  // same weights on all ranks
    p.mutable_grad() = input(rank, 800 + static_cast<int>(i), shapes[i]);
    ps.emplace_back("p" + std::to_string(i), p);
  }
  ZeroSharding z(c, ps);
  z.reduce_gradients();
  for (size_t i = 0; i < ps.size(); ++i) {
    const auto& g = ps[i].second.grad();
    if (z.owner(i) != rank) {
      CHILD_CHECK(!g.defined(), "non-owner keeps a gradient");
      continue;
    }
    auto want = input(0, 800 + static_cast<int>(i), shapes[i]).clone();
    for (int r = 1; r < N; ++r) want += input(r, 800 + static_cast<int>(i), shapes[i]);
    CHILD_CHECK(close(g, want / N), "sharded gradient " << i);
  }
  {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < ps.size(); ++i)
      if (z.owner(i) == rank) ps[i].second.add_(1000.0 * (z.owner(i) + 1));
  }
  z.gather_parameters();
  for (size_t i = 0; i < ps.size(); ++i)
    CHILD_CHECK(torch::equal(ps[i].second.detach(), input(0, 700 + static_cast<int>(i), shapes[i]) + 1000.0 * (z.owner(i) + 1)),
                "gathered parameter " << i);

  // GradientBuckets: two micro-batches (the second armed), small buckets so that several are started from the
  // backward hooks; the gradients must be the rank average of each rank's accumulated gradients, computed here.
  torch::manual_seed(5);
  torch::nn::Linear l1(16, 32), l2(32, 4);
  l1->to(g_dev);
  l2->to(g_dev);
  std::vector<torch::Tensor> params = l1->parameters();
  for (const auto& p : l2->parameters()) params.push_back(p);
  auto loss_of = [&](int r, int tag) {
    auto x = input(r, tag, 8 * 16).view({8, 16});
    return l2(torch::tanh(l1(x))).pow(2).mean();
  };
  std::vector<torch::Tensor> want(params.size());
  for (int r = 0; r < N; ++r) {
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    loss_of(r, 900).backward();
    loss_of(r, 901).backward();
    for (size_t i = 0; i < params.size(); ++i) want[i] = r == 0 ? params[i].grad().clone() : want[i] + params[i].grad();
  }
  GradientBuckets buckets(c, params, /*bucket_bytes=*/600);
  CHILD_CHECK(buckets.num_buckets() > 2, "expected several buckets, got " << buckets.num_buckets());
  for (int round = 0; round < 2; ++round) {  // twice: the state resets between steps
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    loss_of(rank, 900).backward();
    buckets.arm();
    loss_of(rank, 901).backward();
    CHILD_CHECK(buckets.launched_in_backward() == buckets.num_buckets(), "only " << buckets.launched_in_backward()
                << " of " << buckets.num_buckets() << " buckets started during backward");
    buckets.finish();
    for (size_t i = 0; i < params.size(); ++i) CHILD_CHECK(close(params[i].grad(), want[i] / N), "bucketed gradient " << i);
  }
  return 0;
}

int child_main(const std::string& mode) {
  const EnvLayout env = env_layout();
  Options o;
  o.timeout = std::chrono::milliseconds(mode == "hang" ? 1500 : 30000);
  if (const char* f = std::getenv("ABLATE_COMM_HANG_FILE"))
    o.on_hang = [path = std::string(f) + "." + std::to_string(env.rank)](const std::string& msg) {
      std::ofstream(path) << msg << "\n";
    };
  auto c = init_from_env(kBackend, o);
  g_dev = c->device();
  const int rank = c->rank();
  if (mode == "collectives") return child_collectives(*c);
  if (mode == "peer_exit") {  // rank 1 leaves; rank 0's collective must fail (DistError), not hang
    if (rank == 1) std::_Exit(0);
    auto x = torch::ones({1 << 16}, torch::TensorOptions().device(g_dev));
    try {
      c->all_reduce(x, ReduceOp::kSum);
    } catch (const DistError& e) {
      std::cerr << "rank 0 got the expected error: " << e.what() << std::endl;
      return 42;
    }
    return 1;
  }
  if (mode == "hang") {  // rank 1 never joins the collective: rank 0's watchdog must end it with kExitHang
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(4));
      std::_Exit(0);
    }
    auto x = torch::ones({4}, torch::TensorOptions().device(g_dev));
    c->all_reduce(x, ReduceOp::kSum);
    try {
      (void)x.sum().item<float>();  // NCCL: the host waits here until the watchdog ends the process
    } catch (...) {
    }
    wait_if_hang_exit();
    return 1;  // not reached: the watchdog exits with kExitHang
  }
  return 2;
}

// Starts `world` children in `mode`; returns their exit codes (-signal when killed). Kills everything after `limit`.
std::vector<int> run_children(int world, const std::string& mode, std::chrono::seconds limit,
                              const std::string& hang_file = "") {
  const int port = free_local_port();
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::setenv("ABLATE_COMM_CHILD", mode.c_str(), 1);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      if (!hang_file.empty()) ::setenv("ABLATE_COMM_HANG_FILE", hang_file.c_str(), 1);
      char* argv[] = {const_cast<char*>("comm_test"), nullptr};
      ::execv("/proc/self/exe", argv);
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<int> codes(world, -999);
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int left = world;
  while (left > 0) {
    for (int r = 0; r < world; ++r) {
      if (codes[r] != -999) continue;
      int st = 0;
      if (::waitpid(pids[r], &st, WNOHANG) == pids[r]) {
        codes[r] = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
        --left;
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < world; ++r)
        if (codes[r] == -999) ::kill(pids[r], SIGKILL);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return codes;
}

// The nccl build needs one GPU per rank.
#define NEED_DEVICES(n)                                                                                    \
  if (kBackend == "nccl" && static_cast<int>(torch::cuda::device_count()) < (n))                          \
  GTEST_SKIP() << "needs " << (n) << " GPUs for the nccl backend, found " << torch::cuda::device_count()

TEST(CpuCommunicator, CollectivesTwoRanks) {
  NEED_DEVICES(2);
  EXPECT_EQ(run_children(2, "collectives", std::chrono::seconds(60)), std::vector<int>({0, 0}));
}

TEST(CpuCommunicator, CollectivesThreeRanks) {
  NEED_DEVICES(3);
  EXPECT_EQ(run_children(3, "collectives", std::chrono::seconds(60)), std::vector<int>({0, 0, 0}));
}

TEST(CpuCommunicator, PeerExitFailsTheCollective) {
  if (kBackend == "nccl") GTEST_SKIP() << "a vanished NCCL peer is a hang (see WatchdogEndsAHungCollective)";
  const auto codes = run_children(2, "peer_exit", std::chrono::seconds(30));
  EXPECT_EQ(codes[0], 42);  // DistError, well before the 30 s timeout
  EXPECT_EQ(codes[1], 0);
}

TEST(CpuCommunicator, WatchdogEndsAHungCollective) {
  NEED_DEVICES(2);
  const auto file = fs::temp_directory_path() / ("ablate-comm-hang-" + std::to_string(::getpid()));
  const auto t0 = std::chrono::steady_clock::now();
  const auto codes = run_children(2, "hang", std::chrono::seconds(15), file.string());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(codes[0], kExitHang);
  std::ifstream f(file.string() + ".0");
  std::string msg;
  std::getline(f, msg);
  EXPECT_NE(msg.find("made no progress"), std::string::npos) << msg;
  // Rank 1 (asleep, not in a collective) sees rank 0 gone only when it wakes; it never reports a hang itself.
  EXPECT_FALSE(fs::exists(file.string() + ".1"));
  EXPECT_LT(secs, 12.0);
  fs::remove(file.string() + ".0");
}

TEST(ZeroSharding, OwnersBalancedAndDeterministic) {
  const std::vector<int64_t> sizes = {10, 40, 30, 20, 5, 5};
  const auto o = ZeroSharding::assign_owners(sizes, 2);
  EXPECT_EQ(o, ZeroSharding::assign_owners(sizes, 2));
  int64_t l0 = 0, l1 = 0;
  for (size_t i = 0; i < sizes.size(); ++i) (o[i] == 0 ? l0 : l1) += sizes[i];
  EXPECT_EQ(l0, 55);  // 40, 10, 5 (greedy: 40->0, 30->1, 20->1, 10->0, 5->0, 5->1 gives 55/55)
  EXPECT_EQ(l1, 55);
  EXPECT_EQ(ZeroSharding::assign_owners(sizes, 1), std::vector<int>(6, 0));
}

}  // namespace

int main(int argc, char** argv) {
  if (const char* mode = std::getenv("ABLATE_COMM_CHILD")) {
    try {
      return child_main(mode);
    } catch (const std::exception& e) {
      wait_if_hang_exit();
      std::cerr << "child (" << mode << ") failed: " << e.what() << std::endl;
      return 3;
    }
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
