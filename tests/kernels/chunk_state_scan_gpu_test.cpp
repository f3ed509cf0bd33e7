// The chunk state scan's CUDA kernel (kernels/chunk_state_scan_cuda.cu) on the GPU:
//  (a) the raw launcher, outputs poisoned with NaN, against the C++ reference (kernels/chunk_state_scan_ref.cpp)
//      on the same fp32 inputs, both directions, odd shapes;
//  (b) the op (core/mixers/chunk_state_scan.h) with the kernel and with LibTorch walks in fp32, forward and all
//      gradients, against the op in fp64 on the GPU (LibTorch walks; tested against autograd on CPU);
//  (c) gated_delta_rule_chunked's kernel path against its original per-chunk loop and an fp64 reference;
//  (d) timings (CUDA events, median of 20) of gated_delta_rule_chunked fwd+bwd at B=1, T=32768, H=16, K=V=128;
//  (e) the UT transform's unit lower-triangular inverse kernel (kernels/unit_lower_inverse_cuda.cu) against its C++
//      reference and the op (core/mixers/unit_lower_inverse.h) against the triangular solve in fp64, with a timing
//      beside cuBLAS's batched trsm at the 32K shape.
// Every case prints its errors; checks do not stop at the first failure. Label gpu: skips without a device or
// without ABLATE_WITH_CUDA.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/mixers/chunk_state_scan.h"
#include "core/mixers/delta_rule.h"
#include "core/mixers/unit_lower_inverse.h"
#include "kernels/chunk_state_scan.h"
#include "kernels/unit_lower_inverse.h"
#include "tests/cuda_timing.h"
#include "tests/require_cuda.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace {

#if ABLATE_WITH_CUDA

using ablate::core::chunk_state_scan;
using ablate::core::ChunkScanImpl;
namespace F = torch::nn::functional;

const torch::Device kCuda(torch::kCUDA);
constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();

torch::Tensor f64(const torch::Tensor& t) { return t.detach().to(torch::kCPU).to(torch::kFloat64); }

double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  const auto ad = f64(a), bd = f64(b);
  const double den = bd.norm().item<double>(), num = (ad - bd).norm().item<double>();
  return den == 0.0 ? num : num / den;
}
double max_abs_err(const torch::Tensor& a, const torch::Tensor& b) { return (f64(a) - f64(b)).abs().max().item<double>(); }
bool all_finite(const torch::Tensor& t) { return torch::isfinite(t).all().item<bool>(); }

// Relative (Frobenius) tolerance for fp32 results of the scan against fp64: rounding of reductions of length K
// (phase 1) and L (phase 2) grows like sqrt(length); the state map contracts, so it does not compound over chunks.
double scan_tol(int64_t K, int64_t L) { return 1e-5 * std::sqrt(double(K + L)); }

struct ScanCase {
  int64_t b, h, c, l, k, v;
};
std::string name(const ScanCase& s) {
  return "B" + std::to_string(s.b) + " H" + std::to_string(s.h) + " C" + std::to_string(s.c) + " L" +
         std::to_string(s.l) + " K" + std::to_string(s.k) + " V" + std::to_string(s.v);
}

// Ut, W, Kend, decay, S0 (fp64, CPU) with ||Kend^T W|| <~ 0.25 and decay in [0.5, 0.7] (a contraction).
std::vector<torch::Tensor> make_scan_inputs(const ScanCase& s, uint64_t seed) {
  torch::manual_seed(seed);
  const auto o = torch::TensorOptions().dtype(torch::kFloat64);
  const double sigma = 0.5 / (std::sqrt(double(s.l)) + std::sqrt(double(s.k)));
  return {torch::randn({s.b, s.h, s.c, s.l, s.v}, o), sigma * torch::randn({s.b, s.h, s.c, s.l, s.k}, o),
          sigma * torch::randn({s.b, s.h, s.c, s.l, s.k}, o), 0.5 + 0.2 * torch::rand({s.b, s.h, s.c}, o),
          torch::randn({s.b, s.h, s.k, s.v}, o)};
}

