// The chunk state scan op (core/mixers/chunk_state_scan.h) on CPU: the custom op with its hand-written backward
// against autograd through the plain loop (fp64), a finite-difference gradcheck, the C++ kernel reference
// (kernels/chunk_state_scan_ref.cpp) against both walks, gated_delta_rule_chunked's op path against its original
// per-chunk loop, and argument errors. The CUDA kernel is tested in tests/kernels/chunk_state_scan_gpu_test.cpp.
#include "core/mixers/chunk_state_scan.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/mixers/delta_rule.h"
#include "kernels/chunk_state_scan.h"
#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::gradcheck;
using testing::grads_of;
using testing::rel_err;
using testing::weighted_sum;
namespace F = torch::nn::functional;

struct ScanCase {
  int64_t b, h, c, l, k, v;
};

std::ostream& operator<<(std::ostream& os, const ScanCase& s) {
  return os << "B" << s.b << "_H" << s.h << "_C" << s.c << "_L" << s.l << "_K" << s.k << "_V" << s.v;
}

// Ut, W, Kend, decay, S0. W and Kend are scaled so that ||Kend^T W|| <= ~0.25 and decay is in [0.5, 0.7]: the
// state map S -> decay S - Kend^T W S contracts, as in the delta rule, so long scans stay bounded.
std::vector<torch::Tensor> make_scan_inputs(const ScanCase& s, torch::ScalarType dtype, uint64_t seed = 0) {
  torch::manual_seed(seed);
  const auto o = torch::TensorOptions().dtype(dtype);
  const double sigma = 0.5 / (std::sqrt(double(s.l)) + std::sqrt(double(s.k)));
  return {torch::randn({s.b, s.h, s.c, s.l, s.v}, o), sigma * torch::randn({s.b, s.h, s.c, s.l, s.k}, o),
          sigma * torch::randn({s.b, s.h, s.c, s.l, s.k}, o), 0.5 + 0.2 * torch::rand({s.b, s.h, s.c}, o),
          torch::randn({s.b, s.h, s.k, s.v}, o)};
}

std::vector<torch::Tensor> scan_outputs(ChunkScanImpl impl, const std::vector<torch::Tensor>& in) {
  auto [s_in, u, s_final] = chunk_state_scan(in[0], in[1], in[2], in[3], in[4], impl);
  return {s_in, u, s_final};
}

testing::ScalarFn scan_loss(ChunkScanImpl impl, const std::vector<torch::Tensor>& w) {
  return [=](const std::vector<torch::Tensor>& in) {
    const auto out = scan_outputs(impl, in);
    return weighted_sum(out[0], w[0]) + weighted_sum(out[1], w[1]) + weighted_sum(out[2], w[2]);
  };
}

const char* kInputNames[] = {"Ut", "W", "Kend", "decay", "S0"};
const char* kOutputNames[] = {"S_in", "U", "S_final"};

class ChunkScanCpu : public ::testing::TestWithParam<ScanCase> {};

// fp64: the custom op (LibTorch walks, hand-written backward) equals autograd through the loop to rounding.
TEST_P(ChunkScanCpu, CustomOpMatchesAutogradLoopFp64) {
  const auto s = GetParam();
  const auto in = make_scan_inputs(s, torch::kFloat64, 1);
  const auto ref = scan_outputs(ChunkScanImpl::kAutogradLoop, in);
  const auto got = scan_outputs(ChunkScanImpl::kAuto, in);  // CPU: the custom op with LibTorch walks
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(got[i].sizes(), ref[i].sizes()) << kOutputNames[i];
    EXPECT_LT(rel_err(got[i], ref[i]), 1e-12) << kOutputNames[i];
  }
  std::vector<torch::Tensor> w;
  for (const auto& r : ref) w.push_back(torch::randn_like(r));
  const auto g_ref = grads_of(scan_loss(ChunkScanImpl::kAutogradLoop, w), in);
  const auto g_got = grads_of(scan_loss(ChunkScanImpl::kTorch, w), in);
  double worst = 0.0;
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_GT(g_ref[i].abs().sum().item<double>(), 0.0) << kInputNames[i];
    EXPECT_LT(rel_err(g_got[i], g_ref[i]), 1e-12) << "grad wrt " << kInputNames[i];
    worst = std::max(worst, rel_err(g_got[i], g_ref[i]));
  }
  std::cout << "[ error ] " << s << ": worst rel grad err custom op vs autograd loop " << worst << "\n";
}

