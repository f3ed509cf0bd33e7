// Causal depthwise conv1d (+ SiLU) on the GPU: the fused CUDA kernels (kernels/causal_conv1d_cuda.cu).
// 1. The raw kernels against the C++ reference (kernels/causal_conv1d_ref.cpp) on the same inputs, outputs (y, dx and
//    the per-range weight/bias partials) poisoned with NaN so unwritten elements show: every width 1..8, T not a
//    multiple of the 64-step range and T < W, C not a multiple of the 128-channel block (odd, and even: the
//    channel-pair path of 16-bit data), bias and SiLU on and off; fp32 data tight, bf16/fp16 data (the reference on
//    the rounded values) within the output rounding; refused widths and missing pointers.
// 2. The autograd op (causal_conv1d_silu with use_kernel) against the LibTorch composite in fp64 on the GPU, for fp32
//    and bf16 inputs (also a non-contiguous x, as Mamba2 hands it over): y and every gradient, dtypes and layout;
//    bf16 also no worse than twice the bf16 composite's own error.
// 3. ShortConv with the fused switch on and off: outputs and gradients agree (fp32, bf16, fp32 under bf16 autocast).
// 4. TimingShortConv32K: B=1, T=32768, C=2048, W=4, bf16, SiLU; fused vs composite, forward and forward+backward.
// Label gpu: skips without a device or without ABLATE_WITH_CUDA.
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/mixers/short_conv.h"
#include "kernels/causal_conv1d.h"
#include "tests/mixers/causal_conv1d_cases.h"
#include "tests/mixers/mixer_test_util.h"
#include "tests/cuda_timing.h"
#include "tests/require_cuda.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace ablate::core {
namespace {

#if ABLATE_WITH_CUDA

using testing::rel_err;
using torch::Tensor;

const torch::Device kCuda(torch::kCUDA);
constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();
constexpr double kEpsBf16 = 1.0 / 256;  // 2^-8
constexpr double kEpsF16 = 1.0 / 1024;  // 2^-10

// Relative (Frobenius) bound for fp32 sums of n terms (see causal_conv1d_test.cpp).
double fp32_bound(double terms) { return 8 * kEpsF32 * terms; }

bool all_finite(const Tensor& t) { return torch::isfinite(t).all().item<bool>(); }

const char* dtype_name(torch::Dtype d) {
  return d == torch::kFloat ? "fp32" : d == torch::kBFloat16 ? "bf16" : d == torch::kHalf ? "fp16" : "fp64";
}

kernels::NsaDtype kdtype(torch::Dtype t) {
  return t == torch::kBFloat16 ? kernels::NsaDtype::kBF16
         : t == torch::kHalf   ? kernels::NsaDtype::kF16
                               : kernels::NsaDtype::kF32;
}

struct FusedSwitch {
  explicit FusedSwitch(bool on) : prev(short_conv_fused_enabled()) { short_conv_set_fused_enabled(on); }
  ~FusedSwitch() { short_conv_set_fused_enabled(prev); }
  bool prev;
};

using conv_test::Case;
using conv_test::case_name;
using conv_test::shape_of;

using ablate::gpu_test::median_cuda_ms;

// ------------------------------------------------------------------------------------------ 1. raw kernels
TEST(CausalConv1dGpu, RawKernelsMatchReference) {
  ABLATE_REQUIRE_CUDA();
  std::vector<Case> cases;
  // Every width, C even but not a multiple of the block.
  for (int64_t W = 1; W <= 8; ++W) cases.push_back({2, 200, 300, W, W % 2 == 0, W != 3});
  cases.push_back({1, 3, 131, 4, true, true});    // T < W, C odd
  cases.push_back({3, 64, 257, 3, false, true});  // exactly one range per row
  cases.push_back({2, 129, 2, 5, true, true});    // one step into the third range; a tiny C
  cases.push_back({2, 1, 128, 8, true, false});   // a single step, wider window than the sequence
  cases.push_back({1, 1000, 33, 2, true, true});  // many ranges
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& c : cases) {
    for (const auto dt : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      torch::manual_seed(31 + c.T + c.W);
      // The reference reads the dtype-rounded values in fp32.
      const auto x = torch::randn({c.B, c.T, c.C}).to(dt).to(torch::kFloat);
      const auto dy = torch::randn({c.B, c.T, c.C}).to(dt).to(torch::kFloat);
      const auto w = torch::randn({c.C, c.W}) / std::sqrt(double(c.W));
      const auto b = c.bias ? 0.5 * torch::randn({c.C}) : Tensor();
      kernels::CausalConv1dShape s = shape_of(c);
      const int64_t R = kernels::causal_conv1d_num_ranges(c.B, c.T);
      auto y_ref = torch::full_like(x, nan), dx_ref = torch::full_like(x, nan);
      auto dwb_ref = torch::full({R, c.C, c.W + 1}, nan);
      ASSERT_TRUE(kernels::causal_conv1d_fwd_ref(
          {s, x.data_ptr(), w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr, y_ref.data_ptr()}));
      ASSERT_TRUE(kernels::causal_conv1d_bwd_ref({s, x.data_ptr(), w.data_ptr<float>(),
                                                  b.defined() ? b.data_ptr<float>() : nullptr, dy.data_ptr(),
                                                  dx_ref.data_ptr(), dwb_ref.data_ptr<float>()}));
      // The kernels on the same values in dt.
      s.dtype = kdtype(dt);
      const auto xg = x.to(kCuda, dt), dyg = dy.to(kCuda, dt), wg = w.to(kCuda);
      const auto bg = b.defined() ? b.to(kCuda) : Tensor();
      auto y = torch::full(x.sizes(), nan, xg.options()), dx = torch::full(x.sizes(), nan, xg.options());
      auto dwb = torch::full({R, c.C, c.W + 1}, nan, wg.options());
      const float* bp = bg.defined() ? bg.data_ptr<float>() : nullptr;
      auto e = kernels::causal_conv1d_fwd_cuda({s, xg.data_ptr(), wg.data_ptr<float>(), bp, y.data_ptr()}, stream);
      ASSERT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
      e = kernels::causal_conv1d_bwd_cuda(
          {s, xg.data_ptr(), wg.data_ptr<float>(), bp, dyg.data_ptr(), dx.data_ptr(), dwb.data_ptr<float>()}, stream);
      ASSERT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      EXPECT_TRUE(all_finite(y) && all_finite(dx) && all_finite(dwb))
          << case_name(c) << " " << dtype_name(dt) << ": unwritten outputs";
      const double e_y = rel_err(y.cpu(), y_ref), e_dx = rel_err(dx.cpu(), dx_ref), e_w = rel_err(dwb.cpu(), dwb_ref);
      std::printf("[ error ] %-28s %s: y %.1e dx %.1e partials %.1e\n", case_name(c).c_str(), dtype_name(dt), e_y, e_dx,
                  e_w);
      // fp32 data: the same fp32 math (FMA contraction aside). 16-bit data: y and dx are rounded to dt once; the
      // partials are fp32 sums of the same products either way.
      const double out_tol = dt == torch::kFloat ? fp32_bound(c.W + 3) : dt == torch::kBFloat16 ? kEpsBf16 : kEpsF16;
      const double range = double(std::min<int64_t>(c.T, kernels::kCausalConv1dTimeRange));
      EXPECT_LT(e_y, out_tol) << case_name(c) << " " << dtype_name(dt) << ": y";
      EXPECT_LT(e_dx, out_tol) << case_name(c) << " " << dtype_name(dt) << ": dx";
      EXPECT_LT(e_w, fp32_bound(range + 2)) << case_name(c) << " " << dtype_name(dt) << ": dw/dbias partials";
    }
  }
  // Refused: widths outside 1..8 and missing pointers come back as cudaErrorInvalidValue, not a launch.
  kernels::CausalConv1dFwdArgs bad;
  bad.s.B = 1;
  bad.s.T = 4;
  bad.s.C = 8;
  for (int64_t W : {0, 9}) {
    bad.s.W = W;
    EXPECT_EQ(kernels::causal_conv1d_fwd_cuda(bad, stream), cudaErrorInvalidValue) << "W " << W;
    kernels::CausalConv1dBwdArgs bb;
    bb.s = bad.s;
    EXPECT_EQ(kernels::causal_conv1d_bwd_cuda(bb, stream), cudaErrorInvalidValue) << "W " << W;
  }
  bad.s.W = 4;  // a valid width, but no pointers
  EXPECT_EQ(kernels::causal_conv1d_fwd_cuda(bad, stream), cudaErrorInvalidValue);
  bad.s.T = 0;  // nothing to do: no launch, no error
  EXPECT_EQ(kernels::causal_conv1d_fwd_cuda(bad, stream), cudaSuccess);
}

