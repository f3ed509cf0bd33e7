// Causal depthwise conv1d (+ SiLU) on CPU: the C++ reference of the fused kernels (kernels/causal_conv1d_ref.cpp)
// against the LibTorch composite of core/mixers/short_conv.h (causal_conv1d + silu, autograd for the gradients) run in
// fp64 on the same fp32 inputs; the layout of the per-range weight-gradient partials; bad arguments; and ShortConv on
// CPU (always the composite, whatever the fused switch says). The CUDA kernels: causal_conv1d_gpu_test.cpp.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "core/mixers/short_conv.h"
#include "kernels/causal_conv1d.h"
#include "tests/mixers/causal_conv1d_cases.h"
#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::rel_err;
using torch::Tensor;

constexpr double kEps = std::numeric_limits<float>::epsilon();

using conv_test::Case;
using conv_test::shape_of;

const Case kCases[] = {
    {2, 37, 5, 4, true, true},     // Mamba2-like: bias and SiLU
    {2, 3, 7, 4, true, true},      // T < W: every output sees the zero padding
    {2, 1, 3, 2, false, true},     // a single step
    {2, 130, 9, 5, true, false},   // three ranges per row, the last one short; no SiLU
    {2, 64, 3, 1, true, true},     // W = 1: a per-channel scale
    {2, 100, 11, 2, false, true},  // GDN-like: no bias
    {1, 200, 13, 8, true, true},   // the widest kernel the CUDA path takes
    {2, 70, 5, 9, false, true},    // wider than the CUDA kernels: the reference takes any W
};

struct Inputs {
  Tensor x, w, b, dy;  // fp32: x, dy (B,T,C); w (C,W); b (C) or undefined
};

Inputs make_inputs(const Case& c, uint64_t seed) {
  torch::manual_seed(seed);
  Inputs in;
  in.x = torch::randn({c.B, c.T, c.C});
  in.w = torch::randn({c.C, c.W}) / std::sqrt(double(c.W));
  if (c.bias) in.b = 0.5 * torch::randn({c.C});
  in.dy = torch::randn({c.B, c.T, c.C});
  return in;
}

Tensor ref_forward(const Case& c, const Inputs& in) {
  auto y = torch::full({c.B, c.T, c.C}, std::numeric_limits<float>::quiet_NaN());
  kernels::CausalConv1dFwdArgs a;
  a.s = shape_of(c);
  a.x = in.x.data_ptr();
  a.w = in.w.data_ptr<float>();
  a.bias = in.b.defined() ? in.b.data_ptr<float>() : nullptr;
  a.y = y.data_ptr();
  EXPECT_TRUE(kernels::causal_conv1d_fwd_ref(a));
  return y;
}

// dx (B,T,C) and the per-range partials dwb (ranges, C, W+1).
std::pair<Tensor, Tensor> ref_backward(const Case& c, const Inputs& in) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto dx = torch::full({c.B, c.T, c.C}, nan);
  auto dwb = torch::full({kernels::causal_conv1d_num_ranges(c.B, c.T), c.C, c.W + 1}, nan);
  kernels::CausalConv1dBwdArgs a;
  a.s = shape_of(c);
  a.x = in.x.data_ptr();
  a.w = in.w.data_ptr<float>();
  a.bias = in.b.defined() ? in.b.data_ptr<float>() : nullptr;
  a.dy = in.dy.data_ptr();
  a.dx = dx.data_ptr();
  a.dwb = dwb.data_ptr<float>();
  EXPECT_TRUE(kernels::causal_conv1d_bwd_ref(a));
  return {dx, dwb};
}

// The composite in fp64 on the fp32 inputs, weight in the module's (C,1,W) layout: y and the gradients of <y, dy>
// with respect to x, w (as (C,W)) and b. Without a bias it runs with a zero one (the same y), whose gradient is what
// the reference writes to the bias slot anyway.
struct CompositeRun {
  Tensor y, dx, dw, db;
};