std::vector<torch::Tensor> to_all(const std::vector<torch::Tensor>& ts, torch::Device dev, torch::ScalarType dt) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(t.to(dev, dt).contiguous());
  return out;
}

const std::vector<ScanCase> kScanCases = {
    {1, 16, 512, 64, 128, 128},  // the 32K-context DeltaNet head shape
    {2, 3, 3, 64, 64, 64},       // K = V = 64, three chunks
    {1, 2, 5, 64, 128, 72},      // V not a multiple of the V-tile (16/32/64)
    {1, 2, 4, 17, 30, 70},       // odd L, K and V % 4 != 0 (scalar cp.async path)
    {1, 4, 6, 64, 256, 256},     // K = 256
    {2, 2, 7, 32, 96, 40},       // L = 32
    {1, 1, 3, 1, 8, 5},          // L = 1
};

// -------------------------------------------------------------------------------- (a) raw launcher vs C++ ref
TEST(ChunkScanGpu, RawKernelMatchesCppReference) {
  ABLATE_REQUIRE_CUDA();
  for (const auto& s : kScanCases) {
    if (s.c * s.h * s.b > 256) continue;  // the C++ reference is slow; the big shape is covered in (b)
    if (!ablate::kernels::chunk_state_scan_cuda_supported(s.l, s.k)) {
      ADD_FAILURE() << name(s) << ": kernel reports unsupported";
      continue;
    }
    const auto in = to_all(make_scan_inputs(s, 11), torch::kCPU, torch::kFloat32);
    const auto gd = to_all(in, kCuda, torch::kFloat32);
    const auto dS_in = torch::randn({s.b, s.h, s.c, s.k, s.v}), dS_f = torch::randn({s.b, s.h, s.k, s.v});
    const auto dS_in_d = dS_in.to(kCuda), dS_f_d = dS_f.to(kCuda);
    const auto dU = torch::randn({s.b, s.h, s.c, s.l, s.v}), dU_d = dU.to(kCuda);
    for (bool backward : {false, true}) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      auto zo = torch::full({s.b, s.h, s.c, s.k, s.v}, nan), x = torch::full({s.b, s.h, s.c, s.l, s.v}, nan);
      auto zf = torch::full({s.b, s.h, s.k, s.v}, nan);
      auto zo_d = zo.to(kCuda), x_d = x.to(kCuda), zf_d = zf.to(kCuda);
      auto args = [&](bool dev) {
        const auto& t = dev ? gd : in;
        ablate::kernels::ChunkScanArgs a;
        a.bh = s.b * s.h;
        a.chunks = s.c;
        a.chunk_len = s.l;
        a.dk = s.k;
        a.dv = s.v;
        a.m1 = (backward ? t[2] : t[1]).data_ptr<float>();
        a.m2 = (backward ? t[1] : t[2]).data_ptr<float>();
        a.p1 = backward ? (dev ? dU_d : dU).data_ptr<float>() : t[0].data_ptr<float>();
        a.p2 = backward ? (dev ? dS_in_d : dS_in).data_ptr<float>() : nullptr;
        a.decay = t[3].data_ptr<float>();
        a.z0 = backward ? (dev ? dS_f_d : dS_f).data_ptr<float>() : t[4].data_ptr<float>();
        a.zout = (dev ? zo_d : zo).data_ptr<float>();
        a.x = (dev ? x_d : x).data_ptr<float>();
        a.zfinal = (dev ? zf_d : zf).data_ptr<float>();
        a.s1 = backward ? 1.f : -1.f;
        a.s2 = backward ? -1.f : 1.f;
        a.reverse = backward;
        return a;
      };
      ablate::kernels::chunk_state_scan_ref(args(false));
      const cudaError_t e = ablate::kernels::chunk_state_scan_cuda(args(true), c10::cuda::getCurrentCUDAStream());
      const cudaError_t e2 = cudaStreamSynchronize(c10::cuda::getCurrentCUDAStream());
      EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
      EXPECT_EQ(e2, cudaSuccess) << cudaGetErrorString(e2);
      const std::string what = name(s) + (backward ? " backward" : " forward");
      const double tol = scan_tol(s.k, s.l);
      const char* names[] = {"zout", "x", "zfinal"};
      const torch::Tensor got[] = {zo_d, x_d, zf_d}, ref[] = {zo, x, zf};
      std::printf("  raw %-40s", what.c_str());
      for (int i = 0; i < 3; ++i) {
        EXPECT_TRUE(all_finite(got[i].cpu())) << what << " " << names[i] << ": non-finite (unwritten?) elements";
        const double r = rel_err(got[i], ref[i]);
        EXPECT_LT(r, tol) << what << " " << names[i];
        std::printf(" %s rel %.2e max %.2e;", names[i], r, max_abs_err(got[i], ref[i]));
      }
      std::printf(" (tol %.1e)\n", tol);
    }
  }
}