// ------------------------------------------------------------------------------------------ 2. the autograd op
TEST(CausalConv1dGpu, OpMatchesCompositeFp64) {
  ABLATE_REQUIRE_CUDA();
  const Case cases[] = {{2, 300, 100, 4, true, true},
                        {1, 77, 64, 3, false, true},
                        {2, 5, 33, 8, true, false},
                        {1, 130, 130, 1, true, true}};
  for (const auto& c : cases) {
    for (const auto dt : {torch::kFloat, torch::kBFloat16}) {
      for (bool strided : {false, true}) {
        torch::manual_seed(71 + c.T + c.W);
        auto o64 = torch::TensorOptions().dtype(torch::kFloat64).device(kCuda);
        // x (and the loss weights g) as dt can hold them; x strided: a slice of wider rows, as in Mamba2.
        const auto wide = torch::randn({c.B, c.T, c.C + 7}, o64).to(dt);
        const auto x_in = strided ? wide.narrow(2, 3, c.C) : wide.narrow(2, 0, c.C).contiguous();
        const auto g = torch::randn({c.B, c.T, c.C}, o64).to(dt).to(torch::kFloat64);
        const auto w = (torch::randn({c.C, 1, c.W}, o64) / std::sqrt(double(c.W))).to(torch::kFloat);
        const auto b = c.bias ? (0.5 * torch::randn({c.C}, o64)).to(torch::kFloat) : Tensor();
        auto run = [&](const Tensor& x0, const Tensor& w0, const Tensor& b0, bool kernel) {
          auto x = x0.detach().requires_grad_(true), wl = w0.detach().requires_grad_(true);
          auto bl = b0.defined() ? b0.detach().requires_grad_(true) : Tensor();
          const auto y = causal_conv1d_silu(x, wl, bl, c.silu, kernel);
          (y.to(torch::kFloat64) * g).sum().backward();
          return std::vector<Tensor>{y.detach(), x.grad(), wl.grad(), bl.defined() ? bl.grad() : Tensor()};
        };
        const auto d = [](const Tensor& t) { return t.defined() ? t.to(torch::kFloat64) : t; };
        const auto before = short_conv_fused_calls();
        const auto k = run(x_in, w, b, true);
        EXPECT_EQ(short_conv_fused_calls(), before + 1);
        const auto r = run(d(x_in), d(w), d(b), false);
        // bf16: the LibTorch composite in the same dtype, whose own error bounds ours (issue 6, acceptance 1).
        const auto comp = dt == torch::kFloat ? std::vector<Tensor>{} : run(x_in, w, b, false);
        // Layout and dtypes: y contiguous (B,T,C) in x's dtype, gradients in their inputs' dtypes and shapes.
        EXPECT_TRUE(k[0].is_contiguous());
        EXPECT_EQ(k[0].scalar_type(), dt);
        EXPECT_EQ(k[1].scalar_type(), dt);
        EXPECT_EQ(k[2].scalar_type(), torch::kFloat);
        EXPECT_EQ(k[2].sizes(), w.sizes());
        const double range = double(std::min<int64_t>(c.T, kernels::kCausalConv1dTimeRange));
        const double ranges = double(kernels::causal_conv1d_num_ranges(c.B, c.T));
        // fp32: fp32 sums (dw: over a range, then over the ranges); bf16: y and dx are rounded to bf16, dw/db are
        // fp32 sums of exact products of bf16 data.
        const double tol[4] = {dt == torch::kFloat ? fp32_bound(c.W + 2) : kEpsBf16,
                               dt == torch::kFloat ? fp32_bound(c.W + 3) : kEpsBf16,
                               dt == torch::kFloat ? fp32_bound(range + ranges + 2) : kEpsBf16,
                               dt == torch::kFloat ? fp32_bound(range + ranges + 2) : kEpsBf16};
        const char* names[4] = {"y", "dx", "dw", "dbias"};
        std::string line;
        for (int i = 0; i < 4; ++i) {
          if (!r[i].defined()) continue;
          const double e = rel_err(k[i], r[i]);
          char buf[64];
          std::snprintf(buf, sizeof buf, " %s %.1e", names[i], e);
          line += buf;
          EXPECT_LT(e, tol[i]) << case_name(c) << " " << dtype_name(dt) << (strided ? " strided" : "") << ": "
                               << names[i];
          if (!comp.empty()) {
            // No worse than twice the composite's error, with a floor at fp32 noise (our dw/dbias are fp32 sums).
            const double ec = rel_err(comp[i], r[i]);
            std::snprintf(buf, sizeof buf, " (composite %.1e)", ec);
            line += buf;
            EXPECT_LE(e, 2 * ec + fp32_bound(range + ranges + 2))
                << case_name(c) << " " << dtype_name(dt) << (strided ? " strided" : "") << ": " << names[i]
                << " error " << e << " vs the bf16 composite's " << ec;
          }
        }
        std::printf("[ error ] op vs fp64 composite, %-26s %s%s:%s\n", case_name(c).c_str(), dtype_name(dt),
                    strided ? " strided x" : "", line.c_str());
      }
    }
  }
  // Where the kernel does not apply, asking for it is an error: fp64, and widths beyond 8.
  const auto x = torch::randn({1, 8, 4}, torch::TensorOptions().device(kCuda));
  EXPECT_THROW(causal_conv1d_silu(x.to(torch::kFloat64), torch::randn({4, 1, 3}, x.options().dtype(torch::kFloat64)),
                                  Tensor(), true, true),
               c10::Error);
  EXPECT_FALSE(causal_conv1d_kernel_applies(x, 9));
  EXPECT_THROW(causal_conv1d_silu(x, torch::randn({4, 1, 9}, x.options()), Tensor(), true, true), c10::Error);
}

