#include "core/sha256.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ABLATE_SHA_NI 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace ablate {
namespace {

alignas(16) constexpr uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void blocks_portable(uint32_t* h, const unsigned char* p, size_t nblocks) {
  for (; nblocks > 0; --nblocks, p += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      const uint32_t ch = (e & f) ^ (~e & g);
      const uint32_t t1 = hh + S1 + ch + K[i] + w[i];
      const uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      const uint32_t mj = (a & b) ^ (a & c) ^ (b & c);
      const uint32_t t2 = S0 + mj;
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
}

#if ABLATE_SHA_NI
bool cpu_has_sha() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool ssse3 = (c & (1u << 9)) != 0, sse41 = (c & (1u << 19)) != 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ssse3 && sse41 && (b & (1u << 29)) != 0;  // CPUID.(7,0):EBX[29] = SHA
}

// The compression function on the SHA extensions. State lives in two registers in the order the instructions
// want: abef = (a, b, e, f) and cdgh = (c, d, g, h), a and c in the top lane. Each 4-round group g adds the
// message words W[4g..4g+3] plus constants and runs SHA256RNDS2 twice (2 rounds each; the second call gets the
// upper two lanes). The schedule is w[t] = s1(w[t-2]) + w[t-7] + s0(w[t-15]) + w[t-16]: SHA256MSG1 gives
// w[t-16] + s0(w[t-15]) for four t, the aligned pair adds w[t-7], SHA256MSG2 adds s1(w[t-2]).
__attribute__((target("sha,sse4.1,ssse3"))) void blocks_sha_ni(uint32_t* h, const unsigned char* p,
                                                                 size_t nblocks) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
  __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h));         // (a, b, c, d) from lane 0
  __m128i cdgh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 4));  // (e, f, g, h)
  t = _mm_shuffle_epi32(t, 0xB1);                                            // (b, a, d, c)
  cdgh = _mm_shuffle_epi32(cdgh, 0x1B);                                      // (h, g, f, e)
  __m128i abef = _mm_alignr_epi8(t, cdgh, 8);                                // (f, e, b, a)
  cdgh = _mm_blend_epi16(cdgh, t, 0xF0);                                     // (h, g, d, c)
  for (; nblocks > 0; --nblocks, p += 64) {
    const __m128i abef0 = abef, cdgh0 = cdgh;
    __m128i w[4];
    for (int g = 0; g < 16; ++g) {
      __m128i& cur = w[g & 3];
      if (g < 4) {
        cur = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * g)), bswap);
      } else {
        const __m128i& prev1 = w[(g - 1) & 3];
        const __m128i& prev2 = w[(g - 2) & 3];
        const __m128i& prev3 = w[(g - 3) & 3];
        __m128i x = _mm_sha256msg1_epu32(cur, prev3);          // cur holds W[g-4]: w[t-16] + s0(w[t-15])
        x = _mm_add_epi32(x, _mm_alignr_epi8(prev1, prev2, 4));  // + w[t-7]
        cur = _mm_sha256msg2_epu32(x, prev1);                  // + s1(w[t-2])
      }
      __m128i m = _mm_add_epi32(cur, _mm_load_si128(reinterpret_cast<const __m128i*>(K + 4 * g)));
      // Two rounds: the result is the new (a, b, e, f), and the old (a, b, e, f) is the new (c, d, g, h), so the
      // registers trade roles; the next two rounds trade them back.
      cdgh = _mm_sha256rnds2_epu32(cdgh, abef, m);
      m = _mm_shuffle_epi32(m, 0x0E);
      abef = _mm_sha256rnds2_epu32(abef, cdgh, m);
    }
    abef = _mm_add_epi32(abef, abef0);
    cdgh = _mm_add_epi32(cdgh, cdgh0);
  }
  t = _mm_shuffle_epi32(abef, 0x1B);                                                 // (a, b, e, f)
  cdgh = _mm_shuffle_epi32(cdgh, 0xB1);                                              // (g, h, c, d)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(h), _mm_blend_epi16(t, cdgh, 0xF0));   // (a, b, c, d)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(h + 4), _mm_alignr_epi8(cdgh, t, 8));  // (e, f, g, h)
}
#endif

}  // namespace

bool Sha256::cpu_extensions_available() {
#if ABLATE_SHA_NI
  static const bool has = cpu_has_sha();
  return has;
#else
  return false;
#endif
}

Sha256::Sha256(bool use_cpu_extensions)
    : h_{0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19},
      hw_(use_cpu_extensions && cpu_extensions_available()) {}

void Sha256::blocks(const unsigned char* p, size_t nblocks) {
#if ABLATE_SHA_NI
  if (hw_) return blocks_sha_ni(h_.data(), p, nblocks);
#endif
  blocks_portable(h_.data(), p, nblocks);
}

void Sha256::update(const void* data, size_t n) {
  auto p = static_cast<const unsigned char*>(data);
  len_ += n;
  if (used_ > 0) {  // top up the partial block first
    const size_t take = std::min(n, 64 - used_);
    std::memcpy(buf_.data() + used_, p, take);
    used_ += take;
    p += take;
    n -= take;
    if (used_ < 64) return;
    blocks(buf_.data(), 1);
    used_ = 0;
  }
  if (n >= 64) {  // whole blocks straight from the input
    blocks(p, n / 64);
    p += n / 64 * 64;
    n %= 64;
  }
  std::memcpy(buf_.data(), p, n);
  used_ = n;
}

std::string Sha256::hex() {
  const uint64_t bits = len_ * 8;
  unsigned char pad[72] = {0x80};
  const size_t zeros = (used_ < 56 ? 56 - used_ : 120 - used_);  // to 56 mod 64, then 8 length bytes
  for (int i = 0; i < 8; ++i) pad[zeros + i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
  update(pad, zeros + 8);
  char out[65];
  for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h_[i]);
  return std::string(out, 64);
}

std::string sha256_hex(const std::string& data) {
  Sha256 s;
  s.update(data.data(), data.size());
  return s.hex();
}

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  Sha256 s;
  std::vector<char> buf(4 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    s.update(buf.data(), static_cast<size_t>(f.gcount()));
  }
  if (f.bad()) throw std::runtime_error("cannot read " + path);
  return s.hex();
}

}  // namespace ablate