// ------------------------------------------------------------------------ (b) the op: kernel vs fp64 and fp32 torch
std::vector<torch::Tensor> op_outputs(ChunkScanImpl impl, const std::vector<torch::Tensor>& in) {
  auto [s_in, u, s_final] = chunk_state_scan(in[0], in[1], in[2], in[3], in[4], impl);
  return {s_in, u, s_final};
}

// Outputs followed by the gradients wrt the five inputs of sum_i <w_i, out_i>.
std::vector<torch::Tensor> op_outputs_and_grads(ChunkScanImpl impl, const std::vector<torch::Tensor>& in0,
                                                const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> in;
  for (const auto& t : in0) in.push_back(t.detach().clone().requires_grad_(true));
  auto out = op_outputs(impl, in);
  torch::Tensor loss = torch::zeros({}, in[0].options());
  for (int i = 0; i < 3; ++i) loss = loss + (out[i] * w[i].to(out[i].dtype())).sum();
  auto g = torch::autograd::grad({loss}, in);
  std::vector<torch::Tensor> r;
  for (auto& o : out) r.push_back(o.detach());
  for (auto& x : g) r.push_back(x);
  return r;
}

TEST(ChunkScanGpu, OpKernelMatchesFp64ForwardAndBackward) {
  ABLATE_REQUIRE_CUDA();
  const char* names[] = {"S_in", "U", "S_final", "dUt", "dW", "dKend", "ddecay", "dS0"};
  for (const auto& s : kScanCases) {
    const auto in64 = to_all(make_scan_inputs(s, 21), kCuda, torch::kFloat64);
    const auto in32 = to_all(in64, kCuda, torch::kFloat32);
    ASSERT_TRUE(ablate::core::chunk_state_scan_kernel_applies(in32[0], s.l, s.k)) << name(s);
    torch::manual_seed(22);
    std::vector<torch::Tensor> w = {torch::randn({s.b, s.h, s.c, s.k, s.v}, in64[0].options()),
                                    torch::randn({s.b, s.h, s.c, s.l, s.v}, in64[0].options()),
                                    torch::randn({s.b, s.h, s.k, s.v}, in64[0].options())};
    const auto ref = op_outputs_and_grads(ChunkScanImpl::kTorch, in64, w);
    const auto ker = op_outputs_and_grads(ChunkScanImpl::kKernel, in32, w);
    const auto tor = op_outputs_and_grads(ChunkScanImpl::kTorch, in32, w);
    const double tol = scan_tol(s.k, s.l);
    std::printf("  op %s (tol rel %.1e)\n", name(s).c_str(), tol);
    for (size_t i = 0; i < ref.size(); ++i) {
      EXPECT_TRUE(all_finite(ker[i])) << name(s) << " " << names[i];
      const double rk = rel_err(ker[i], ref[i]), rt = rel_err(tor[i], ref[i]);
      EXPECT_LT(rk, tol) << name(s) << " " << names[i] << " (fp32 LibTorch walks: " << rt << ")";
      std::printf("    %-8s rel err vs fp64: kernel %.2e (max abs %.2e)  fp32 LibTorch %.2e\n", names[i], rk,
                  max_abs_err(ker[i], ref[i]), rt);
    }
  }
}