// ------------------------------------------------------------------------------------------ 3. the module
enum class Mode { kFp32, kBf16, kAutocastBf16 };

TEST(CausalConv1dGpu, ShortConvFusedMatchesComposite) {
  ABLATE_REQUIRE_CUDA();
  const std::vector<std::pair<Mode, const char*>> modes = {
      {Mode::kFp32, "fp32"}, {Mode::kBf16, "bf16"}, {Mode::kAutocastBf16, "fp32 + bf16 autocast"}};
  for (bool bias : {false, true}) {
    for (const auto& mode_and_name : modes) {
      const Mode mode = mode_and_name.first;  // (lambdas below may not capture structured bindings in C++17)
      const char* mode_name = mode_and_name.second;
      torch::manual_seed(bias ? 3 : 4);
      ShortConv m(ShortConvOptions(96, 4).bias(bias).silu(true));
      m->to(kCuda);
      const auto x0 = torch::randn({2, 333, 96}, torch::TensorOptions().device(kCuda))
                          .to(mode == Mode::kBf16 ? torch::kBFloat16 : torch::kFloat);
      const auto g = torch::randn({2, 333, 96}, x0.options().dtype(torch::kFloat64));
      auto run = [&](bool fused) {
        FusedSwitch sw(fused);
        m->zero_grad();
        auto x = x0.detach().requires_grad_(true);
        if (mode == Mode::kAutocastBf16) {
          at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
          at::autocast::set_autocast_enabled(at::kCUDA, true);
        }
        const auto before = short_conv_fused_calls();
        const auto y = m->forward(x);
        at::autocast::set_autocast_enabled(at::kCUDA, false);
        at::autocast::clear_cache();
        EXPECT_EQ(short_conv_fused_calls(), before + (fused ? 1 : 0)) << mode_name << ": which path ran";
        (y.to(torch::kFloat64) * g).sum().backward();
        return std::vector<Tensor>{y.detach(), x.grad(), m->weight.grad(), bias ? m->bias.grad() : Tensor()};
      };
      const auto on = run(true), off = run(false);
      EXPECT_EQ(on[0].scalar_type(), off[0].scalar_type()) << mode_name << ": output dtype";
      EXPECT_EQ(on[1].scalar_type(), off[1].scalar_type()) << mode_name << ": dx dtype";
      // fp32: the composite's conv may run in TF32 (cuDNN's default), so 2^-10 rather than fp32 noise. bf16: each
      // path is within bf16 rounding (2^-8) of the exact result; the composite also rounds the weight to bf16.
      const double tol = mode == Mode::kFp32 ? 1.0 / 1024 : 2 * kEpsBf16;
      const char* names[4] = {"y", "dx", "dw", "dbias"};
      std::string line;
      for (int i = 0; i < 4; ++i) {
        if (!on[i].defined()) continue;
        const double e = rel_err(on[i], off[i]);
        char buf[48];
        std::snprintf(buf, sizeof buf, " %s %.1e", names[i], e);
        line += buf;
        EXPECT_LT(e, tol) << mode_name << (bias ? " bias" : "") << ": " << names[i];
      }
      std::printf("[ error ] ShortConv fused vs composite, %s%s:%s\n", mode_name, bias ? ", bias" : "", line.c_str());
    }
  }
}

