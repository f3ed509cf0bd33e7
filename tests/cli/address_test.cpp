#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

#include "cli/client.h"

namespace ablate::cli {
namespace {

TEST(ResolveSchedulerAddress, FlagThenEnvThenStackThenDefault) {
  char tmpl[] = "/tmp/ablate-addr-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string dir = tmpl, src;
  unsetenv("ABLATE_SCHEDULER");
  EXPECT_EQ(ResolveSchedulerAddress("", dir, &src), kDefaultScheduler);
  EXPECT_EQ(src, "default");
  std::ofstream(dir + "/stack.json") << R"({"scheduler":"127.0.0.1:4242"})";
  EXPECT_EQ(ResolveSchedulerAddress("", dir, &src), "127.0.0.1:4242");
  setenv("ABLATE_SCHEDULER", "10.0.0.1:1", 1);
  EXPECT_EQ(ResolveSchedulerAddress("", dir, &src), "10.0.0.1:1");
  EXPECT_EQ(src, "ABLATE_SCHEDULER");
  EXPECT_EQ(ResolveSchedulerAddress("h:2", dir, &src), "h:2");
  unsetenv("ABLATE_SCHEDULER");
  std::ofstream(dir + "/stack.json") << "not json";
  EXPECT_EQ(ResolveSchedulerAddress("", dir, &src), kDefaultScheduler);
  std::filesystem::remove_all(dir);
}

TEST(CheckHealth, UnreachableWhenNothingListens) {
  std::string err;
  // Port 1 on localhost: nothing listens there.
  EXPECT_EQ(CheckHealth(MakeChannel("127.0.0.1:1"), std::chrono::milliseconds(2000), &err), Health::kUnreachable);
  EXPECT_FALSE(err.empty());
}

}  // namespace
}  // namespace ablate::cli
