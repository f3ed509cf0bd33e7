// The worker's on-disk metric spill (worker/spill.h): order, rotation, cap + drop count, acknowledgement and
// truncation, replay after a restart, torn/corrupt tails.
#include "worker/spill.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "tests/temp_dir.h"

namespace ablate::worker {
namespace {

namespace fs = std::filesystem;

class SpillTest : public ::testing::Test {
 protected:
  test_util::TempDir tmp_{"spill_test"};
  void SetUp() override {
    root_ = tmp_.path();
    dir_ = root_ + "/state/spill/job-1-a1";  // created by the spill
  }

  static std::vector<v1::MetricPoint> Points(int64_t from, int64_t to, const std::string& name = "train/loss") {
    std::vector<v1::MetricPoint> v;
    for (int64_t s = from; s < to; ++s) {
      v1::MetricPoint p;
      p.set_step(s);
      p.set_name(name);
      p.set_value(0.5 * static_cast<double>(s));
      p.set_time_unix_ms(1000 + s);
      v.push_back(p);
    }
    return v;
  }
  static std::vector<int64_t> Steps(const std::vector<v1::MetricPoint>& v) {
    std::vector<int64_t> s;
    for (const auto& p : v) s.push_back(p.step());
    return s;
  }
  static std::vector<int64_t> Range(int64_t from, int64_t to) {
    std::vector<int64_t> s;
    for (int64_t i = from; i < to; ++i) s.push_back(i);
    return s;
  }
  std::vector<std::string> Segments() const {
    std::vector<std::string> v;
    for (const auto& e : fs::directory_iterator(dir_)) {
      if (e.path().extension() == ".log") v.push_back(e.path().filename().string());
    }
    std::sort(v.begin(), v.end());
    return v;
  }
  uint64_t DiskBytes() const {
    uint64_t n = 0;
    for (const auto& s : Segments()) n += fs::file_size(dir_ + "/" + s);
    return n;
  }

  std::string root_, dir_;
};

TEST_F(SpillTest, AppendsToDiskAndPeeksInOrder) {
  std::string err;
  MetricSpill s(dir_, {}, &err);
  ASSERT_TRUE(s.on_disk()) << err;
  EXPECT_EQ(s.Append(Points(0, 10)), 0u);
  EXPECT_EQ(s.pending(), 10u);
  EXPECT_GT(DiskBytes(), 0u);
  auto got = s.Peek(100);
  ASSERT_EQ(got.size(), 10u);
  EXPECT_EQ(Steps(got), Range(0, 10));
  EXPECT_EQ(got[3].name(), "train/loss");
  EXPECT_DOUBLE_EQ(got[3].value(), 1.5);
  EXPECT_EQ(got[3].time_unix_ms(), 1003);
  // Peek does not consume.
  EXPECT_EQ(Steps(s.Peek(4)), Range(0, 4));
  EXPECT_EQ(s.pending(), 10u);
}

TEST_F(SpillTest, AckAdvancesAndTruncatesOnceAllIsDelivered) {
  MetricSpill s(dir_, {});
  s.Append(Points(0, 10));
  ASSERT_EQ(s.Peek(4).size(), 4u);
  s.Ack(3);  // only the first 3 were stored
  EXPECT_EQ(s.pending(), 7u);
  EXPECT_EQ(Steps(s.Peek(100)), Range(3, 10));
  s.Ack(7);
  EXPECT_EQ(s.pending(), 0u);
  EXPECT_TRUE(s.Peek(100).empty());
  EXPECT_EQ(DiskBytes(), 0u);  // the log is emptied once the scheduler has everything
  EXPECT_EQ(s.bytes(), 0u);
  s.Append(Points(10, 12));
  EXPECT_EQ(Steps(s.Peek(100)), Range(10, 12));
}

TEST_F(SpillTest, RotatesSegmentsAndDeletesDeliveredOnes) {
  MetricSpill s(dir_, {.max_bytes = 1 << 20, .segment_bytes = 500});
  s.Append(Points(0, 100));  // ~50 bytes a record: ~10 segments
  auto segs = Segments();
  EXPECT_GE(segs.size(), 8u);
  EXPECT_EQ(segs.front(), "seg-00000001.log");
  EXPECT_EQ(Steps(s.Peek(1000)), Range(0, 100));  // order across segments
  // Deliver in uneven batches; delivered segments disappear.
  int64_t next = 0;
  for (size_t batch : {7u, 13u, 30u}) {
    auto got = s.Peek(batch);
    ASSERT_EQ(got.size(), batch);
    EXPECT_EQ(got.front().step(), next);
    next += static_cast<int64_t>(batch);
    s.Ack(batch);
  }
  EXPECT_LT(Segments().size(), segs.size());
  EXPECT_EQ(Steps(s.Peek(1000)), Range(50, 100));
  s.Ack(50);
  EXPECT_EQ(s.pending(), 0u);
  EXPECT_EQ(DiskBytes(), 0u);
}

TEST_F(SpillTest, CapRefusesNewPointsAndCountsThem) {
  MetricSpill s(dir_, {.max_bytes = 1000, .segment_bytes = 300});
  size_t refused = s.Append(Points(0, 100));
  EXPECT_GT(refused, 0u);
  EXPECT_EQ(s.dropped(), static_cast<int64_t>(refused));
  EXPECT_EQ(s.pending() + refused, 100u);
  EXPECT_LE(DiskBytes(), 1000u);
  EXPECT_LE(s.bytes(), 1000u);
  // What was kept is the oldest, gap-free prefix: the lost steps are exactly the counted ones.
  EXPECT_EQ(Steps(s.Peek(1000)), Range(0, static_cast<int64_t>(s.pending())));
  // Delivering frees room again.
  s.Peek(1000);
  s.Ack(s.pending());
  EXPECT_EQ(s.Append(Points(100, 105)), 0u);
  EXPECT_EQ(Steps(s.Peek(1000)), Range(100, 105));
  EXPECT_EQ(s.dropped(), static_cast<int64_t>(refused));
}

TEST_F(SpillTest, RestartReplaysUndeliveredInOrder) {
  {
    MetricSpill s(dir_, {.max_bytes = 1 << 20, .segment_bytes = 400});
    s.Append(Points(0, 40));
    s.Peek(15);
    s.Ack(15);
    s.Sync();
  }  // worker restarts
  MetricSpill s(dir_, {.max_bytes = 1 << 20, .segment_bytes = 400});
  ASSERT_TRUE(s.on_disk());
  EXPECT_EQ(s.pending(), 25u);
  EXPECT_EQ(s.torn_tails(), 0);
  EXPECT_EQ(Steps(s.Peek(1000)), Range(15, 40));
  s.Append(Points(40, 45));  // new points go after the replayed ones
  EXPECT_EQ(Steps(s.Peek(1000)), Range(15, 45));
  s.Ack(30);
  EXPECT_EQ(s.pending(), 0u);
}

TEST_F(SpillTest, RestartWithoutAckReplaysEverything) {
  { MetricSpill(dir_, {}).Append(Points(0, 5)); }
  MetricSpill s(dir_, {});
  EXPECT_EQ(Steps(s.Peek(100)), Range(0, 5));
}

TEST_F(SpillTest, TornTailIsCutOff) {
  {
    MetricSpill s(dir_, {});
    s.Append(Points(0, 10));
  }
  auto seg = dir_ + "/" + Segments().back();
  auto size = fs::file_size(seg);
  fs::resize_file(seg, size - 5);  // crash in the middle of the last record
  MetricSpill s(dir_, {});
  EXPECT_EQ(s.torn_tails(), 1);
  EXPECT_EQ(Steps(s.Peek(100)), Range(0, 9));
  EXPECT_LT(fs::file_size(seg), size - 5);  // cut at the last good record
  s.Append(Points(9, 12));  // appends after the cut parse again
  EXPECT_EQ(Steps(s.Peek(100)), Range(0, 12));
  MetricSpill again(dir_ + "", {});  // (a second handle only reads here)
  EXPECT_EQ(again.torn_tails(), 0);
}

TEST_F(SpillTest, CorruptRecordAndGarbageTailAreCutOff) {
  {
    MetricSpill s(dir_, {});
    s.Append(Points(0, 10));
  }
  auto seg = dir_ + "/" + Segments().back();
  auto size = fs::file_size(seg);
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size / 2) + 3);  // flip a byte inside a record in the middle
    char c;
    f.seekg(f.tellp());
    f.get(c);
    f.seekp(static_cast<std::streamoff>(size / 2) + 3);
    f.put(static_cast<char>(c ^ 0x5A));
  }
  MetricSpill s(dir_, {});
  EXPECT_EQ(s.torn_tails(), 1);
  auto got = s.Peek(100);
  ASSERT_GT(got.size(), 0u);
  ASSERT_LT(got.size(), 10u);
  EXPECT_EQ(Steps(got), Range(0, static_cast<int64_t>(got.size())));  // a good, in-order prefix
  {
    std::ofstream f(seg, std::ios::app | std::ios::binary);
    f << std::string("\xff\xff\xff\x7fgarbage", 11);  // an absurd length
  }
  MetricSpill t(dir_, {});
  EXPECT_EQ(t.torn_tails(), 1);
  EXPECT_EQ(t.pending(), got.size());
}