CompositeRun composite_fp64(const Case& c, const Inputs& in, const Tensor& dy) {
  const auto d = [](const Tensor& t) { return t.defined() ? t.to(torch::kFloat64) : t; };
  const auto dy64 = d(dy);
  const auto f = [&](const std::vector<Tensor>& v) {
    return testing::weighted_sum(causal_conv1d_silu(v[0], v[1], v[2], c.silu, /*use_kernel=*/false), dy64);
  };
  const std::vector<Tensor> inputs = {d(in.x), d(in.w).reshape({c.C, 1, c.W}),
                                      in.b.defined() ? d(in.b) : torch::zeros({c.C}, torch::kFloat64)};
  CompositeRun r;
  {
    torch::NoGradGuard ng;
    r.y = causal_conv1d_silu(inputs[0], inputs[1], inputs[2], c.silu, false);
  }
  const auto g = testing::grads_of(f, inputs);
  r.dx = g[0];
  r.dw = g[1].reshape({c.C, c.W});
  r.db = g[2];
  return r;
}

// Relative (Frobenius) bounds from fp32 rounding: a sum of n fp32 terms is off by about eps sqrt(n) of its size for
// random data; 8 eps per term bounds it with room for the SiLU and for cancellation in a few outputs.
double fp32_bound(double terms) { return 8 * kEps * terms; }

TEST(CausalConv1dRef, MatchesCompositeForwardAndBackward) {
  for (const auto& c : kCases) {
    const auto in = make_inputs(c, 100 + c.T + c.W);
    const auto y = ref_forward(c, in);
    const auto [dx, dwb] = ref_backward(c, in);
    const auto ref = composite_fp64(c, in, in.dy);
    ASSERT_TRUE(torch::isfinite(y).all().item<bool>()) << "unwritten outputs";
    ASSERT_TRUE(torch::isfinite(dx).all().item<bool>() && torch::isfinite(dwb).all().item<bool>());
    const auto sums = dwb.to(torch::kFloat64).sum(0);  // (C, W+1)
    const double e_y = rel_err(y, ref.y), e_dx = rel_err(dx, ref.dx);
    const double e_dw = rel_err(sums.narrow(1, 0, c.W), ref.dw);
    const double e_db = rel_err(sums.select(1, c.W), ref.db);
    std::printf("[ error ] B%ld T%ld C%ld W%ld%s%s: y %.1e dx %.1e dw %.1e db %.1e\n", long(c.B), long(c.T), long(c.C),
                long(c.W), c.bias ? " bias" : "", c.silu ? " silu" : "", e_y, e_dx, e_dw, e_db);
    const double range = double(std::min<int64_t>(c.T, kernels::kCausalConv1dTimeRange));
    EXPECT_LT(e_y, fp32_bound(c.W + 2)) << "y";      // W + 1 terms, then the SiLU
    EXPECT_LT(e_dx, fp32_bound(c.W + 3)) << "dx";    // W terms of dz, each through silu'
    EXPECT_LT(e_dw, fp32_bound(range + 2)) << "dw";  // fp32 sums over a range (the ranges then in fp64)
    EXPECT_LT(e_db, fp32_bound(range + 2)) << "dbias";
  }
}

// Row r of the partials is the gradient of <y, dy> with dy cut to range r's time steps (b, [t0, t0 + 64)).
TEST(CausalConv1dRef, PartialsAreTheSumsOverEachRange) {
  const Case c{2, 150, 3, 4, true, true};
  const auto in = make_inputs(c, 7);
  const auto [dx, dwb] = ref_backward(c, in);
  const int64_t per_row = kernels::causal_conv1d_num_ranges(1, c.T);
  ASSERT_EQ(per_row, 3);
  ASSERT_EQ(dwb.size(0), c.B * per_row);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t k = 0; k < per_row; ++k) {
      const int64_t t0 = k * kernels::kCausalConv1dTimeRange;
      const int64_t t1 = std::min(c.T, t0 + kernels::kCausalConv1dTimeRange);
      auto mask = torch::zeros_like(in.dy);
      mask.select(0, b).narrow(0, t0, t1 - t0).fill_(1.f);
      const auto ref = composite_fp64(c, in, in.dy * mask);
      const auto row = dwb[b * per_row + k];
      const double e_w = rel_err(row.narrow(1, 0, c.W), ref.dw), e_b = rel_err(row.select(1, c.W), ref.db);
      EXPECT_LT(e_w, fp32_bound(t1 - t0 + 2)) << "range " << k << " of row " << b;
      EXPECT_LT(e_b, fp32_bound(t1 - t0 + 2)) << "range " << k << " of row " << b;
    }
}