// The C++ kernel reference (fp32, the CUDA kernel's exact contract) against the fp64 op: forward outputs, and the
// backward walk's dUt and dS0 (which are the op's gradients wrt Ut and S0).
TEST_P(ChunkScanCpu, KernelReferenceMatchesOp) {
  const auto s = GetParam();
  const auto in64 = make_scan_inputs(s, torch::kFloat64, 2);
  std::vector<torch::Tensor> in;
  for (const auto& t : in64) in.push_back(t.to(torch::kFloat32).contiguous());
  const auto ref = scan_outputs(ChunkScanImpl::kAutogradLoop, in64);
  const int64_t bh = s.b * s.h;
  auto zout = torch::full({s.b, s.h, s.c, s.k, s.v}, NAN), x = torch::full({s.b, s.h, s.c, s.l, s.v}, NAN);
  auto zfinal = torch::full({s.b, s.h, s.k, s.v}, NAN);
  kernels::ChunkScanArgs a;
  a.bh = bh;
  a.chunks = s.c;
  a.chunk_len = s.l;
  a.dk = s.k;
  a.dv = s.v;
  a.m1 = in[1].data_ptr<float>();
  a.m2 = in[2].data_ptr<float>();
  a.p1 = in[0].data_ptr<float>();
  a.decay = in[3].data_ptr<float>();
  a.z0 = in[4].data_ptr<float>();
  a.zout = zout.data_ptr<float>();
  a.x = x.data_ptr<float>();
  a.zfinal = zfinal.data_ptr<float>();
  kernels::chunk_state_scan_ref(a);
  // fp32 with reductions of length K and L, carried over C chunks by a contraction.
  const double tol = 1e-6 * std::sqrt(double(s.k + s.l)) * std::sqrt(double(s.c));
  EXPECT_LT(rel_err(zout, ref[0]), tol) << "S_in";
  EXPECT_LT(rel_err(x, ref[1]), tol) << "U";
  EXPECT_LT(rel_err(zfinal, ref[2]), tol) << "S_final";

  std::vector<torch::Tensor> w64, w;
  for (const auto& r : ref) {
    w64.push_back(torch::randn_like(r));
    w.push_back(w64.back().to(torch::kFloat32).contiguous());
  }
  const auto g = grads_of(scan_loss(ChunkScanImpl::kAutogradLoop, w64), in64);
  a.m1 = in[2].data_ptr<float>();  // Kend
  a.m2 = in[1].data_ptr<float>();  // W
  a.p1 = w[1].data_ptr<float>();   // dU
  a.p2 = w[0].data_ptr<float>();   // dS_in
  a.z0 = w[2].data_ptr<float>();   // dS_final
  a.s1 = 1.f;
  a.s2 = -1.f;
  a.reverse = true;
  zout.fill_(NAN);
  x.fill_(NAN);
  zfinal.fill_(NAN);
  kernels::chunk_state_scan_ref(a);
  EXPECT_LT(rel_err(x, g[0]), tol) << "dUt";
  EXPECT_LT(rel_err(zfinal, g[4]), tol) << "dS0";
  // dKend = U G_next^T and ddecay = <S_in, G_next> from the walk's G_next and the forward outputs.
  EXPECT_LT(rel_err(torch::matmul(ref[1], zout.to(torch::kFloat64).transpose(-1, -2)), g[2]), tol) << "dKend";
  EXPECT_LT(rel_err((ref[0] * zout.to(torch::kFloat64)).sum({-2, -1}), g[3]), tol) << "ddecay";
  std::cout << "[ error ] " << s << ": ref fp32 vs op fp64 rel err U " << rel_err(x, g[0]) << " (tol " << tol << ")\n";
}

INSTANTIATE_TEST_SUITE_P(Shapes, ChunkScanCpu,
                         ::testing::Values(ScanCase{2, 3, 5, 4, 6, 7},    // small odd sizes
                                           ScanCase{1, 2, 1, 8, 4, 4},    // one chunk
                                           ScanCase{1, 1, 9, 1, 3, 2},    // chunk length 1
                                           ScanCase{1, 2, 6, 16, 32, 20}  // K > L, V not a tile multiple
                                           ),
                         [](const auto& info) {
                           std::ostringstream os;
                           os << info.param;
                           return os.str();
                         });

TEST(ChunkScan, GradcheckFp64) {
  const ScanCase s{1, 2, 4, 3, 3, 2};
  const auto in = make_scan_inputs(s, torch::kFloat64, 7);
  const auto ref = scan_outputs(ChunkScanImpl::kAutogradLoop, in);
  std::vector<torch::Tensor> w;
  for (const auto& r : ref) w.push_back(torch::randn_like(r));
  const auto rep = gradcheck(scan_loss(ChunkScanImpl::kTorch, w), in);
  EXPECT_TRUE(rep.ok) << rep.first_failure;
  EXPECT_LT(rep.max_abs_err, 1e-6);
  std::cout << "[ error ] gradcheck custom op: max |analytic - finite diff| " << rep.max_abs_err << "\n";
}

