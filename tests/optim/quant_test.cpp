// Block-wise quantization: the maps (bit-exact against torchao), nearest-entry codes, packing, and the
// round-trip error bound derived from each map's largest gap.
#include <gtest/gtest.h>

#include <random>

#include "core/optim/quant_state.h"
#include "kernels/quant.h"
#include "tests/optim/optim_test_util.h"

namespace ablate {
namespace {

using kernels::QuantMap;

std::vector<float> build(QuantMap m) {
  std::vector<float> v(256);
  v.resize(static_cast<size_t>(kernels::quant_map_build(m, v.data())));
  return v;
}

struct MapCase {
  QuantMap map;
  std::vector<double> ref;
  bool is_signed;
};

std::vector<MapCase> all_maps() {
  return {{QuantMap::kDynamicSigned8, optim_test::ref_dynamic_map(true, 7, 8), true},
          {QuantMap::kDynamicUnsigned8, optim_test::ref_dynamic_map(false, 7, 8), false},
          {QuantMap::kDynamicSigned4, optim_test::ref_dynamic_map(true, 3, 4), true},
          {QuantMap::kLinearUnsigned4, optim_test::ref_linear_unsigned4(), false},
          {QuantMap::kLinearSquareSigned4, optim_test::ref_linear_square(4), true},
          {QuantMap::kLinearSquareSigned8, optim_test::ref_linear_square(8), true}};
}

// Values printed by torchao 0.18 (torch 2.11): torch.tensor(create_dynamic_map(...), dtype=float32).
// Several of these differ by one ulp from a naive fp32 evaluation; they pin the fma-based linspace.
TEST(QuantMapTest, DynamicMapsMatchTorchaoBitExactly) {
  const std::vector<float> s8 = build(QuantMap::kDynamicSigned8);
  const std::vector<std::pair<int, float>> g8 = {{0, -0x1.fc6666p-1f},   {18, -0x1.7acccc0p-1f}, {100, -0x1.e978d4p-8f},
                                                 {127, 0.0f},            {128, 0x1.27476ep-21f}, {236, 0x1.7accccp-1f},
                                                 {255, 1.0f}};
  for (auto [i, v] : g8) EXPECT_EQ(s8[i], v) << "signed 8-bit map entry " << i;
  const std::vector<float> u8 = build(QuantMap::kDynamicUnsigned8);
  const std::vector<std::pair<int, float>> gu8 = {
      {0, 0.0f}, {9, 0x1.3fd0d0p-15f}, {17, 0x1.f8a092p-13f}, {186, 0x1.096666p-1f}, {255, 1.0f}};
  for (auto [i, v] : gu8) EXPECT_EQ(u8[i], v) << "unsigned 8-bit map entry " << i;
  const std::vector<float> s4 = build(QuantMap::kDynamicSigned4);
  const float g4[16] = {-0x1.c66666p-1f, -0x1.533334p-1f, -0x1.c0p-2f,     -0x1.b33332p-3f, -0x1.3d70a4p-4f, -0x1.0a3d72p-5f,
                        -0x1.6872b0p-8f, 0.0f,            0x1.6872b0p-8f,  0x1.0a3d72p-5f,  0x1.3d70a4p-4f,  0x1.b33332p-3f,
                        0x1.c0p-2f,      0x1.533334p-1f,  0x1.c66666p-1f,  1.0f};
  ASSERT_EQ(s4.size(), 16u);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(s4[i], g4[i]) << "signed 4-bit map entry " << i;
  const std::vector<float> l4 = build(QuantMap::kLinearUnsigned4);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(l4[i], (i + 1) / 16.0f);
}

TEST(QuantMapTest, MapsHaveTwoToTheBitsSortedEntriesCloseToTheFp64Formula) {
  for (const auto& c : all_maps()) {
    const std::vector<float> m = build(c.map);
    ASSERT_EQ(static_cast<int>(m.size()), 1 << kernels::quant_map_bits(c.map));
    ASSERT_EQ(m.size(), c.ref.size());
    for (size_t k = 0; k < m.size(); ++k) {
      if (k > 0) {
        EXPECT_LT(m[k - 1], m[k]) << "map " << static_cast<int>(c.map) << " not strictly ascending at " << k;
      }
      EXPECT_NEAR(m[k], c.ref[k], 1e-6 * std::fabs(c.ref[k]) + 1e-12) << "map " << static_cast<int>(c.map) << " entry " << k;
    }
  }
}

// Worst-case round-trip error per element, relative to its block's absmax, derived from the maps:
// 8-bit signed dynamic 0.00703 (half the 0.9/64 step of the top decade, ~1/142), unsigned 0.00352,
// 4-bit signed dynamic 0.1125, 4-bit linear 1/16 (values below 1/16 go to 1/16; zero is excluded),
// linear-square 4-bit 0.124 (between 1 and (13/15)^2), 8-bit 0.0078.
TEST(QuantRoundTripTest, ErrorWithinTheMapDerivedBoundForEveryBlockSize) {
  const std::vector<double> expected_bound = {0.00703125, 0.003515625, 0.1125, 0.0625, 0.12444444, 0.00781238};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::student_t_distribution<float> heavy(2.f);
  const auto maps = all_maps();
  for (size_t mi = 0; mi < maps.size(); ++mi) {
    const auto& c = maps[mi];
    const double bound = optim_test::ref_map_max_error(c.ref, c.is_signed);
    EXPECT_NEAR(bound, expected_bound[mi], 1e-6) << "map " << mi;
    const std::vector<float> qmap = build(c.map);
    const int bits = kernels::quant_map_bits(c.map);
    for (int64_t block : {256, 128, 64}) {
      for (int64_t n : {int64_t{4096}, int64_t{1000}}) {  // 1000: a partial last block
        std::vector<float> x(n);
        for (int64_t i = 0; i < n; ++i) {
          const float v = (i % 3 == 0) ? heavy(rng) : normal(rng) * std::pow(10.f, float(i % 5) - 3.f);
          x[i] = c.is_signed ? v : std::fabs(v);
        }
        std::vector<uint8_t> codes(bits == 8 ? n : (n + 1) / 2);
        std::vector<float> scale((n + block - 1) / block), y(n);
        kernels::quant_encode_ref({x.data(), codes.data(), scale.data(), qmap.data(), n, block, bits});
        kernels::quant_decode_ref({codes.data(), scale.data(), qmap.data(), y.data(), n, block, bits});
        double worst = 0;
        for (int64_t i = 0; i < n; ++i) {
          const double s = scale[i / block];
          worst = std::max(worst, std::fabs(double(y[i]) - x[i]) / s);
        }
        EXPECT_LE(worst, bound * (1 + 1e-5)) << "map " << mi << " block " << block << " n " << n;
        EXPECT_GE(worst, bound * 0.3) << "map " << mi << ": error far below the bound, the bound is not exercised";
      }
    }
  }
}

TEST(QuantCodesTest, NearestEntryPackingAndScalesMatchBruteForce) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const auto& c : all_maps()) {
    const std::vector<float> qmap = build(c.map);
    const std::vector<double> qd(qmap.begin(), qmap.end());
    const int bits = kernels::quant_map_bits(c.map);
    const int64_t n = 2 * 128 + 50, block = 128;
    std::vector<float> x(n);
    for (auto& v : x) v = c.is_signed ? normal(rng) : std::fabs(normal(rng));
    std::vector<uint8_t> codes(bits == 8 ? n : (n + 1) / 2), codes2(codes.size());
    std::vector<float> scale(3), scale2(3);
    kernels::quant_encode_ref({x.data(), codes.data(), scale.data(), qmap.data(), n, block, bits});
    kernels::quant_encode_ref({x.data(), codes2.data(), scale2.data(), qmap.data(), n, block, bits});
    EXPECT_EQ(codes, codes2) << "codes are not reproducible";
    EXPECT_EQ(scale, scale2);
    // Brute force on the same fp32 normalized inputs (x / scale in fp32) with the same fp32 map.
    for (int64_t i = 0; i < n; ++i) {
      const float xn = x[i] / scale[i / block];
      int expect = 0;
      for (int k = 1; k < (1 << bits); ++k)
        if (std::fabs(double(xn) - qd[k]) <= std::fabs(double(xn) - qd[expect])) expect = k;
      const int got = bits == 8 ? codes[i] : ((i & 1) ? (codes[i >> 1] & 15) : (codes[i >> 1] >> 4));
      EXPECT_EQ(got, expect) << "map " << static_cast<int>(c.map) << " element " << i << " xn " << xn;
    }
    for (int b = 0; b < 3; ++b) {
      float amax = 0;
      for (int64_t i = b * block; i < std::min(n, (b + 1) * block); ++i) amax = std::max(amax, std::fabs(x[i]));
      EXPECT_EQ(scale[b], amax);
    }
  }
}

