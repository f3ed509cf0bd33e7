// AdamW, AdamW8bit and AdamW4bit against fp64 references written here, torchao test vectors, and state bytes.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <map>

#include "core/optim/adamw.h"
#include "tests/optim/optim_test_util.h"

namespace ablate {
namespace {

using core::optim::AdamW;
using core::optim::AdamWLowBit;
using core::optim::OptimConfig;
using core::optim::ParamGroup;
using namespace optim_test;

OptimConfig test_config() {
  OptimConfig c;
  c.lr = 1e-2;
  c.weight_decay = 0.1;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  return c;
}

// Decayed 2-D weights and undecayed vectors, as make_param_groups would split them.
std::vector<ParamGroup> groups_of(const std::vector<torch::Tensor>& decay, const std::vector<torch::Tensor>& no_decay,
                                  double wd) {
  return {ParamGroup{{}, decay, wd}, ParamGroup{{}, no_decay, 0.0}};
}

TEST(AdamWTest, MatchesFp64ReferenceOverThreeSteps) {
  torch::manual_seed(0);
  const OptimConfig cfg = test_config();
  torch::Tensor w = torch::randn({16, 24}).requires_grad_(), b = torch::randn({24}).requires_grad_();
  AdamW opt(groups_of({w}, {b}, cfg.weight_decay), cfg);
  // fp64 reference state.
  std::vector<torch::Tensor> rp = {w.detach().to(torch::kDouble), b.detach().to(torch::kDouble)};
  std::vector<torch::Tensor> rm = {torch::zeros_like(rp[0]), torch::zeros_like(rp[1])};
  std::vector<torch::Tensor> rv = {torch::zeros_like(rp[0]), torch::zeros_like(rp[1])};
  const double wds[2] = {cfg.weight_decay, 0.0};
  for (int t = 1; t <= 3; ++t) {
    std::vector<torch::Tensor> g = {torch::randn({16, 24}), torch::randn({24}) * 0.1};
    w.mutable_grad() = g[0].clone();
    b.mutable_grad() = g[1].clone();
    opt.step();
    for (int k = 0; k < 2; ++k) {
      const torch::Tensor gd = g[k].to(torch::kDouble);
      rp[k] = rp[k] * (1 - cfg.lr * wds[k]);
      rm[k] = cfg.beta1 * rm[k] + (1 - cfg.beta1) * gd;
      rv[k] = cfg.beta2 * rv[k] + (1 - cfg.beta2) * gd * gd;
      const double bc1 = 1 - std::pow(cfg.beta1, t), bc2 = 1 - std::pow(cfg.beta2, t);
      rp[k] = rp[k] - cfg.lr * (rm[k] / bc1) / ((rv[k] / bc2).sqrt() + cfg.eps);
    }
    EXPECT_LE(close_ratio(w, rp[0], 1e-6, 1e-5), 1.0) << "step " << t;
    EXPECT_LE(close_ratio(b, rp[1], 1e-6, 1e-5), 1.0) << "step " << t;
    EXPECT_LE(close_ratio(opt.exp_avg_sq(0), rv[0], 1e-9, 1e-5), 1.0) << "step " << t;
  }
  EXPECT_EQ(opt.step_count(0), 3);
}

// One low-bit step checked against fp64 math applied to the implementation's own dequantized state
// (so a rounding decision taken differently at an earlier step cannot accumulate). Codes must equal the
// brute-force nearest entries except where the normalized value is within 1e-5 of a decision midpoint.
void check_lowbit(int bits) {
  torch::manual_seed(bits);
  const OptimConfig cfg = test_config();
  torch::Tensor big = torch::randn({64, 128}).requires_grad_();   // quantized (8192 >= 4096, % block == 0)
  torch::Tensor small = torch::randn({16, 24}).requires_grad_();  // fp32 state (< 4096 elements)
  torch::Tensor vec = torch::randn({24}).requires_grad_();
  AdamWLowBit opt(groups_of({big, small}, {vec}, cfg.weight_decay), cfg, bits);
  ASSERT_TRUE(opt.is_quantized(0));
  ASSERT_FALSE(opt.is_quantized(1));
  ASSERT_FALSE(opt.is_quantized(2));
  const std::vector<double> qm = bits == 8 ? ref_dynamic_map(true, 7, 8) : ref_dynamic_map(true, 3, 4);
  const std::vector<double> qv = bits == 8 ? ref_dynamic_map(false, 7, 8) : ref_linear_unsigned4();
  const int64_t block = bits == 8 ? 256 : 128;
  EXPECT_EQ(opt.block_size(), block);
  std::vector<torch::Tensor> params = {big, small, vec};
  std::vector<torch::Tensor> rm(3), rv(3);
  for (int k = 1; k < 3; ++k) {
    rm[k] = torch::zeros(params[k].sizes(), torch::kDouble);
    rv[k] = torch::zeros(params[k].sizes(), torch::kDouble);
  }
  const double wds[3] = {cfg.weight_decay, cfg.weight_decay, 0.0};
  int64_t ambiguous = 0;
  for (int t = 1; t <= 3; ++t) {
    const torch::Tensor m0 = opt.exp_avg(0).to(torch::kDouble), v0 = opt.exp_avg_sq(0).to(torch::kDouble);
    if (t == 1) {
      EXPECT_TRUE(m0.eq(0).all().item<bool>());
    }
    std::vector<torch::Tensor> p0, g;
    for (auto& p : params) {
      p0.push_back(p.detach().to(torch::kDouble));
      g.push_back(torch::randn(p.sizes()) * 0.1);
      p.mutable_grad() = g.back().clone();
    }
    opt.step();
    const double bc1 = 1 - std::pow(cfg.beta1, t), bc2 = 1 - std::pow(cfg.beta2, t);
    for (int k = 0; k < 3; ++k) {
      const torch::Tensor gd = g[k].to(torch::kDouble);
      const torch::Tensor mo = k == 0 ? m0 : rm[k], vo = k == 0 ? v0 : rv[k];
      const torch::Tensor mn = mo + (1 - cfg.beta1) * (gd - mo), vn = vo + (1 - cfg.beta2) * (gd * gd - vo);
      const torch::Tensor pn = p0[k] * (1 - cfg.lr * wds[k]) - cfg.lr * (mn / bc1) / (vn.sqrt() / std::sqrt(bc2) + cfg.eps);
      EXPECT_LE(close_ratio(params[k], pn, 1e-6, 1e-5), 1.0) << bits << "-bit, param " << k << ", step " << t;
      if (k > 0) {
        rm[k] = mn;
        rv[k] = vn;
        continue;
      }
      // Re-quantization of the new moments.
      for (int which = 0; which < 2; ++which) {
        const std::vector<double> x = to_vec(which == 0 ? mn : vn);
        const std::vector<double>& q = which == 0 ? qm : qv;
        const RefQuant r = ref_quantize(x, block, q);
        const auto& st = which == 0 ? opt.exp_avg_quantized(0) : opt.exp_avg_sq_quantized(0);
        const std::vector<double> scale = to_vec(st.scale());
        const torch::Tensor codes_t = st.codes().to(torch::kInt);
        const int* codes = codes_t.data_ptr<int>();
        int64_t bad = 0;
        for (size_t b = 0; b < scale.size(); ++b)
          EXPECT_NEAR(scale[b], r.scale[b], 1e-5 * r.scale[b]) << "block " << b;
        for (size_t i = 0; i < x.size(); ++i) {
          const int got = bits == 8 ? codes[i] : ((i & 1) ? (codes[i >> 1] & 15) : (codes[i >> 1] >> 4));
          if (got == r.codes[i]) continue;
          const double xn = x[i] / r.scale[i / block];
          const double mid = (q[got] + q[r.codes[i]]) / 2;
          if (std::abs(got - r.codes[i]) == 1 && std::fabs(xn - mid) < 1e-5)
            ++ambiguous;
          else
            ++bad;
        }
        EXPECT_EQ(bad, 0) << bits << "-bit " << (which == 0 ? "m" : "v") << " codes differ from nearest entries, step " << t;
      }
    }
  }
  EXPECT_LE(ambiguous, 3) << "too many near-tie code differences";
}

TEST(AdamWLowBitTest, EightBitStepMatchesFp64ReferenceAndNearestCodes) { check_lowbit(8); }
TEST(AdamWLowBitTest, FourBitStepMatchesFp64ReferenceAndNearestCodes) { check_lowbit(4); }

TEST(AdamWLowBitTest, QuantizedTrajectoryStaysCloseToFp32AdamW) {
  torch::manual_seed(5);
  const OptimConfig cfg = test_config();
  for (int bits : {8, 4}) {
    torch::Tensor a = torch::randn({64, 128}).requires_grad_();
    torch::Tensor b = a.detach().clone().requires_grad_();
    const torch::Tensor start = a.detach().clone();
    AdamW ref({ParamGroup{{}, {a}, 0.0}}, cfg);
    AdamWLowBit low({ParamGroup{{}, {b}, 0.0}}, cfg, bits);
    for (int t = 0; t < 10; ++t) {
      const torch::Tensor g = torch::randn({64, 128});
      a.mutable_grad() = g.clone();
      b.mutable_grad() = g.clone();
      ref.step();
      low.step();
    }
    const torch::Tensor da = a.detach() - start, db = b.detach() - start;
    const double rel = ((da - db).norm() / da.norm()).item<double>();
    EXPECT_LT(rel, bits == 8 ? 0.05 : 0.2) << bits << "-bit trajectory drifted from fp32 AdamW";
    EXPECT_GT(rel, 0.0) << bits << "-bit path is identical to fp32: quantization is not happening";
  }
}

TEST(AdamWStateBytesTest, BytesPerParameterOnAOneMillionElementTensor) {
  const OptimConfig cfg = test_config();
  const int64_t n = 1024 * 1024;
  torch::Tensor p = torch::zeros({1024, 1024}).requires_grad_();
  AdamW a({ParamGroup{{}, {p}, 0.0}}, cfg);
  AdamWLowBit a8({ParamGroup{{}, {p}, 0.0}}, cfg, 8);
  AdamWLowBit a4({ParamGroup{{}, {p}, 0.0}}, cfg, 4);
  const double b32 = double(a.state_bytes()) / n, b8 = double(a8.state_bytes()) / n, b4 = double(a4.state_bytes()) / n;
  std::printf("state bytes per parameter: adamw %.5f, adamw8bit %.5f, adamw4bit %.5f\n", b32, b8, b4);
  EXPECT_EQ(a.state_bytes(), 8 * n + 8);
  EXPECT_EQ(a8.state_bytes(), 2 * n + 2 * (n / 256) * 4 + 8);
  EXPECT_EQ(a4.state_bytes(), n + 2 * (n / 128) * 4 + 8);
  EXPECT_LE(b8, 2.1);
  EXPECT_LE(b4, 1.1);
}

// ------------------------------------------------------------------------------- torchao test vectors

std::map<std::string, torch::Tensor> read_vectors(const std::string& path) {
  std::map<std::string, torch::Tensor> out;
  std::ifstream f(path, std::ios::binary);
  uint32_t name_len;
  while (f.read(reinterpret_cast<char*>(&name_len), 4)) {
    std::string name(name_len, '\0');
    f.read(name.data(), name_len);
    uint32_t dtype, ndim;
    f.read(reinterpret_cast<char*>(&dtype), 4);
    f.read(reinterpret_cast<char*>(&ndim), 4);
    std::vector<int64_t> dims(ndim);
    f.read(reinterpret_cast<char*>(dims.data()), 8 * ndim);
    torch::Tensor t = torch::empty(dims, dtype == 0 ? torch::kFloat : torch::kUInt8);
    f.read(static_cast<char*>(t.data_ptr()), t.nbytes());
    TORCH_CHECK(f, "truncated test vector file ", path, " at record ", name);
    out[name] = t;
  }
  return out;
}

void check_torchao(int bits) {
  const std::string path = std::string(ABLATE_OPTIM_TEST_DATA) + "/torchao_adamw" + std::to_string(bits) + "bit.bin";
  if (!std::ifstream(path).good())
    GTEST_SKIP() << path << " not found; generate it with tests/optim/make_torchao_vectors.py (needs torchao)";
  auto v = read_vectors(path);
  std::vector<torch::Tensor> params;
  for (int i = 0; i < 3; ++i) params.push_back(v.at("init." + std::to_string(i)).clone().requires_grad_());
  OptimConfig cfg = test_config();
  AdamWLowBit opt(groups_of({params[0], params[1]}, {params[2]}, 0.1), cfg, bits);
  ASSERT_TRUE(opt.is_quantized(0));
  ASSERT_FALSE(opt.is_quantized(1));
  EXPECT_TRUE(torch::equal(opt.exp_avg_quantized(0).qmap(), v.at("exp_avg.qmap"))) << "signed qmap differs from torchao";
  EXPECT_TRUE(torch::equal(opt.exp_avg_sq_quantized(0).qmap(), v.at("exp_avg_sq.qmap")))
      << "unsigned qmap differs from torchao";
  for (int k = 0; k < 2; ++k) {
    for (int i = 0; i < 3; ++i) params[i].mutable_grad() = v.at("grad." + std::to_string(k) + "." + std::to_string(i));
    opt.step();
    for (int i = 0; i < 3; ++i) {
      const torch::Tensor expect = v.at("param." + std::to_string(k) + "." + std::to_string(i));
      const double err = (params[i].detach() - expect).abs().max().item<double>();
      EXPECT_LE(err, 1e-5) << bits << "-bit step " << k << " param " << i << " max abs diff " << err;
    }
    for (const std::string key : {"exp_avg", "exp_avg_sq"}) {
      const auto& q = key == "exp_avg" ? opt.exp_avg_quantized(0) : opt.exp_avg_sq_quantized(0);
      const torch::Tensor codes = v.at(key + ".codes." + std::to_string(k)).view(-1);
      const int64_t differ = q.codes().ne(codes).sum().item<int64_t>();
      EXPECT_LE(differ, 2) << key << " codes differing from torchao at step " << k;
      EXPECT_LE(close_ratio(q.scale(), v.at(key + ".scale." + std::to_string(k)), 0, 1e-5), 1.0) << key << " scales";
    }
  }
}

TEST(AdamWTorchaoVectorsTest, EightBitMatchesTorchaoWithin1e5) { check_torchao(8); }
TEST(AdamWTorchaoVectorsTest, FourBitMatchesTorchaoWithin1e5) { check_torchao(4); }

}  // namespace
}  // namespace ablate