// Gradients flow when only some outputs reach the loss (autograd hands the op zeros for the others).
TEST(ChunkScan, PartialOutputsGetGradients) {
  const ScanCase s{1, 2, 5, 4, 3, 3};
  const auto in = make_scan_inputs(s, torch::kFloat64, 8);
  for (int only = 0; only < 3; ++only) {
    auto f = [&](ChunkScanImpl impl) {
      return [=](const std::vector<torch::Tensor>& x) { return scan_outputs(impl, x)[only].square().sum(); };
    };
    const auto g_ref = grads_of(f(ChunkScanImpl::kAutogradLoop), in);
    const auto g_got = grads_of(f(ChunkScanImpl::kTorch), in);
    for (size_t i = 0; i < in.size(); ++i)
      EXPECT_LT(rel_err(g_got[i], g_ref[i]), 1e-12) << kOutputNames[only] << " -> " << kInputNames[i];
  }
}

// gated_delta_rule_chunked through the op equals its original per-chunk loop (fp64, T not a chunk multiple) in
// outputs, final state and all gradients.
TEST(ChunkScan, DeltaRuleOpPathMatchesOriginalLoop) {
  torch::manual_seed(3);
  const auto o = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t B = 2, T = 45, H = 3, K = 8, V = 6, chunk = 16;
  const std::vector<torch::Tensor> in = {
      F::normalize(torch::randn({B, T, H, K}, o), F::NormalizeFuncOptions().dim(-1)),
      F::normalize(torch::randn({B, T, H, K}, o), F::NormalizeFuncOptions().dim(-1)),
      torch::randn({B, T, H, V}, o),
      -F::softplus(torch::randn({B, T, H}, o) - 2.0),
      torch::sigmoid(torch::randn({B, T, H}, o)),
      torch::randn({B, H, K, V}, o)};
  auto run = [&](ChunkScanImpl impl) {
    return [=](const std::vector<torch::Tensor>& x) {
      auto [out, st] = gated_delta_rule_chunked_with(impl, x[0], x[1], x[2], x[3], x[4], chunk, -1.0, x[5]);
      return std::vector<torch::Tensor>{out, st};
    };
  };
  const auto ref = run(ChunkScanImpl::kAutogradLoop)(in);
  const auto got = run(ChunkScanImpl::kTorch)(in);
  EXPECT_LT(rel_err(got[0], ref[0]), 1e-12);
  EXPECT_LT(rel_err(got[1], ref[1]), 1e-12);
  const auto wo = torch::randn_like(ref[0]), ws = torch::randn_like(ref[1]);
  auto loss = [&](ChunkScanImpl impl) {
    return [=](const std::vector<torch::Tensor>& x) {
      const auto r = run(impl)(x);
      return weighted_sum(r[0], wo) + weighted_sum(r[1], ws);
    };
  };
  const auto g_ref = grads_of(loss(ChunkScanImpl::kAutogradLoop), in);
  const auto g_got = grads_of(loss(ChunkScanImpl::kAuto), in);
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_GT(g_ref[i].abs().sum().item<double>(), 0.0) << i;
    EXPECT_LT(rel_err(g_got[i], g_ref[i]), 1e-11) << "grad " << i;
  }
}

TEST(ChunkScan, BadArgumentsAreRejected) {
  const ScanCase s{1, 2, 3, 4, 5, 6};
  const auto in = make_scan_inputs(s, torch::kFloat32);
  EXPECT_NO_THROW(chunk_state_scan(in[0], in[1], in[2], in[3], in[4]));
  EXPECT_THROW(chunk_state_scan(in[0], in[1], in[2], in[3], in[4], ChunkScanImpl::kKernel), c10::Error);  // CPU
  EXPECT_THROW(chunk_state_scan(in[0], in[1].narrow(-1, 0, 4), in[2], in[3], in[4]), c10::Error);
  EXPECT_THROW(chunk_state_scan(in[0], in[1], in[2], in[3].unsqueeze(-1), in[4]), c10::Error);
  EXPECT_THROW(chunk_state_scan(in[0], in[1], in[2], in[3], in[4].narrow(-1, 0, 5)), c10::Error);
  EXPECT_THROW(chunk_state_scan(in[0], in[1].to(torch::kFloat64), in[2], in[3], in[4]), c10::Error);
  EXPECT_THROW(chunk_state_scan(in[0].narrow(3, 0, 3), in[1], in[2], in[3], in[4]), c10::Error);
  EXPECT_FALSE(chunk_state_scan_kernel_applies(in[0], s.l, s.k));  // CPU tensors never take the kernel
}

}  // namespace
}  // namespace ablate::core