// -------------------------------------------------------------- (c) gated_delta_rule_chunked: kernel path vs loop
struct DeltaInputs {
  std::vector<torch::Tensor> x;  // q, k, v, g, beta, initial_state
};

DeltaInputs make_delta_inputs(int64_t B, int64_t T, int64_t H, int64_t K, int64_t V, torch::ScalarType dt,
                              uint64_t seed, bool init = true) {
  torch::manual_seed(seed);
  const auto o = torch::TensorOptions().dtype(torch::kFloat32).device(kCuda);
  auto l2n = [](const torch::Tensor& t) { return F::normalize(t, F::NormalizeFuncOptions().dim(-1)); };
  DeltaInputs d;
  d.x = {l2n(torch::randn({B, T, H, K}, o)).to(dt),          l2n(torch::randn({B, T, H, K}, o)).to(dt),
         torch::randn({B, T, H, V}, o).to(dt),                (-F::softplus(torch::randn({B, T, H}, o) - 2.0)).to(dt),
         torch::sigmoid(torch::randn({B, T, H}, o)).to(dt),   init ? torch::randn({B, H, K, V}, o) : torch::Tensor()};
  return d;
}

// o, S and the gradients of <wo, o> + <ws, S> wrt q, k, v, g, beta (and the initial state when given).
std::vector<torch::Tensor> delta_run(ChunkScanImpl impl, const DeltaInputs& d, torch::ScalarType dt,
                                     const torch::Tensor& wo, const torch::Tensor& ws, int64_t chunk = 64) {
  std::vector<torch::Tensor> x;
  for (const auto& t : d.x) x.push_back(t.defined() ? t.detach().to(dt).requires_grad_(true) : t);
  auto [o, S] = ablate::core::gated_delta_rule_chunked_with(impl, x[0], x[1], x[2], x[3], x[4], chunk, -1.0, x[5]);
  const auto loss = (o.to(torch::kFloat64) * wo).sum() + (S.to(torch::kFloat64) * ws).sum();
  std::vector<torch::Tensor> leaves;
  for (const auto& t : x)
    if (t.defined()) leaves.push_back(t);
  auto g = torch::autograd::grad({loss}, leaves);
  std::vector<torch::Tensor> r = {o.detach(), S.detach()};
  for (auto& t : g) r.push_back(t);
  return r;
}

