// SHA-256 (FIPS 180-4) for checkpoint manifests, self-contained so the engine needs no crypto library. On x86-64
// CPUs with the SHA extensions (Intel since Ice Lake / Goldmont, AMD since Zen) the compression function runs on
// them (SHA256RNDS2 / SHA256MSG1/2), about 5-8x the portable code; elsewhere the portable code. A 4B model's
// checkpoint is ~24 GB, so this is the difference between seconds and minutes per save and per resume.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace ablate {

// Incremental hashing: update() any number of times with any split of the bytes, then hex() once.
class Sha256 {
 public:
  // use_cpu_extensions=false forces the portable code (tests compare the two paths).
  explicit Sha256(bool use_cpu_extensions = true);
  void update(const void* data, size_t n);
  std::string hex();  // lowercase hex digest; the object is finished afterwards
  // Whether this CPU has the SHA extensions (and this build can use them).
  static bool cpu_extensions_available();

 private:
  void blocks(const unsigned char* p, size_t nblocks);
  std::array<uint32_t, 8> h_;
  uint64_t len_ = 0;
  std::array<unsigned char, 64> buf_{};
  size_t used_ = 0;
  bool hw_ = false;
};

// Hex digest of the file's bytes; throws std::runtime_error if it cannot be read.
std::string sha256_file(const std::string& path);
std::string sha256_hex(const std::string& data);
}  // namespace ablate
