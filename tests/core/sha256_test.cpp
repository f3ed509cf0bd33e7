// SHA-256: FIPS 180-4 / NIST test vectors, and the SHA-extension path equal to the portable one for every length
// around the block and padding boundaries and for arbitrary update splits.
#include "core/sha256.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace ablate {
namespace {

std::string digest(const std::string& s, bool hw) {
  Sha256 h(hw);
  h.update(s.data(), s.size());
  return h.hex();
}

TEST(Sha256, KnownVectors) {
  for (bool hw : {false, true}) {
    EXPECT_EQ(digest("", hw), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    EXPECT_EQ(digest("abc", hw), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    EXPECT_EQ(digest("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", hw),
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    EXPECT_EQ(digest("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
                     "mnopqrstnopqrstu",
                     hw),
              "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
    EXPECT_EQ(digest(std::string(1000000, 'a'), hw),
              "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  }
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Sha256, CpuExtensionsMatchPortableCode) {
  if (!Sha256::cpu_extensions_available()) GTEST_SKIP() << "this CPU has no SHA extensions";
  std::mt19937 rng(7);
  std::string data(300000, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  for (size_t n = 0; n <= 300; ++n)  // every length across the first blocks and padding cases
    ASSERT_EQ(digest(data.substr(0, n), true), digest(data.substr(0, n), false)) << n << " bytes";
  // Arbitrary split into updates, against one portable update of everything.
  Sha256 hw(true);
  size_t off = 0;
  while (off < data.size()) {
    const size_t take = std::min<size_t>(data.size() - off, rng() % 5000);
    hw.update(data.data() + off, take);
    off += take;
  }
  EXPECT_EQ(hw.hex(), digest(data, false));
}

TEST(Sha256, FileDigestAndUnreadableFile) {
  const std::string path = ::testing::TempDir() + "/sha256_test_file.bin";
  std::string data(5 << 20, 'x');  // more than one 4 MiB read
  data[12345] = 'y';
  std::ofstream(path, std::ios::binary) << data;
  EXPECT_EQ(sha256_file(path), digest(data, false));
  std::remove(path.c_str());
  EXPECT_THROW(sha256_file(path), std::runtime_error);
}

}  // namespace
}  // namespace ablate