TEST(ChunkScanGpu, DeltaRuleKernelPathMatchesLoop) {
  ABLATE_REQUIRE_CUDA();
  const char* names[] = {"o", "S_final", "dq", "dk", "dv", "dg", "dbeta", "dS0"};
  struct C {
    int64_t B, T, H, K, V;
    bool init;
  };
  for (const auto& c : {C{2, 1000, 4, 64, 64, true}, C{1, 4096, 16, 128, 128, false}, C{1, 333, 2, 128, 80, true}}) {
    const auto d = make_delta_inputs(c.B, c.T, c.H, c.K, c.V, torch::kFloat32, 31, c.init);
    const auto wo = torch::randn({c.B, c.T, c.H, c.V}, torch::TensorOptions().dtype(torch::kFloat64).device(kCuda));
    const auto ws = torch::randn({c.B, c.H, c.K, c.V}, wo.options());
    const auto ref = delta_run(ChunkScanImpl::kTorch, d, torch::kFloat64, wo, ws);
    const auto ker = delta_run(ChunkScanImpl::kAuto, d, torch::kFloat32, wo, ws);
    const auto old = delta_run(ChunkScanImpl::kAutogradLoop, d, torch::kFloat32, wo, ws);
    // The non-scan parts (triangular solve, chunk products) are fp32 too; the original loop is held to the same.
    const double tol = 1e-4;
    std::printf("  delta rule B%ld T%ld H%ld K%ld V%ld%s\n", long(c.B), long(c.T), long(c.H), long(c.K), long(c.V),
                c.init ? " +init" : "");
    for (size_t i = 0; i < ref.size(); ++i) {
      const double rk = rel_err(ker[i], ref[i]), ro = rel_err(old[i], ref[i]);
      EXPECT_TRUE(all_finite(ker[i])) << names[i];
      EXPECT_LT(rk, tol) << names[i] << " (original loop: " << ro << ")";
      // Sequential fp32 FMA chains vs cuBLAS's blocked sums: a few times apart at most, not orders of magnitude.
      EXPECT_LT(rk, std::max(10.0 * ro, 100 * kEpsF32)) << names[i] << ": kernel path much worse than the loop";
      std::printf("    %-8s rel err vs fp64: kernel path %.2e  original loop %.2e\n", names[i], rk, ro);
    }
  }
  // bf16 inputs (as in training) compute in fp32 and take the kernel.
  const auto d = make_delta_inputs(1, 1500, 4, 128, 128, torch::kBFloat16, 32);
  const auto wo = torch::randn({1, 1500, 4, 128}, torch::TensorOptions().dtype(torch::kFloat64).device(kCuda));
  const auto ws = torch::randn({1, 4, 128, 128}, wo.options());
  const auto ker = delta_run(ChunkScanImpl::kAuto, d, torch::kBFloat16, wo, ws);
  const auto old = delta_run(ChunkScanImpl::kAutogradLoop, d, torch::kBFloat16, wo, ws);
  std::printf("  delta rule bf16 B1 T1500 H4 K128 V128: kernel path vs original loop:");
  for (size_t i = 0; i < old.size(); ++i) {
    const double r = rel_err(ker[i], old[i]);
    EXPECT_LT(r, 8e-3) << "bf16 " << names[i];  // one bf16 rounding of o (2^-8 relative) plus fp32 noise
    std::printf(" %s %.2e;", names[i], r);
  }
  std::printf("\n");
}

// -------------------------------------------------------------------------------------------- (d) timing
using ablate::gpu_test::median_cuda_ms;