TEST(CausalConv1dRef, NumRanges) {
  EXPECT_EQ(kernels::causal_conv1d_num_ranges(1, 32768), 512);
  EXPECT_EQ(kernels::causal_conv1d_num_ranges(2, 65), 4);
  EXPECT_EQ(kernels::causal_conv1d_num_ranges(3, 1), 3);
  EXPECT_EQ(kernels::causal_conv1d_num_ranges(3, 0), 0);
  EXPECT_EQ(kernels::causal_conv1d_num_ranges(0, 100), 0);
}

TEST(CausalConv1dRef, RefusesBadArguments) {
  const Case c{1, 5, 3, 2, false, true};
  auto in = make_inputs(c, 3);
  auto y = torch::empty({1, 5, 3});
  kernels::CausalConv1dFwdArgs a;
  a.s = shape_of(c);
  a.x = in.x.data_ptr();
  a.w = in.w.data_ptr<float>();
  a.y = y.data_ptr();
  auto bad = a;
  bad.s.dtype = kernels::NsaDtype::kBF16;  // the reference is fp32 only
  EXPECT_FALSE(kernels::causal_conv1d_fwd_ref(bad));
  bad = a;
  bad.s.W = 0;
  EXPECT_FALSE(kernels::causal_conv1d_fwd_ref(bad));
  bad = a;
  bad.s.T = -1;
  EXPECT_FALSE(kernels::causal_conv1d_fwd_ref(bad));
  bad = a;
  bad.x = nullptr;
  EXPECT_FALSE(kernels::causal_conv1d_fwd_ref(bad));
  kernels::CausalConv1dBwdArgs bb;
  bb.s = a.s;
  bb.x = a.x;
  bb.w = a.w;
  bb.dy = in.dy.data_ptr();
  bb.dx = y.data_ptr();  // no dwb
  EXPECT_FALSE(kernels::causal_conv1d_bwd_ref(bb));
  // Empty sizes are fine and touch nothing.
  a.s.T = 0;
  EXPECT_TRUE(kernels::causal_conv1d_fwd_ref(a));
}

TEST(CausalConv1d, OpRefusesBadArguments) {
  const auto x = torch::randn({2, 6, 4});
  const auto w = torch::randn({4, 1, 3});
  EXPECT_THROW(causal_conv1d_silu(x.flatten(0, 1), w, Tensor(), true, false), c10::Error);          // x not (B,T,C)
  EXPECT_THROW(causal_conv1d_silu(x, torch::randn({5, 1, 3}), Tensor(), true, false), c10::Error);  // C mismatch
  EXPECT_THROW(causal_conv1d_silu(x, torch::randn({4, 2, 3}), Tensor(), true, false), c10::Error);  // not depthwise
  EXPECT_THROW(causal_conv1d_silu(x, w, torch::randn({5}), true, false), c10::Error);               // bias size
  EXPECT_THROW(causal_conv1d(x, torch::randn({4}), Tensor()), c10::Error);                          // 1-D weight
  // The fused kernel never takes CPU tensors (nor anything in a build without CUDA).
  EXPECT_FALSE(causal_conv1d_kernel_applies(x, 3));
  EXPECT_THROW(causal_conv1d_silu(x, w, Tensor(), true, /*use_kernel=*/true), c10::Error);
  // (C,W) and (C,1,W) weights are the same conv.
  EXPECT_TRUE(torch::allclose(causal_conv1d(x, w), causal_conv1d(x, w.squeeze(1))));
}

// On CPU ShortConv is the composite, bit for bit, whether or not the fused switch is on.
TEST(CausalConv1d, ShortConvOnCpuIsTheComposite) {
  const bool prev = short_conv_fused_enabled();
  torch::manual_seed(5);
  for (bool bias : {false, true}) {
    ShortConv m(ShortConvOptions(6, 4).bias(bias).silu(true));
    const auto x = torch::randn({2, 9, 6});
    const auto want = torch::silu(causal_conv1d(x, m->weight, m->bias));
    for (bool on : {true, false}) {
      short_conv_set_fused_enabled(on);
      const auto before = short_conv_fused_calls();
      EXPECT_TRUE(torch::equal(m->forward(x), want)) << "bias " << bias << " switch " << on;
      EXPECT_EQ(short_conv_fused_calls(), before);
    }
  }
  short_conv_set_fused_enabled(prev);
}

}  // namespace
}  // namespace ablate::core
