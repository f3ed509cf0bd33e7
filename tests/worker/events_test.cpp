#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "worker/events.h"

namespace ablate::worker {
namespace {

TEST(ParseEventLine, Started) {
  auto ev = ParseEventLine(R"({"event":"started","total_steps":200,"params":1234567})");
  ASSERT_TRUE(ev);
  auto* s = std::get_if<StartedEvent>(&*ev);
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->total_steps, 200);
  EXPECT_EQ(s->params, 1234567);
}

TEST(ParseEventLine, MetricsKeepsEveryNumericValue) {
  auto ev = ParseEventLine(
      R"({"event":"metrics","step":10,"time_unix_ms":1764390000000,"values":{"train/loss":3.25,"train/lr":0.001,"note":"x"}})");
  ASSERT_TRUE(ev);
  auto* m = std::get_if<MetricsEvent>(&*ev);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->step, 10);
  EXPECT_EQ(m->time_unix_ms, 1764390000000);
  ASSERT_EQ(m->values.size(), 2u);  // the string value is skipped
  EXPECT_EQ(m->values[0].first, "train/loss");
  EXPECT_DOUBLE_EQ(m->values[0].second, 3.25);
}

TEST(ParseEventLine, CheckpointAndFinished) {
  auto c = ParseEventLine(R"({"event":"checkpoint","step":100,"path":"/abs/checkpoint-100"})");
  ASSERT_TRUE(c);
  EXPECT_EQ(std::get<CheckpointEvent>(*c).path, "/abs/checkpoint-100");
  auto f = ParseEventLine(R"({"event":"finished","status":"failed","failure_class":"oom","message":"CUDA OOM"})");
  ASSERT_TRUE(f);
  const auto& fe = std::get<FinishedEvent>(*f);
  EXPECT_FALSE(fe.succeeded);
  EXPECT_EQ(fe.failure_class, "oom");
  EXPECT_EQ(fe.message, "CUDA OOM");
  auto ok = ParseEventLine("{\"event\":\"finished\",\"status\":\"succeeded\"}\r");
  ASSERT_TRUE(ok);
  EXPECT_TRUE(std::get<FinishedEvent>(*ok).succeeded);
  auto a = ParseEventLine(R"({"event":"checkpoint_abandoned","step":100,"reason":"deadline"})");
  ASSERT_TRUE(a);
  EXPECT_EQ(std::get<CheckpointAbandonedEvent>(*a).step, 100);
  EXPECT_EQ(std::get<CheckpointAbandonedEvent>(*a).reason, "deadline");
  EXPECT_FALSE(ParseEventLine(R"({"event":"checkpoint_abandoned"})"));
}

TEST(ParseEventLine, RejectsMalformedWithReason) {
  for (const char* bad : {"", "not json", "[1,2]", R"({"step":1})", R"({"event":"metrics","values":{"a":1}})",
                          R"({"event":"metrics","step":1,"values":{}})", R"({"event":"checkpoint","step":1})",
                          R"({"event":"finished","status":"maybe"})", R"({"event":"bogus"})",
                          R"({"event":"metrics","step":1.5,"values":{"a":1}})", "{\"event\":\"started\""}) {
    std::string why;
    EXPECT_FALSE(ParseEventLine(bad, &why)) << bad;
    EXPECT_FALSE(why.empty()) << bad;
  }
}

TEST(LineSplitter, HandlesSplitsAndOverlongLines) {
  LineSplitter s(16);
  std::vector<std::string> lines;
  auto cb = [&](std::string_view l) { lines.emplace_back(l); };
  s.Feed("ab", cb);
  s.Feed("c\nde", cb);
  s.Feed("f\n0123456789abcdefXYZ\nok\ntail", cb);
  s.Finish(cb);
  EXPECT_EQ(lines, (std::vector<std::string>{"abc", "def", "ok", "tail"}));
  EXPECT_EQ(s.overlong_lines(), 1);
}

TEST(PumpEvents, CountsMalformedAndDeliversTheRest) {
  int p[2];
  ASSERT_EQ(pipe(p), 0);
  std::string data =
      "{\"event\":\"started\",\"total_steps\":3}\n"
      "garbage\n"
      "{\"event\":\"metrics\",\"step\":1,\"values\":{\"train/loss\":2.5}}\n"
      "{\"event\":\"finished\",\"status\":\"succeeded\"}";  // no trailing newline: still counted at EOF
  ASSERT_EQ(write(p[1], data.data(), data.size()), static_cast<ssize_t>(data.size()));
  close(p[1]);
  std::vector<Event> events;
  std::vector<std::string> bad;
  EventStats st = PumpEvents(
      p[0], [&](const Event& e) { events.push_back(e); },
      [&](std::string_view line, const std::string&) { bad.emplace_back(line); });
  close(p[0]);
  EXPECT_EQ(st.lines, 4);
  EXPECT_EQ(st.events, 3);
  EXPECT_EQ(st.malformed, 1);
  EXPECT_EQ(bad, std::vector<std::string>{"garbage"});
  ASSERT_EQ(events.size(), 3u);
  EXPECT_TRUE(std::holds_alternative<FinishedEvent>(events[2]));
}

}  // namespace
}  // namespace ablate::worker