TEST(ChunkScanGpu, TimingDeltaRule32K) {
  ABLATE_REQUIRE_CUDA();
  const int64_t B = 1, T = 32768, H = 16, K = 128, V = 128;
  for (auto dt : {torch::kBFloat16, torch::kFloat32}) {
    const auto d = make_delta_inputs(B, T, H, K, V, dt, 41, /*init=*/false);
    std::vector<torch::Tensor> x;
    for (int i = 0; i < 5; ++i) x.push_back(d.x[i].detach().requires_grad_(true));
    const auto wo = torch::randn({B, T, H, V}, x[2].options().requires_grad(false));
    auto step = [&](ChunkScanImpl impl, bool backward) {
      return [&, impl, backward] {
        if (!backward) {
          torch::NoGradGuard ng;
          ablate::core::gated_delta_rule_chunked_with(impl, x[0], x[1], x[2], x[3], x[4], 64, -1.0);
          return;
        }
        auto [o, S] = ablate::core::gated_delta_rule_chunked_with(impl, x[0], x[1], x[2], x[3], x[4], 64, -1.0);
        ((o * wo).sum() + S.sum()).backward();
        for (auto& t : x) t.mutable_grad() = torch::Tensor();
      };
    };
    const char* dn = dt == torch::kBFloat16 ? "bf16" : "fp32";
    double t[3][2];
    const ChunkScanImpl impls[] = {ChunkScanImpl::kKernel, ChunkScanImpl::kTorch, ChunkScanImpl::kAutogradLoop};
    const char* in[] = {"CUDA kernel scan", "custom op, LibTorch walks", "original loop (autograd)"};
    for (int i = 0; i < 3; ++i)
      for (int bw = 0; bw < 2; ++bw) t[i][bw] = median_cuda_ms(step(impls[i], bw == 1));
    std::printf("  gated_delta_rule_chunked %s B%ld T%ld H%ld K%ld V%ld (median of 20, ms):\n", dn, long(B), long(T),
                long(H), long(K), long(V));
    for (int i = 0; i < 3; ++i)
      std::printf("    %-28s fwd %9.3f   fwd+bwd %9.3f   (%.1fk tokens/s fwd+bwd, one layer)\n", in[i], t[i][0],
                  t[i][1], double(B * T) / t[i][1]);
    std::printf("    speedup fwd+bwd kernel vs original loop: %.1fx\n", t[2][1] / t[0][1]);
    EXPECT_LT(t[0][1], t[2][1]) << dn << ": the kernel path is not faster than the original loop";
  }
  // The op alone at that shape (fp32 inputs as gated_delta_rule_chunked hands them over).
  const ScanCase s{1, 16, 512, 64, 128, 128};
  const auto in = to_all(make_scan_inputs(s, 5), kCuda, torch::kFloat32);
  for (auto impl : {ChunkScanImpl::kKernel, ChunkScanImpl::kTorch}) {
    const double fwd = median_cuda_ms([&] {
      torch::NoGradGuard ng;
      op_outputs(impl, in);
    });
    std::vector<torch::Tensor> x;
    for (const auto& t : in) x.push_back(t.detach().requires_grad_(true));
    const double both = median_cuda_ms([&] {
      auto out = op_outputs(impl, x);
      (out[0].sum() + out[1].sum() + out[2].sum()).backward();
      for (auto& t : x) t.mutable_grad() = torch::Tensor();
    });
    std::printf("  chunk_state_scan %s (B1 H16 C512 L64 K128 V128): fwd %.3f ms, fwd+bwd %.3f ms\n",
                impl == ChunkScanImpl::kKernel ? "CUDA kernel " : "LibTorch walks", fwd, both);
  }
}

// The raw walks at the 32K shape for every launch shape (V-tile x threads), forward and backward; the default
// choice is marked. Also checks each shape against the default one (they differ only in summation order).
TEST(ChunkScanGpu, TimingKernelLaunchShapes) {
  ABLATE_REQUIRE_CUDA();
  const ScanCase s{1, 16, 512, 64, 128, 128};
  const auto in = to_all(make_scan_inputs(s, 6), kCuda, torch::kFloat32);
  const auto dS_in = torch::randn({s.b, s.h, s.c, s.k, s.v}, in[0].options());
  const auto dU = torch::randn_like(in[0]), dS_f = torch::randn_like(in[4]);
  auto zo = torch::empty({s.b, s.h, s.c, s.k, s.v}, in[0].options()), x = torch::empty_like(in[0]);
  auto zf = torch::empty_like(in[4]);
  auto args = [&](bool backward, int vt, int nt) {
    ablate::kernels::ChunkScanArgs a;
    a.bh = s.b * s.h;
    a.chunks = s.c;
    a.chunk_len = s.l;
    a.dk = s.k;
    a.dv = s.v;
    a.m1 = (backward ? in[2] : in[1]).data_ptr<float>();
    a.m2 = (backward ? in[1] : in[2]).data_ptr<float>();
    a.p1 = (backward ? dU : in[0]).data_ptr<float>();
    a.p2 = backward ? dS_in.data_ptr<float>() : nullptr;
    a.decay = in[3].data_ptr<float>();
    a.z0 = (backward ? dS_f : in[4]).data_ptr<float>();
    a.zout = zo.data_ptr<float>();
    a.x = x.data_ptr<float>();
    a.zfinal = zf.data_ptr<float>();
    a.s1 = backward ? 1.f : -1.f;
    a.s2 = backward ? -1.f : 1.f;
    a.reverse = backward;
    a.tile_v = vt;
    a.threads = nt;
    return a;
  };
  const auto st = c10::cuda::getCurrentCUDAStream();
  std::printf("  raw chunk_state_scan walks, B1 H16 C512 L64 K128 V128 (median of 20, ms):\n");
  for (bool backward : {false, true}) {
    EXPECT_EQ(ablate::kernels::chunk_state_scan_cuda(args(backward, 0, 0), st), cudaSuccess);
    const auto ref_x = x.clone(), ref_zo = zo.clone();
    const double t_def = median_cuda_ms([&] { ablate::kernels::chunk_state_scan_cuda(args(backward, 0, 0), st); });
    std::printf("    %s default: %.3f ms\n", backward ? "backward" : "forward ", t_def);
    for (int vt : {16, 32, 64})
      for (int nt : {256, 512}) {
        const cudaError_t e = ablate::kernels::chunk_state_scan_cuda(args(backward, vt, nt), st);
        EXPECT_EQ(e, cudaSuccess) << "vt " << vt << " nt " << nt << ": " << cudaGetErrorString(e);
        EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
        const double ex = rel_err(x, ref_x), ez = rel_err(zo, ref_zo);
        EXPECT_LT(ex, 1e-5) << "vt " << vt << " nt " << nt;
        EXPECT_LT(ez, 1e-5) << "vt " << vt << " nt " << nt;
        const double t = median_cuda_ms([&] { ablate::kernels::chunk_state_scan_cuda(args(backward, vt, nt), st); });
        std::printf("    %s VT %2d threads %3d: %.3f ms  (rel diff to default: x %.1e, zout %.1e)\n",
                    backward ? "backward" : "forward ", vt, nt, t, ex, ez);
      }
  }
}