// ------------------------------------------------------------------------------------------ 4. timing
TEST(CausalConv1dGpu, TimingShortConv32K) {
  ABLATE_REQUIRE_CUDA();
  const int64_t B = 1, T = 32768, C = 2048, W = 4;
  for (bool bias : {false, true}) {
    torch::manual_seed(9);
    ShortConv m(ShortConvOptions(C, W).bias(bias).silu(true));
    m->to(kCuda);
    const auto x0 = torch::randn({B, T, C}, torch::TensorOptions().device(kCuda).dtype(torch::kBFloat16));
    const auto g = torch::randn({B, T, C}, x0.options());
    auto x = x0.detach().requires_grad_(true);
    auto fwd = [&] {
      torch::NoGradGuard ng;
      m->forward(x0);
    };
    auto both = [&] {
      m->zero_grad();
      x.mutable_grad() = Tensor();
      torch::autograd::backward({m->forward(x)}, {g});
    };
    double t[2][2];
    std::vector<Tensor> out[2];
    for (int fused = 0; fused < 2; ++fused) {
      FusedSwitch sw(fused == 1);
      t[fused][0] = median_cuda_ms(fwd);
      t[fused][1] = median_cuda_ms(both);
      both();
      torch::NoGradGuard ng;
      out[fused] = {m->forward(x0), x.grad().clone(), m->weight.grad().clone(),
                    bias ? m->bias.grad().clone() : Tensor()};
    }
    const double gbytes = double(B * T * C) * 2 / 1e9;  // one bf16 (B,T,C) tensor
    std::printf("  ShortConv B%ld T%ld C%ld W%ld bf16 silu%s (median of 20, ms):\n", long(B), long(T), long(C), long(W),
                bias ? " bias" : "");
    std::printf("    composite  fwd %8.3f   fwd+bwd %8.3f\n", t[0][0], t[0][1]);
    std::printf("    fused      fwd %8.3f   fwd+bwd %8.3f   (fwd %.0f GB/s for x in + y out)\n", t[1][0], t[1][1],
                2 * gbytes / (t[1][0] * 1e-3));
    std::printf("    speedup    fwd %7.2fx   fwd+bwd %7.2fx\n", t[0][0] / t[1][0], t[0][1] / t[1][1]);
    const char* names[4] = {"y", "dx", "dw", "dbias"};
    for (int i = 0; i < 4; ++i) {
      if (!out[0][i].defined()) continue;
      const double e = rel_err(out[1][i], out[0][i]);
      EXPECT_LT(e, 2 * kEpsBf16) << names[i] << (bias ? " (bias)" : "");
    }
  }
  // The raw kernels alone at that shape (no autograd, no partial-sum reduction), for the record.
  const auto st = c10::cuda::getCurrentCUDAStream();
  auto o = torch::TensorOptions().device(kCuda);
  const auto x = torch::randn({B, T, C}, o.dtype(torch::kBFloat16)), dy = torch::randn_like(x);
  const auto w = torch::randn({C, W}, o);
  auto y = torch::empty_like(x), dx = torch::empty_like(x);
  auto dwb = torch::empty({kernels::causal_conv1d_num_ranges(B, T), C, W + 1}, o);
  kernels::CausalConv1dShape s{B, T, C, W, kernels::NsaDtype::kBF16, true};
  const double tf = median_cuda_ms([&] {
    kernels::causal_conv1d_fwd_cuda({s, x.data_ptr(), w.data_ptr<float>(), nullptr, y.data_ptr()}, st);
  });
  const double tb = median_cuda_ms([&] {
    kernels::causal_conv1d_bwd_cuda(
        {s, x.data_ptr(), w.data_ptr<float>(), nullptr, dy.data_ptr(), dx.data_ptr(), dwb.data_ptr<float>()}, st);
  });
  const double tr = median_cuda_ms([&] { dwb.sum(0); });
  std::printf("  raw kernels: fwd %.3f ms, bwd %.3f ms, partial-sum reduction (%ld x %ld x %ld fp32) %.3f ms\n", tf, tb,
              long(dwb.size(0)), long(C), long(W + 1), tr);
}

#else  // !ABLATE_WITH_CUDA

TEST(CausalConv1dGpu, RawKernelsMatchReference) { ABLATE_REQUIRE_CUDA(); }
TEST(CausalConv1dGpu, OpMatchesCompositeFp64) { ABLATE_REQUIRE_CUDA(); }
TEST(CausalConv1dGpu, ShortConvFusedMatchesComposite) { ABLATE_REQUIRE_CUDA(); }
TEST(CausalConv1dGpu, TimingShortConv32K) { ABLATE_REQUIRE_CUDA(); }

#endif  // ABLATE_WITH_CUDA

}  // namespace
}  // namespace ablate::core
