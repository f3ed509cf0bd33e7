#include <gtest/gtest.h>

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
}

}  // namespace
}  // namespace ablate::worker