// -------------------------------------------------------------------------------- (e) unit lower-triangular inverse
// A as the delta rule builds it: strictly lower, entries beta_i (k_i . k_j) decayed with unit-norm keys; plus a
// diagonal and an upper part the kernel must ignore.
torch::Tensor make_tril_input(int64_t batch, int64_t n, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn({batch, n, n}, torch::TensorOptions().dtype(torch::kFloat64)) / std::sqrt(double(n));
}

TEST(UnitLowerInverseGpu, RawKernelMatchesCppReference) {
  ABLATE_REQUIRE_CUDA();
  // Odd batches (two matrices per block), every n up to the kernel's 64 in a few steps.
  for (const auto& [batch, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 2}, {5, 17}, {4, 33}, {7, 64}, {8192, 64}}) {
    const auto A = make_tril_input(batch, n, 100 + n).to(torch::kFloat32);
    auto T_ref = torch::empty_like(A);
    ablate::kernels::UnitLowerInverseArgs ra{batch, n, A.data_ptr<float>(), T_ref.data_ptr<float>()};
    ablate::kernels::unit_lower_inverse_ref(ra);
    const auto Ad = A.to(kCuda);
    auto T = torch::full_like(Ad, std::numeric_limits<float>::quiet_NaN());
    ablate::kernels::UnitLowerInverseArgs ka{batch, n, Ad.data_ptr<float>(), T.data_ptr<float>()};
    const auto e = ablate::kernels::unit_lower_inverse_cuda(ka, c10::cuda::getCurrentCUDAStream());
    ASSERT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
    const double err = rel_err(T, T_ref);
    std::printf("  inverse kernel vs C++ ref, batch %ld n %ld: rel err %.2e\n", long(batch), long(n), err);
    EXPECT_TRUE(all_finite(T)) << "unwritten elements, batch " << batch << " n " << n;
    // Same products, summed in the same order; only FMA contraction differs.
    EXPECT_LT(err, 8 * kEpsF32 * std::sqrt(double(n))) << "batch " << batch << " n " << n;
  }
  ablate::kernels::UnitLowerInverseArgs bad{1, 65, nullptr, nullptr};
  EXPECT_EQ(ablate::kernels::unit_lower_inverse_cuda(bad, c10::cuda::getCurrentCUDAStream()), cudaErrorInvalidValue);
}