TEST_F(SpillTest, AckRunningAheadOfACutTailIsClamped) {
  {
    MetricSpill s(dir_, {});
    s.Append(Points(0, 4));
  }
  {
    std::ofstream f(dir_ + "/ack");
    f << "1 99999\n";
  }
  MetricSpill s(dir_, {});
  EXPECT_EQ(s.pending(), 0u);
  s.Append(Points(4, 6));
  EXPECT_EQ(Steps(s.Peek(100)), Range(4, 6));
}

TEST_F(SpillTest, MemoryModeWithoutADirectory) {
  MetricSpill s("", {.max_bytes = 500, .segment_bytes = 100});
  EXPECT_FALSE(s.on_disk());
  size_t refused = s.Append(Points(0, 50));
  EXPECT_GT(refused, 0u);
  EXPECT_EQ(s.dropped(), static_cast<int64_t>(refused));
  auto got = s.Peek(3);
  EXPECT_EQ(Steps(got), Range(0, 3));
  s.Ack(3);
  EXPECT_EQ(s.pending() + refused + 3, 50u);
  EXPECT_EQ(s.Peek(1).front().step(), 3);
}

TEST_F(SpillTest, UnusableDirectoryFallsBackToMemory) {
  std::string file = root_ + "/not-a-dir";
  { std::ofstream(file) << "x"; }
  std::string err;
  MetricSpill s(file + "/spill", {}, &err);
  EXPECT_FALSE(s.on_disk());
  EXPECT_FALSE(err.empty());
  s.Append(Points(0, 2));
  EXPECT_EQ(Steps(s.Peek(10)), Range(0, 2));
}

TEST_F(SpillTest, RemoveDeletesTheDirectory) {
  MetricSpill s(dir_, {});
  s.Append(Points(0, 3));
  s.Remove();
  EXPECT_FALSE(fs::exists(dir_));
  EXPECT_EQ(s.pending(), 0u);
}

}  // namespace
}  // namespace ablate::worker
