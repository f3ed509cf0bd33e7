// The trainer's side of the worker lease (core/lease_watch.h): the file format, the watch thread, and the real
// ablate-train stopping itself (exit 75, no checkpoint) when the deadline its worker wrote passes unrenewed.
#include "core/lease_watch.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/prepare_data.h"
#include "core/train.h"
#include "tests/scratch_dir.h"

namespace ablate {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

fs::path temp_dir(const std::string& tag) { return testing::scratch_dir("ablate-lease-watch-test", tag); }

// The worker's side of the contract (docs/contracts.md §2), written here as the worker writes it.
void write_lease_deadline(const std::string& path, Clock::time_point deadline) {
  {
    std::ofstream f(path + ".tmp", std::ios::trunc);
    f << "monotonic_deadline_ns " << std::chrono::nanoseconds(deadline.time_since_epoch()).count() << "\n";
  }
  ASSERT_EQ(std::rename((path + ".tmp").c_str(), path.c_str()), 0);
}

TEST(LeaseFile, RoundTripAndBadContent) {
  const auto dir = temp_dir("file");
  const std::string p = (dir / "lease").string();
  EXPECT_FALSE(read_lease_deadline(p).has_value()) << "missing file";
  const auto d = Clock::now() + 1234ms;
  write_lease_deadline(p, d);
  ASSERT_TRUE(read_lease_deadline(p).has_value());
  EXPECT_EQ(read_lease_deadline(p)->time_since_epoch(), d.time_since_epoch());
  std::ofstream(p) << "deadline 12\n";
  EXPECT_FALSE(read_lease_deadline(p).has_value()) << "wrong key";
  std::ofstream(p) << "monotonic_deadline_ns x\n";
  EXPECT_FALSE(read_lease_deadline(p).has_value()) << "not a number";
}

TEST(LeaseWatch, FiresOnlyAfterTheDeadlineAndFollowsRenewals) {
  const auto dir = temp_dir("watch");
  const std::string p = (dir / "lease").string();
  std::atomic<int> fired{0};
  write_lease_deadline(p, Clock::now() + 400ms);
  {
    LeaseWatch w(p, [&] { ++fired; }, 20ms);
    for (int i = 0; i < 10; ++i) {  // renewed every 100 ms for a second: never expires
      std::this_thread::sleep_for(100ms);
      write_lease_deadline(p, Clock::now() + 400ms);
    }
    EXPECT_EQ(fired.load(), 0);
    const auto stopped = Clock::now();
    while (fired.load() == 0 && Clock::now() - stopped < 5s) std::this_thread::sleep_for(10ms);
    EXPECT_EQ(fired.load(), 1);
    EXPECT_GE(Clock::now() - stopped, 350ms) << "fired before the last deadline";
  }
  // A missing file is no expiry.
  fired = 0;
  { LeaseWatch w((dir / "absent").string(), [&] { ++fired; }, 10ms); std::this_thread::sleep_for(100ms); }
  EXPECT_EQ(fired.load(), 0);
}

// The real binary: a deadline 3 s ahead that nobody renews stops a long run with exit 75 and no checkpoint.
TEST(LeaseWatch, AblateTrainStopsWhenTheWorkersDeadlinePasses) {
  const char* corpus = "/usr/share/games/fortunes";
  if (!fs::is_directory(corpus)) GTEST_SKIP() << corpus << " missing (Debian package fortunes)";
  const auto dir = temp_dir("train");
  prepare_data({corpus}, (dir / "data").string(), 0.05);
  const std::string lease = (dir / "lease").string();
  write_lease_deadline(lease, Clock::now() + 3s);
  const std::string cmd = std::string(ABLATE_TRAIN_BIN) + " --model_size tiny --context_length 32 --batch_size 2" +
                          " --num_train_steps 1000000 --log_interval 1000 --eval_interval 1000000 --save_interval 5" +
                          " --device cpu --data_dir " + (dir / "data").string() + " --output_dir " +
                          (dir / "runs").string() + " --run_name r --lease_file " + lease + " > " +
                          (dir / "log").string() + " 2>&1";
  const auto t0 = Clock::now();
  const int rc = std::system(cmd.c_str());
  const auto took = Clock::now() - t0;
  ASSERT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), kExitLeaseExpired);
  EXPECT_LT(took, 60s);
  std::ifstream log(dir / "log");
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("lease deadline"), std::string::npos) << text.substr(0, 2000);
}

}  // namespace
}  // namespace ablate
