#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "worker/argv.h"

namespace ablate::worker {
namespace {

TrainCommandInput Input() {
  TrainCommandInput in;
  in.train_bin = "/bin/ablate-train";
  in.params = {{"model_size", "tiny"}, {"context_length", "128"}, {"dataset", "fortunes"}, {"optimizer_type", "adamw"}};
  in.job_id = 42;
  in.attempt = 2;
  in.data_root = "/data";
  in.work_dir = "/w";
  return in;
}

TEST(BuildTrainCommand, ParamsThenWorkerFlags) {
  TrainCommand cmd;
  std::string err;
  ASSERT_TRUE(BuildTrainCommand(Input(), &cmd, &err)) << err;
  std::vector<std::string> want = {"/bin/ablate-train", "--context_length", "128", "--model_size", "tiny",
                                   "--optimizer_type", "adamw", "--data_dir", "/data/fortunes", "--output_dir",
                                   "/w/job-42", "--run_name", "attempt-2", "--events_fd", "3"};
  EXPECT_EQ(cmd.argv, want);
  EXPECT_EQ(cmd.output_dir, "/w/job-42");
  EXPECT_EQ(cmd.log_path, "/w/job-42/attempt-2.log");
}

TEST(BuildTrainCommand, DefaultDatasetAndResume) {
  auto in = Input();
  in.params.erase("dataset");
  in.resume_checkpoint = "/w/job-42/checkpoint-100";
  TrainCommand cmd;
  std::string err;
  ASSERT_TRUE(BuildTrainCommand(in, &cmd, &err)) << err;
  ASSERT_GE(cmd.argv.size(), 2u);
  EXPECT_EQ(cmd.argv[cmd.argv.size() - 2], "--resume_from");
  EXPECT_EQ(cmd.argv.back(), "/w/job-42/checkpoint-100");
  auto it = std::find(cmd.argv.begin(), cmd.argv.end(), "--data_dir");
  ASSERT_NE(it, cmd.argv.end());
  EXPECT_EQ(*(it + 1), "/data/fortunes");
}

TEST(BuildTrainCommand, RejectsUnsafeParams) {
  TrainCommand cmd;
  std::string err;
  auto in = Input();
  in.params["bad-name"] = "1";
  EXPECT_FALSE(BuildTrainCommand(in, &cmd, &err));
  EXPECT_NE(err.find("bad-name"), std::string::npos);
  in = Input();
  in.params["dataset"] = "../etc";
  EXPECT_FALSE(BuildTrainCommand(in, &cmd, &err));
  in = Input();
  in.params["output_dir"] = "/tmp/elsewhere";
  EXPECT_FALSE(BuildTrainCommand(in, &cmd, &err));
  EXPECT_NE(err.find("output_dir"), std::string::npos);
  in = Input();
  in.params["lease_file"] = "/dev/null";  // the worker's lease deadline: a job may not point elsewhere
  EXPECT_FALSE(BuildTrainCommand(in, &cmd, &err));
  EXPECT_NE(err.find("lease_file"), std::string::npos);
}

TEST(BuildTrainCommand, RunNameNamesTheDirectoryAndTheLog) {
  auto in = Input();
  in.run_name = "attempt-2-0a1b2c3d";
  TrainCommand cmd;
  std::string err;
  ASSERT_TRUE(BuildTrainCommand(in, &cmd, &err)) << err;
  auto it = std::find(cmd.argv.begin(), cmd.argv.end(), "--run_name");
  ASSERT_NE(it, cmd.argv.end());
  EXPECT_EQ(*(it + 1), "attempt-2-0a1b2c3d");
  EXPECT_EQ(cmd.log_path, "/w/job-42/attempt-2-0a1b2c3d.log");
}

class ClaimRunNameTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (std::filesystem::temp_directory_path() / ("claim-run-" + std::to_string(::getpid()))).string();
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(ClaimRunNameTest, FirstGrantGetsThePlainName) {
  std::string err;
  EXPECT_EQ(ClaimRunName(dir_, 3, "nonce-a", &err), "attempt-3") << err;
  EXPECT_TRUE(std::filesystem::is_directory(dir_ + "/attempt-3"));
  // The marker names the grant by a digest, never by the nonce itself.
  std::ifstream in(dir_ + "/attempt-3/.lease");
  std::string owner;
  in >> owner;
  EXPECT_EQ(owner.size(), 8u);
  EXPECT_EQ(owner.find("nonce"), std::string::npos);
  // The same grant again (a gang's other rank on the shared work dir): the same directory.
  EXPECT_EQ(ClaimRunName(dir_, 3, "nonce-a", &err), "attempt-3") << err;
  // Another attempt number: its own plain name.
  EXPECT_EQ(ClaimRunName(dir_, 4, "nonce-b", &err), "attempt-4") << err;
}

// F16: after a failover the same attempt number is granted again with a new nonce while the old holder's trainer
// may still write (and prune) in attempt-<n>; the new grant must not share that directory.
TEST_F(ClaimRunNameTest, ReissuedAttemptNumberGetsItsOwnDirectory) {
  std::string err;
  ASSERT_EQ(ClaimRunName(dir_, 1, "old-holder", &err), "attempt-1") << err;
  std::string again = ClaimRunName(dir_, 1, "new-holder", &err);
  ASSERT_FALSE(again.empty()) << err;
  EXPECT_NE(again, "attempt-1");
  EXPECT_EQ(again.rfind("attempt-1-", 0), 0u) << again;
  EXPECT_EQ(again.size(), std::string("attempt-1-").size() + 8);
  EXPECT_TRUE(std::filesystem::is_directory(dir_ + "/" + again));
  // Stable for that grant, and the old holder keeps its own.
  EXPECT_EQ(ClaimRunName(dir_, 1, "new-holder", &err), again);
  EXPECT_EQ(ClaimRunName(dir_, 1, "old-holder", &err), "attempt-1");
  // A third grant of the same number: yet another directory.
  std::string third = ClaimRunName(dir_, 1, "third-holder", &err);
  EXPECT_NE(third, again);
  EXPECT_NE(third, "attempt-1");
}

// Ranks of one gang claim at the same moment: all agree on one name.
TEST_F(ClaimRunNameTest, ConcurrentClaimsOfOneGrantAgree) {
  std::vector<std::string> got(8);
  std::vector<std::thread> ts;
  for (size_t i = 0; i < got.size(); ++i) {
    ts.emplace_back([&, i] {
      std::string err;
      got[i] = ClaimRunName(dir_, 2, "gang-nonce", &err);
    });
  }
  for (auto& t : ts) t.join();
  for (const auto& g : got) EXPECT_EQ(g, "attempt-2");
}

TEST_F(ClaimRunNameTest, UnwritableDirectoryIsAnError) {
  std::string err;
  EXPECT_EQ(ClaimRunName("/proc/no-such-dir/job-1", 1, "n", &err), "");
  EXPECT_FALSE(err.empty());
}

}  // namespace
}  // namespace ablate::worker
