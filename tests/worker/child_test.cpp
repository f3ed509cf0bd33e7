// A real child process: a shell script plays ablate-train, writing events to fd 3 and exiting with a given code.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "worker/child.h"
#include "worker/events.h"
#include "worker/outcome.h"
#include "tests/temp_dir.h"

namespace ablate::worker {
namespace {

namespace fs = std::filesystem;

class ChildTest : public ::testing::Test {
 protected:
  test_util::TempDir tmp_{"ablate-child-test"};
  void SetUp() override {
    dir_ = tmp_.path();
  }

  std::string Script(const std::string& body) {
    std::string path = dir_ + "/fake-train.sh";
    std::ofstream(path) << "#!/bin/sh\n" << body;
    chmod(path.c_str(), 0755);
    return path;
  }

  struct Result {
    std::vector<Event> events;
    EventStats stats;
    ExitStatus status;
  };
  Result Run(const std::string& script, std::vector<std::string> args = {}) {
    std::vector<std::string> argv = {script};
    argv.insert(argv.end(), args.begin(), args.end());
    std::string err;
    auto child = ChildProcess::Spawn({argv, dir_ + "/attempt-1.log", 3}, &err);
    EXPECT_NE(child, nullptr) << err;
    Result r;
    if (!child) return r;
    r.stats = PumpEvents(child->events_fd(), [&](const Event& e) { r.events.push_back(e); });
    r.status = child->Wait();
    return r;
  }

  std::string dir_;
};

TEST_F(ChildTest, EventsOnFd3AndSuccess) {
  auto r = Run(Script(
      "echo 'to the log'\n"
      "echo '{\"event\":\"started\",\"total_steps\":2,\"params\":10}' >&3\n"
      "echo '{\"event\":\"metrics\",\"step\":1,\"values\":{\"train/loss\":3.5}}' >&3\n"
      "echo 'this line is not json' >&3\n"
      "echo '{\"event\":\"checkpoint\",\"step\":2,\"path\":\"/x/checkpoint-2\"}' >&3\n"
      "echo '{\"event\":\"finished\",\"status\":\"succeeded\"}' >&3\n"
      "exit 0\n"));
  EXPECT_EQ(r.stats.events, 4);
  EXPECT_EQ(r.stats.malformed, 1);
  ASSERT_EQ(r.events.size(), 4u);
  EXPECT_DOUBLE_EQ(std::get<MetricsEvent>(r.events[1]).values.at(0).second, 3.5);
  EXPECT_EQ(std::get<CheckpointEvent>(r.events[2]).path, "/x/checkpoint-2");
  ASSERT_TRUE(r.status.exited);
  EXPECT_EQ(MapOutcome(r.status, std::get<FinishedEvent>(r.events[3])).outcome, v1::OUTCOME_SUCCEEDED);
  std::ifstream log(dir_ + "/attempt-1.log");
  std::string line;
  std::getline(log, line);
  EXPECT_EQ(line, "to the log");  // stdout went to the log, not to the events pipe
}

TEST_F(ChildTest, ExitCodesMapToFailureClasses) {
  std::string script = Script(
      "echo '{\"event\":\"finished\",\"status\":\"failed\",\"failure_class\":\"x\",\"message\":\"code '$1'\"}' >&3\n"
      "exit $1\n");
  struct Case {
    int code;
    v1::FailureClass fc;
  } cases[] = {{2, v1::FAILURE_CLASS_INVALID_CONFIG}, {3, v1::FAILURE_CLASS_DIVERGED}, {4, v1::FAILURE_CLASS_OOM},
               {9, v1::FAILURE_CLASS_CRASH}};
  for (const auto& c : cases) {
    auto r = Run(script, {std::to_string(c.code)});
    ASSERT_EQ(r.events.size(), 1u);
    JobResult jr = MapOutcome(r.status, std::get<FinishedEvent>(r.events[0]));
    EXPECT_EQ(jr.outcome, v1::OUTCOME_FAILED);
    EXPECT_EQ(jr.failure_class, c.fc) << c.code;
    EXPECT_EQ(jr.exit_code, c.code);
    EXPECT_EQ(jr.message, "code " + std::to_string(c.code));
  }
}

TEST_F(ChildTest, KilledBySignalIsCrash) {
  auto r = Run(Script("kill -SEGV $$\n"));
  EXPECT_FALSE(r.status.exited);
  EXPECT_EQ(r.status.signal, SIGSEGV);
  EXPECT_EQ(MapOutcome(r.status, std::nullopt).failure_class, v1::FAILURE_CLASS_CRASH);
}

TEST_F(ChildTest, StopKillsTheWholeProcessGroup) {
  // The script ignores SIGTERM and has a grandchild: Stop must still end both (SIGKILL to the group).
  std::string script = Script(
      "trap '' TERM\n"
      "sleep 300 &\n"
      "echo $! > " + dir_ + "/grandchild.pid\n"
      "echo '{\"event\":\"started\",\"total_steps\":1}' >&3\n"
      "wait\n");
  std::string err;
  auto child = ChildProcess::Spawn({{script}, dir_ + "/attempt-1.log", 3}, &err);
  ASSERT_NE(child, nullptr) << err;
  std::vector<Event> events;
  std::thread pump([&] { PumpEvents(child->events_fd(), [&](const Event& e) { events.push_back(e); }); });
  for (int i = 0; i < 100 && !fs::exists(dir_ + "/grandchild.pid"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  pid_t grandchild = 0;
  std::ifstream(dir_ + "/grandchild.pid") >> grandchild;
  ASSERT_GT(grandchild, 0);
  auto t0 = std::chrono::steady_clock::now();
  ExitStatus st = child->Stop(std::chrono::milliseconds(300));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_FALSE(st.exited);
  EXPECT_EQ(st.signal, SIGKILL);
  pump.join();  // EOF: nobody holds the pipe any more
  EXPECT_EQ(events.size(), 1u);
  // Dead means gone or a zombie (orphans go to PID 1, which in a container may never reap them).
  auto dead = [&] {
    std::ifstream st("/proc/" + std::to_string(grandchild) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(st)), std::istreambuf_iterator<char>());
    auto rp = stat.rfind(')');
    return stat.empty() || (rp != std::string::npos && rp + 2 < stat.size() && stat[rp + 2] == 'Z');
  };
  for (int i = 0; i < 50 && !dead(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_TRUE(dead()) << "grandchild " << grandchild << " survived";
}

TEST_F(ChildTest, MissingBinaryIsASpawnError) {
  std::string err;
  auto child = ChildProcess::Spawn({{dir_ + "/no-such-train"}, dir_ + "/attempt-1.log", 3}, &err);
  EXPECT_EQ(child, nullptr);
  EXPECT_NE(err.find("No such file"), std::string::npos) << err;
}

}  // namespace
}  // namespace ablate::worker