TEST(QuantizedTensorTest, EncodeDecodeOnCpuMatchesTheKernelAndCountsBytes) {
  torch::manual_seed(3);
  const torch::Tensor x = torch::randn({4096});
  core::optim::QuantizedTensor q8(4096, QuantMap::kDynamicSigned8, 256, torch::kCPU);
  core::optim::QuantizedTensor q4(4096, QuantMap::kDynamicSigned4, 128, torch::kCPU);
  EXPECT_TRUE(q8.decode().eq(0).all().item<bool>()) << "fresh state must decode to zeros";
  q8.encode(x);
  q4.encode(x);
  EXPECT_EQ(q8.bytes(), 4096 + 16 * 4);
  EXPECT_EQ(q4.bytes(), 2048 + 32 * 4);
  const double e8 = ((q8.decode() - x).abs().view({16, 256}).amax(1) / x.abs().view({16, 256}).amax(1)).max().item<double>();
  const double e4 = ((q4.decode() - x).abs().view({32, 128}).amax(1) / x.abs().view({32, 128}).amax(1)).max().item<double>();
  EXPECT_LE(e8, 0.00703125 * (1 + 1e-5));
  EXPECT_LE(e4, 0.1125 * (1 + 1e-5));
  EXPECT_THROW(q8.encode(torch::randn({100})), c10::Error);
}

}  // namespace
}  // namespace ablate
