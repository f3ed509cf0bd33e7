// The multi-tensor low-bit AdamW kernel's logic on CPU (kernels/adam_lowbit.h "multi-tensor step"): its
// re-quantization by counting decision thresholds against quant_nearest_code, and its CPU emulation (same thread blocks,
// warps, lanes, tensor search and per-lane code as the CUDA kernel) against the per-tensor reference
// adam_lowbit_step_ref, bit for bit. The CUDA kernel itself is checked in optim_gpu_test.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/optim/adamw.h"
#include "kernels/adam_lowbit.h"
#include "kernels/adam_lowbit_multi.h"
#include "kernels/quant.h"

namespace ablate {
namespace {

using kernels::QuantMap;
namespace multi = kernels::adam_lowbit_multi;

template <int BITS>
void check_search(QuantMap map) {
  constexpr int NQ = 1 << BITS;
  float q[256], e[256];
  ASSERT_EQ(kernels::quant_map_build(map, q), NQ);
  kernels::adam_lowbit_code_thresholds(q, BITS, e);
  std::vector<float> xs = {0.f, -0.f, 1.f, -1.f, 2.f, -2.f, 1e-30f, -1e-30f, 1e-45f, -1e-45f,
                           std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::max(),
                           std::numeric_limits<float>::lowest()};
  // Every fp32 value within 64 ulps of each map entry, each midpoint and each threshold.
  auto around = [&](float c) {
    float lo = c, hi = c;
    for (int i = 0; i < 64; ++i) {
      xs.push_back(lo = std::nextafter(lo, -4.f));
      xs.push_back(hi = std::nextafter(hi, 4.f));
    }
    xs.push_back(c);
  };
  for (int k = 0; k < NQ; ++k) {
    around(q[k]);
    around(e[k]);
    if (k + 1 < NQ) around(q[k] + (q[k + 1] - q[k]) * 0.5f);
  }
  std::mt19937 rng(BITS);
  std::uniform_real_distribution<float> u(-1.1f, 1.1f);
  std::uniform_int_distribution<uint32_t> bits_dist;
  for (int i = 0; i < 200000; ++i) {
    const float x = u(rng);
    xs.push_back(x);
    xs.push_back(x * x * x * x * x * x);
    const uint32_t b = bits_dist(rng);
    float y;
    std::memcpy(&y, &b, 4);
    xs.push_back(y);  // any fp32 bit pattern, NaNs included
  }
  std::vector<uint8_t> lut(2 * multi::kLutMaxRows * (1 << multi::kLutMantissaBits));
  float sorted[256];
  int elo = 0, rows = 0;
  const bool has_lut = kernels::adam_lowbit_code_lut(q, BITS, lut.data(), sorted, &elo, &rows);
  if (BITS == 8 && map != QuantMap::kLinearSquareSigned8) {
    EXPECT_TRUE(has_lut) << "map " << int(map);  // the two Adam maps fit the bucket table
  }
  if (has_lut) {
    for (int k = 1; k < NQ; ++k) around(sorted[k - 1]);
  }
  int64_t differ = 0, differ_lut = 0;
  for (float x : xs) {
    const uint32_t want = kernels::quant_nearest_code(x, q, BITS);
    const uint32_t got = multi::code_by_thresholds<BITS>(x, e);
    if (want != got && ++differ < 5) ADD_FAILURE() << "map " << int(map) << " x " << x << ": " << got << " vs " << want;
    if (has_lut) {
      const uint32_t got_lut = multi::code_by_lut(x, lut.data(), sorted, elo, rows);
      if (want != got_lut && ++differ_lut < 5)
        ADD_FAILURE() << "LUT map " << int(map) << " x " << x << ": " << got_lut << " vs " << want;
    }
  }
  EXPECT_EQ(differ, 0) << "map " << int(map) << " over " << xs.size() << " values";
  EXPECT_EQ(differ_lut, 0) << "LUT map " << int(map) << " over " << xs.size() << " values";
}

// Both re-quantization searches of the kernel (threshold descent; 8-bit bucket table) against quant_nearest_code.
TEST(AdamLowbitMultiTest, ThresholdSearchMatchesQuantNearestCode) {
  check_search<8>(QuantMap::kDynamicSigned8);
  check_search<8>(QuantMap::kDynamicUnsigned8);
  check_search<8>(QuantMap::kLinearSquareSigned8);
  check_search<4>(QuantMap::kDynamicSigned4);
  check_search<4>(QuantMap::kLinearUnsigned4);
  check_search<4>(QuantMap::kLinearSquareSigned4);
}

// One tensor's buffers, twice: "ref" stepped by adam_lowbit_step_ref, "multi" by the multi-tensor emulation.
struct Buffers {
  std::vector<float> p, g;
  std::vector<uint8_t> mc, vc;
  std::vector<float> ms, vs;
};

struct Case {
  int64_t n;
  Buffers ref, multi;
};

void init(Buffers& b, int64_t n, int64_t block, int bits, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  b.p.resize(n);
  b.g.resize(n);
  for (auto& x : b.p) x = nd(rng);
  const int64_t code_bytes = bits == 8 ? n : n / 2;
  b.mc.assign(code_bytes, 0);
  b.vc.assign(code_bytes, 0);
  b.ms.assign(n / block, 0.f);
  b.vs.assign(n / block, 0.f);
}

void run_case(int bits, int64_t block, const std::vector<int64_t>& blocks_per_tensor, float wd, int steps,
              bool lut = false) {
  SCOPED_TRACE("bits " + std::to_string(bits) + " block " + std::to_string(block) + " wd " + std::to_string(wd) +
               (lut ? " LUT" : ""));
  std::mt19937 rng(static_cast<uint32_t>(bits * 1000 + block + static_cast<int>(wd * 10)));
  float m_map[256], v_map[256], m_thresh[256], v_thresh[256];
  kernels::quant_map_build(bits == 8 ? QuantMap::kDynamicSigned8 : QuantMap::kDynamicSigned4, m_map);
  kernels::quant_map_build(bits == 8 ? QuantMap::kDynamicUnsigned8 : QuantMap::kLinearUnsigned4, v_map);
  kernels::adam_lowbit_code_thresholds(m_map, bits, m_thresh);
  kernels::adam_lowbit_code_thresholds(v_map, bits, v_thresh);
  std::vector<uint8_t> m_lut(2 * multi::kLutMaxRows * (1 << multi::kLutMantissaBits)), v_lut(m_lut.size());
  int m_elo = 0, m_rows = 0, v_elo = 0, v_rows = 0;
  if (lut) {
    ASSERT_TRUE(kernels::adam_lowbit_code_lut(m_map, bits, m_lut.data(), m_thresh, &m_elo, &m_rows));
    ASSERT_TRUE(kernels::adam_lowbit_code_lut(v_map, bits, v_lut.data(), v_thresh, &v_elo, &v_rows));
  }
  std::vector<Case> cases(blocks_per_tensor.size());
  for (size_t t = 0; t < cases.size(); ++t) {
    cases[t].n = blocks_per_tensor[t] * block;
    init(cases[t].ref, cases[t].n, block, bits, rng);
    cases[t].multi = cases[t].ref;
  }
  const float b1 = 0.9f, b2 = 0.95f;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> mag(-6.f, 0.f);
  for (int step = 1; step <= steps; ++step) {
    for (auto& c : cases) {
      // Gradients over several orders of magnitude, some exactly zero, so that codes span the maps.
      for (int64_t i = 0; i < c.n; ++i) {
        const float x = (i % 97 == 0) ? 0.f : nd(rng) * std::pow(10.f, mag(rng));
        c.ref.g[i] = c.multi.g[i] = x;
      }
    }
    kernels::AdamLowbitArgs a;
    a.block = block;
    a.bits = bits;
    a.lr = 1e-2f;
    a.beta1 = b1;
    a.beta2 = b2;
    a.eps = 1e-8f;
    a.weight_decay = wd;
    a.bias_correction1 = 1.f - std::pow(b1, static_cast<float>(step));
    a.bias_correction2 = 1.f - std::pow(b2, static_cast<float>(step));
    a.m_qmap = m_map;
    a.v_qmap = v_map;
    std::vector<kernels::AdamLowbitTensorDesc> descs;
    int64_t start = 0;
    for (auto& c : cases) {
      kernels::AdamLowbitArgs r = a;
      r.p = c.ref.p.data();
      r.g = c.ref.g.data();
      r.m_codes = c.ref.mc.data();
      r.m_scale = c.ref.ms.data();
      r.v_codes = c.ref.vc.data();
      r.v_scale = c.ref.vs.data();
      r.n = c.n;
      kernels::adam_lowbit_step_ref(r);
      kernels::AdamLowbitTensorDesc d;
      d.p = c.multi.p.data();
      d.g = c.multi.g.data();
      d.m_codes = c.multi.mc.data();
      d.m_scale = c.multi.ms.data();
      d.v_codes = c.multi.vc.data();
      d.v_scale = c.multi.vs.data();
      d.n = c.n;
      d.block_start = start;
      start += c.n / block;
      descs.push_back(d);
    }
    kernels::AdamLowbitMultiArgs ma;
    ma.tensors = descs.data();
    ma.num_tensors = static_cast<int64_t>(descs.size());
    ma.total_blocks = start;
    ma.m_qmap = m_map;
    ma.v_qmap = v_map;
    ma.m_thresh = m_thresh;
    ma.v_thresh = v_thresh;
    if (lut) {
      ma.m_lut = m_lut.data();
      ma.v_lut = v_lut.data();
      ma.m_lut_elo = m_elo;
      ma.m_lut_rows = m_rows;
      ma.v_lut_elo = v_elo;
      ma.v_lut_rows = v_rows;
    }
    ma.block = block;
    ma.bits = bits;
    ma.lr = a.lr;
    ma.beta1 = a.beta1;
    ma.beta2 = a.beta2;
    ma.eps = a.eps;
    ma.weight_decay = a.weight_decay;
    ma.bias_correction1 = a.bias_correction1;
    ma.bias_correction2 = a.bias_correction2;
    kernels::adam_lowbit_multi_step_emulated(ma);
    for (size_t t = 0; t < cases.size(); ++t) {
      const Case& c = cases[t];
      SCOPED_TRACE("step " + std::to_string(step) + " tensor " + std::to_string(t) + " n " + std::to_string(c.n));
      ASSERT_EQ(0, std::memcmp(c.ref.p.data(), c.multi.p.data(), c.n * sizeof(float))) << "parameters differ";
      ASSERT_EQ(c.ref.mc, c.multi.mc) << "m codes differ";
      ASSERT_EQ(c.ref.vc, c.multi.vc) << "v codes differ";
      ASSERT_EQ(0, std::memcmp(c.ref.ms.data(), c.multi.ms.data(), c.ref.ms.size() * sizeof(float))) << "m scales";
      ASSERT_EQ(0, std::memcmp(c.ref.vs.data(), c.multi.vs.data(), c.ref.vs.size() * sizeof(float))) << "v scales";
    }
  }
  // The codes moved off zero, i.e. the comparison above was not of untouched buffers.
  int64_t nonzero = 0;
  for (const auto& c : cases)
    for (uint8_t x : c.multi.mc) nonzero += x != 0;
  EXPECT_GT(nonzero, 0);
}

// Tensor sizes in quantization blocks: one block, a few, more than a thread block's 64 (kWarps * kRounds), and
// some not multiples of anything, so that tensors start and end inside thread blocks and warps.
const std::vector<int64_t> kMix = {1, 3, 1, 70, 2, 129, 1, 1, 17, 64, 5};

TEST(AdamLowbitMultiTest, EmulationMatchesPerTensorReference8bit) {
  for (bool lut : {true, false})
    for (int64_t block : {256, 128, 512})
      for (float wd : {0.1f, 0.f}) run_case(8, block, kMix, wd, 3, lut);
}

TEST(AdamLowbitMultiTest, EmulationMatchesPerTensorReference4bit) {
  for (int64_t block : {128, 256, 512})
    for (float wd : {0.1f, 0.f}) run_case(4, block, kMix, wd, 3);
}

TEST(AdamLowbitMultiTest, SingleTensorSingleBlock) {
  run_case(8, 256, {1}, 0.1f, 2, true);
  run_case(8, 256, {1}, 0.1f, 2, false);
  run_case(4, 128, {1}, 0.f, 2);
}

TEST(AdamLowbitMultiTest, SupportedBlockSizes) {
  for (int bits : {8, 4}) {
    EXPECT_TRUE(kernels::adam_lowbit_multi_supported(128, bits));
    EXPECT_TRUE(kernels::adam_lowbit_multi_supported(256, bits));
    EXPECT_TRUE(kernels::adam_lowbit_multi_supported(512, bits));
    EXPECT_FALSE(kernels::adam_lowbit_multi_supported(64, bits));
    EXPECT_FALSE(kernels::adam_lowbit_multi_supported(1024, bits));
    EXPECT_FALSE(kernels::adam_lowbit_multi_supported(96, bits));
  }
  EXPECT_FALSE(kernels::adam_lowbit_multi_supported(256, 2));
}

// AdamWLowBit::step_params with multi_tensor() on CPU: quantized tensors take the reference loop as before and
// the unquantized ones the _foreach form of step_param's torch ops, which on CPU runs the same per-tensor ops:
// every parameter and moment bit-identical to the per-tensor path, with two weight-decay groups and a parameter
// that skips a step (so two step counts in one group).
TEST(AdamLowbitMultiTest, OptimizerMultiTensorPathOnCpuMatchesPerTensorPath) {
  for (int bits : {8, 4}) {
    core::optim::OptimConfig cfg;
    cfg.lr = 1e-2;
    cfg.min_quant_numel = 128;
    auto make = [&] {
      torch::manual_seed(7);
      std::vector<core::optim::ParamGroup> g(2);
      g[0].weight_decay = 0.1;
      g[1].weight_decay = 0.0;
      for (auto s : std::vector<std::vector<int64_t>>{{64, 8}, {3, 100}, {256}, {16, 32}}) g[0].params.push_back(torch::randn(s));
      for (auto s : std::vector<std::vector<int64_t>>{{100}, {512}, {7, 9}}) g[1].params.push_back(torch::randn(s));
      g[0].params.push_back(torch::randn({40, 40}).t());  // non-contiguous, unquantized (1600 % block != 0 for 8-bit)
      return g;
    };
    auto ga = make(), gb = make();
    core::optim::AdamWLowBit a(ga, cfg, bits), b(gb, cfg, bits);
    a.set_multi_tensor(true);
    b.set_multi_tensor(false);
    for (int t = 1; t <= 4; ++t) {
      torch::manual_seed(100 + t);
      for (int64_t i = 0; i < a.num_params(); ++i) {
        const torch::Tensor grad = torch::randn(a.param(i).sizes());
        torch::Tensor pa = a.param(i), pb = b.param(i);
        pa.mutable_grad() = (t == 2 && i == 2) ? torch::Tensor() : grad;
        pb.mutable_grad() = (t == 2 && i == 2) ? torch::Tensor() : grad.clone();
      }
      a.step();
      b.step();
    }
    for (int64_t i = 0; i < a.num_params(); ++i) {
      EXPECT_TRUE(torch::equal(a.param(i), b.param(i))) << bits << "-bit param " << i;
      EXPECT_TRUE(torch::equal(a.exp_avg(i), b.exp_avg(i))) << bits << "-bit param " << i;
      EXPECT_TRUE(torch::equal(a.exp_avg_sq(i), b.exp_avg_sq(i))) << bits << "-bit param " << i;
      EXPECT_EQ(a.step_count(i), b.step_count(i));
    }
    EXPECT_GT((a.param(0) - make()[0].params[0]).abs().max().item<double>(), 0.0);
  }
}

}  // namespace
}  // namespace ablate
