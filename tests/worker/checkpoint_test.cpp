// VerifyCheckpoint: the manifest's per-file size and SHA-256 against the files on disk (the worker records and
// resumes only checkpoints that pass; RELIABILITY I6).
#include "worker/checkpoint.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/temp_dir.h"

namespace ablate::worker {
namespace {

namespace fs = std::filesystem;

class VerifyCheckpointTest : public ::testing::Test {
 protected:
  test_util::TempDir tmp_{"ckpt-verify"};
  void SetUp() override {
    dir_ = tmp_.path();
  }

  void Write(const std::string& name, const std::string& bytes) {
    std::ofstream(fs::path(dir_) / name, std::ios::binary) << bytes;
  }
  // A manifest listing `names` with their true sizes and digests.
  nlohmann::json Manifest(const std::vector<std::string>& names) {
    nlohmann::json m;
    m["format"] = "ablate-checkpoint-v1";
    for (const auto& n : names) {
      bool ok = false;
      const auto p = (fs::path(dir_) / n).string();
      m["files"][n] = {{"bytes", fs::file_size(p)}, {"sha256", Sha256File(p, &ok)}};
      EXPECT_TRUE(ok) << p;
    }
    return m;
  }
  void Save(const nlohmann::json& m) { std::ofstream(fs::path(dir_) / "manifest.json") << m.dump(); }
  std::string dir_;
};

TEST(Sha256File, KnownDigests) {
  char tmpl[] = "/tmp/sha-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  ::close(fd);
  bool ok = false;
  EXPECT_EQ(Sha256File(tmpl, &ok), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");  // ""
  EXPECT_TRUE(ok);
  std::ofstream(tmpl) << "abc";
  EXPECT_EQ(Sha256File(tmpl, &ok), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::remove(tmpl);
  EXPECT_EQ(Sha256File(tmpl, &ok), "");
  EXPECT_FALSE(ok);
}

TEST_F(VerifyCheckpointTest, IntactCheckpointOfSeveralFilesPasses) {
  // Several files, one large enough to take a while, so the concurrent hashing has work to share.
  Write("model.pt", std::string(3 << 20, 'm'));
  Write("optimizer.pt", std::string(5 << 20, 'o'));
  Write("state.json", "{\"step\": 10}");
  Save(Manifest({"model.pt", "optimizer.pt", "state.json"}));
  std::string why;
  EXPECT_TRUE(VerifyCheckpoint(dir_, &why)) << why;
}

TEST_F(VerifyCheckpointTest, OneFlippedByteIsNamed) {
  Write("model.pt", std::string(1 << 20, 'm'));
  Write("optimizer.pt", std::string(2 << 20, 'o'));
  Write("state.json", "{}");
  Save(Manifest({"model.pt", "optimizer.pt", "state.json"}));
  std::string bad(2 << 20, 'o');
  bad[12345] = 'x';  // same size, other content
  Write("optimizer.pt", bad);
  std::string why;
  EXPECT_FALSE(VerifyCheckpoint(dir_, &why));
  EXPECT_NE(why.find("optimizer.pt: sha256 does not match"), std::string::npos) << why;
}

TEST_F(VerifyCheckpointTest, SizeMismatchMissingFileAndBadEntriesAreRefused) {
  Write("model.pt", "0123456789");
  auto m = Manifest({"model.pt"});
  std::string why;

  Write("model.pt", "01234");  // truncated
  Save(m);
  EXPECT_FALSE(VerifyCheckpoint(dir_, &why));
  EXPECT_NE(why.find("5 bytes, manifest says 10"), std::string::npos) << why;

  fs::remove(fs::path(dir_) / "model.pt");
  EXPECT_FALSE(VerifyCheckpoint(dir_, &why));
  EXPECT_NE(why.find("model.pt: missing"), std::string::npos) << why;

  Write("model.pt", "0123456789");
  auto escape = m;
  escape["files"]["../etc/passwd"] = {{"bytes", 1}, {"sha256", "00"}};
  Save(escape);
  EXPECT_FALSE(VerifyCheckpoint(dir_, &why));
  EXPECT_NE(why.find("bad entry"), std::string::npos) << why;

  Save(m);
  EXPECT_TRUE(VerifyCheckpoint(dir_, &why)) << why;
}

TEST_F(VerifyCheckpointTest, NoOrBrokenManifestIsAnIncompleteCheckpoint) {
  Write("model.pt", "x");
  std::string why;
  EXPECT_FALSE(VerifyCheckpoint(dir_, &why));
  EXPECT_NE(why.find("no manifest.json"), std::string::npos) << why;
  std::ofstream(fs::path(dir_) / "manifest.json") << "{\"files\": ";
  EXPECT_FALSE(VerifyCheckpoint(dir_, &why));
  EXPECT_NE(why.find("unreadable manifest"), std::string::npos) << why;
  EXPECT_FALSE(VerifyCheckpoint(dir_ + "/nope", &why));
  EXPECT_NE(why.find("not a directory"), std::string::npos) << why;
}

}  // namespace
}  // namespace ablate::worker