TEST(UnitLowerInverseGpu, OpMatchesSolveForwardAndBackward) {
  ABLATE_REQUIRE_CUDA();
  const auto A64 = make_tril_input(2 * 3 * 5, 64, 7).reshape({2, 3, 5, 64, 64});
  const auto w = torch::randn(A64.sizes(), A64.options());
  auto run = [&](const torch::Tensor& A0, bool kernel) {
    auto A = A0.detach().requires_grad_(true);
    const auto T = ablate::core::unit_lower_inverse(A, kernel);
    (T * w.to(A.options())).sum().backward();
    return std::pair{T.detach(), A.grad()};
  };
  const auto [T_ref, g_ref] = run(A64.to(kCuda), false);
  const auto [T_ker, g_ker] = run(A64.to(kCuda, torch::kFloat32), true);
  const double eT = rel_err(T_ker, T_ref), eg = rel_err(g_ker, g_ref);
  std::printf("  unit_lower_inverse op, kernel fp32 vs solve fp64: T %.2e, dA %.2e\n", eT, eg);
  EXPECT_LT(eT, 16 * kEpsF32 * 8);  // fp32 rounding over sums of length <= 64 (sqrt(64) = 8)
  EXPECT_LT(eg, 64 * kEpsF32 * 8);  // plus two fp32 GEMMs of length 64
  EXPECT_EQ(f64(torch::triu(g_ker)).abs().max().item<double>(), 0.0);
}

TEST(UnitLowerInverseGpu, TimingAgainstTrsm32K) {
  ABLATE_REQUIRE_CUDA();
  // The delta rule's UT transform at T = 32768, 16 heads, chunk 64: 8192 systems with K + V = 256 right-hand sides.
  const int64_t batch = 16 * 512, n = 64, r = 256;
  const auto A = make_tril_input(batch, n, 9).to(kCuda, torch::kFloat32);
  const auto rhs = torch::randn({batch, n, r}, A.options());
  const double t_trsm = median_cuda_ms([&] { torch::linalg_solve_triangular(A, rhs, false, true, true); });
  const double t_inv = median_cuda_ms([&] { ablate::core::unit_lower_inverse(A, true); });
  const double t_both = median_cuda_ms([&] { torch::matmul(ablate::core::unit_lower_inverse(A, true), rhs); });
  const auto x_trsm = torch::linalg_solve_triangular(A, rhs, false, true, true);
  const auto x_inv = torch::matmul(ablate::core::unit_lower_inverse(A, true), rhs);
  const double e = rel_err(x_inv, x_trsm);
  std::printf("  UT solve, 8192 x (64 x 64, 256 rhs) fp32: trsm %.3f ms; inverse kernel %.3f ms, + GEMM %.3f ms "
              "(%.1fx); rel diff %.1e\n", t_trsm, t_inv, t_both, t_trsm / t_both, e);
  EXPECT_LT(e, 1e-4);
}

#else

TEST(ChunkScanGpu, RawKernelMatchesCppReference) { ABLATE_REQUIRE_CUDA(); }
TEST(ChunkScanGpu, OpKernelMatchesFp64ForwardAndBackward) { ABLATE_REQUIRE_CUDA(); }
TEST(ChunkScanGpu, DeltaRuleKernelPathMatchesLoop) { ABLATE_REQUIRE_CUDA(); }
TEST(ChunkScanGpu, TimingDeltaRule32K) { ABLATE_REQUIRE_CUDA(); }
TEST(ChunkScanGpu, TimingKernelLaunchShapes) { ABLATE_REQUIRE_CUDA(); }
TEST(UnitLowerInverseGpu, RawKernelMatchesCppReference) { ABLATE_REQUIRE_CUDA(); }
TEST(UnitLowerInverseGpu, OpMatchesSolveForwardAndBackward) { ABLATE_REQUIRE_CUDA(); }
TEST(UnitLowerInverseGpu, TimingAgainstTrsm32K) { ABLATE_REQUIRE_CUDA(); }

#endif

}  // namespace
