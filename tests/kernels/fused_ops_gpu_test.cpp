// CUDA kernels of the fused ops (RoPE, SwiGLU, residual add + RMSNorm, cross-entropy) on the GPU:
//  (a) the raw launchers, outputs poisoned with NaN first, against the fp32 CPU reference on the same (rounded)
//      inputs within atol + rtol scaled from the dtype's epsilon;
//  (b) bf16: max error of the kernel vs the fp32 reference <= 2 x the error of the LibTorch bf16 composite;
//  (c) the autograd adapters on CUDA against the CPU reference path (fp32) and the composite (bf16).
// Fresh random inputs (never zeros). Every launch's cudaError_t and the post-sync error are checked.
// Label gpu: skips without a device or without ABLATE_WITH_CUDA.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <limits>
#include <string>

#include "core/ops/cross_entropy.h"
#include "core/ops/rmsnorm_residual.h"
#include "core/ops/rope.h"
#include "core/ops/swiglu.h"
#include "kernels/cross_entropy.h"
#include "kernels/rmsnorm_residual.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/require_cuda.h"

#if ABLATE_WITH_CUDA
#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace {

#if ABLATE_WITH_CUDA

constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();  // 1.19e-7
constexpr double kEpsBF16 = 0.0078125;                               // 2^-7

const torch::Device kCuda(torch::kCUDA);
const auto kF32 = torch::kFloat32;
const auto kBF16 = torch::kBFloat16;

torch::Tensor f64(const torch::Tensor& t) { return t.detach().to(torch::kCPU).to(torch::kFloat64); }

double max_abs_err(const torch::Tensor& a, const torch::Tensor& b) {
  return a.numel() == 0 ? 0.0 : (f64(a) - f64(b)).abs().max().item<double>();
}

// Every element finite (a NaN-poisoned output that was not written fails here) and |out - ref| <= atol + rtol|ref|.
void expect_close(const torch::Tensor& out, const torch::Tensor& ref, double rtol, double atol, const std::string& what) {
  ASSERT_EQ(out.sizes(), ref.sizes()) << what;
  if (out.numel() == 0) return;
  const auto o = f64(out), r = f64(ref);
  const int64_t bad = (~torch::isfinite(o)).sum().item<int64_t>();
  EXPECT_EQ(bad, 0) << what << ": " << bad << " non-finite (unwritten?) elements of " << o.numel();
  const double excess = ((o - r).abs() - (atol + rtol * r.abs())).max().item<double>();
  EXPECT_LE(excess, 0.0) << what << ": max |err| " << max_abs_err(out, ref) << " (rtol " << rtol << ", atol " << atol
                         << ")";
}

// bf16 acceptance: error(kernel vs fp32 ref) <= 2 * error(composite vs fp32 ref). Prints both.
void expect_bf16_within_2x(const torch::Tensor& ours, const torch::Tensor& composite, const torch::Tensor& ref,
                           const std::string& what) {
  ASSERT_EQ(ours.sizes(), ref.sizes()) << what;
  EXPECT_TRUE(torch::isfinite(f64(ours)).all().item<bool>()) << what << ": non-finite output";
  const double e_ours = max_abs_err(ours, ref), e_comp = max_abs_err(composite, ref);
  std::printf("  %-44s bf16 max err: kernel %.3e  composite %.3e  (ratio %.2f)\n", what.c_str(), e_ours, e_comp,
              e_comp > 0 ? e_ours / e_comp : 0.0);
  // The floor only matters when the composite happens to be exact (single-element shapes).
  const double floor = kEpsBF16 * 0.5 * (f64(ref).abs().max().item<double>() + 1e-30);
  EXPECT_LE(e_ours, std::max(2.0 * e_comp, floor)) << what << ": kernel " << e_ours << " vs composite " << e_comp;
}

torch::Tensor nan_like(const torch::Tensor& t) { return torch::full_like(t, std::numeric_limits<float>::quiet_NaN()); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

void sync_ok(const std::string& what) {
  const cudaError_t e = cudaStreamSynchronize(stream());
  ASSERT_EQ(e, cudaSuccess) << what << ": " << cudaGetErrorString(e);
  const cudaError_t e2 = cudaGetLastError();
  ASSERT_EQ(e2, cudaSuccess) << what << ": " << cudaGetErrorString(e2);
}

#define LAUNCH_OK(call, what)                                                                 \
  do {                                                                                        \
    const cudaError_t _e = (call);                                                            \
    ASSERT_EQ(_e, cudaSuccess) << (what) << ": launch returned " << cudaGetErrorString(_e); \
    sync_ok(what);                                                                            \
  } while (0)

std::pair<torch::Tensor, torch::Tensor> rope_tables(int64_t T, int64_t hd, double theta = 10000.0) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  auto inv_freq = torch::pow(theta, -torch::arange(0, hd, 2, opts) / double(hd));
  auto ang = torch::outer(torch::arange(T, opts), inv_freq);
  auto emb = torch::cat({ang, ang}, -1);
  return {emb.cos().to(kF32), emb.sin().to(kF32)};
}

// ------------------------------------------------------------------------------------------------ RoPE
// x: [B, T, H, hd] (bthd) or [B, H, T, hd]; describes it as the kernel's 3 row dims + pos_dim.
ablate::kernels::RopeTensor rope_desc(const torch::Tensor& x, const torch::Tensor& y, int pos_dim) {
  ablate::kernels::RopeTensor t;
  t.x = x.data_ptr();
  t.y = y.data_ptr();
  for (int i = 0; i < 3; ++i) {
    t.n[i] = x.size(i);
    t.xs[i] = x.stride(i);
    t.ys[i] = y.stride(i);
  }
  t.pos_dim = pos_dim;
  return t;
}

void rope_raw_case(std::vector<int64_t> shape, int pos_dim, torch::ScalarType dt) {
  const int64_t T = shape[pos_dim], hd = shape[3];
  const std::string what = "rope " + std::string(dt == kBF16 ? "bf16" : "fp32") + " " + c10::str(c10::IntArrayRef(shape)) +
                           " pos_dim " + std::to_string(pos_dim);
  auto [cos, sin] = rope_tables(T + 3, hd, 10000.0);
  auto kshape = shape;
  kshape[pos_dim == 1 ? 2 : 1] = std::max<int64_t>(1, shape[pos_dim == 1 ? 2 : 1] / 2);  // a GQA-sized k
  auto q = (torch::randn(shape) * 2.0).to(dt).to(kCuda), k = (torch::randn(kshape) * 2.0).to(dt).to(kCuda);
  auto cos_d = cos.to(kCuda), sin_d = sin.to(kCuda);
  for (bool backward : {false, true}) {
    auto qo = nan_like(q), ko = nan_like(k);
    ablate::kernels::RopeArgs a;
    a.t[0] = rope_desc(q, qo, pos_dim);
    a.t[1] = rope_desc(k, ko, pos_dim);
    a.cos = cos_d.data_ptr<float>();
    a.sin = sin_d.data_ptr<float>();
    a.table_rows = cos.size(0);
    a.head_dim = hd;
    a.bf16 = dt == kBF16;
    LAUNCH_OK(backward ? ablate::kernels::rope_backward_cuda(a, stream()) : ablate::kernels::rope_forward_cuda(a, stream()),
              what);
    // fp32 reference on the (rounded) inputs.
    auto qc = q.to(torch::kCPU).to(kF32), kc = k.to(torch::kCPU).to(kF32);
    auto qr = nan_like(qc), kr = nan_like(kc);
    ablate::kernels::RopeArgs r = a;
    r.t[0] = rope_desc(qc, qr, pos_dim);
    r.t[1] = rope_desc(kc, kr, pos_dim);
    r.cos = cos.data_ptr<float>();
    r.sin = sin.data_ptr<float>();
    r.bf16 = false;
    backward ? ablate::kernels::rope_backward_ref(r) : ablate::kernels::rope_forward_ref(r);
    const std::string w2 = what + (backward ? " bwd" : " fwd");
    if (dt == kF32) {
      // Two products and a sum (FMA-contracted on the GPU): a few ulps of the largest term, |x| * 1.
      const double xmax = std::max(qc.abs().max().item<double>(), kc.abs().max().item<double>());
      expect_close(qo, qr, 4 * kEpsF32, 4 * kEpsF32 * xmax, w2 + " q");
      expect_close(ko, kr, 4 * kEpsF32, 4 * kEpsF32 * xmax, w2 + " k");
    } else {
      expect_close(qo, qr, kEpsBF16, kEpsBF16 * 0.1, w2 + " q");  // one rounding of an fp32 result
      expect_close(ko, kr, kEpsBF16, kEpsBF16 * 0.1, w2 + " k");
      // The bf16 composite: forward = apply_rope in bf16; backward = autograd of it in bf16.
      const auto layout = pos_dim == 2 ? ablate::ops::RopeLayout::kBHTD : ablate::ops::RopeLayout::kBTHD;
      torch::Tensor comp;
      if (!backward) {
        comp = ablate::ops::rope_composite(q, cos_d, sin_d, layout);
      } else {
        auto qq = q.detach().clone().requires_grad_(true);
        auto out = ablate::ops::rope_composite(qq, cos_d, sin_d, layout);
        out.backward(q);  // upstream gradient = the same random tensor the raw backward rotated
        comp = qq.grad();
      }
      expect_bf16_within_2x(qo, comp, qr, w2);
    }
  }
}

TEST(FusedOpsGpu, RopeRawKernelsVsRef) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(11);
  for (auto dt : {kF32, kBF16}) {
    for (auto s : std::vector<std::vector<int64_t>>{{1, 1, 1, 64}, {1, 97, 3, 64}, {2, 33, 5, 128}, {1, 7, 2, 6},
                                                    {2, 300, 16, 128}, {1, 5, 3, 2}}) {
      rope_raw_case(s, /*pos_dim=*/1, dt);                          // [B, T, H, hd]
      rope_raw_case({s[0], s[2], s[1], s[3]}, /*pos_dim=*/2, dt);  // [B, H, T, hd]
    }
  }
}

TEST(FusedOpsGpu, RopeAdapterMatchesCpuAndComposite) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(12);
  const int64_t B = 2, T = 129, H = 8, KV = 2, hd = 128;
  auto [cos, sin] = rope_tables(T, hd);
  // The model's views: [B, T, H, hd] buffers seen as [B, H, T, hd].
  auto qm = torch::randn({B, T, H, hd}), km = torch::randn({B, T, KV, hd});
  auto gq = torch::randn({B, H, T, hd}), gk = torch::randn({B, KV, T, hd});
  auto run = [&](torch::Device dev, torch::ScalarType dt) {
    auto q = qm.to(dev, dt).transpose(1, 2).detach().requires_grad_(true);
    auto k = km.to(dev, dt).transpose(1, 2).detach().requires_grad_(true);
    auto [qo, ko] = ablate::ops::rope_qk(q, k, cos.to(dev), sin.to(dev));
    ((qo * gq.to(dev, dt)).sum() + (ko * gk.to(dev, dt)).sum()).backward();
    return std::vector<torch::Tensor>{qo, ko, q.grad(), k.grad()};
  };
  const auto cpu = run(torch::kCPU, kF32), gpu = run(kCuda, kF32);
  const char* names[] = {"q", "k", "dq", "dk"};
  for (int i = 0; i < 4; ++i) expect_close(gpu[i], cpu[i], 4 * kEpsF32, 1e-6, std::string("rope adapter fp32 ") + names[i]);
  EXPECT_EQ(gpu[0].strides(), qm.transpose(1, 2).strides()) << "output keeps the [B, T, H, hd] memory layout";
  const auto bf = run(kCuda, kBF16);
  for (int i = 0; i < 4; ++i) {
    auto comp_in = (i % 2 == 0 ? qm : km).to(kCuda, kBF16).transpose(1, 2).detach().requires_grad_(true);
    auto comp = ablate::ops::rope_composite(comp_in, cos.to(kCuda), sin.to(kCuda));
    comp.backward((i % 2 == 0 ? gq : gk).to(kCuda, kBF16));
    // fp32 reference on the bf16-rounded inputs.
    auto ref_in = (i % 2 == 0 ? qm : km).to(kBF16).to(kF32).transpose(1, 2).detach().requires_grad_(true);
    auto ref = ablate::ops::rope(ref_in, cos, sin);
    ref.backward((i % 2 == 0 ? gq : gk).to(kBF16).to(kF32));
    expect_bf16_within_2x(bf[i], i < 2 ? comp : comp_in.grad(), i < 2 ? ref : ref_in.grad(),
                          std::string("rope adapter ") + names[i]);
  }
}

// ------------------------------------------------------------------------------------------------ SwiGLU
void swiglu_raw_case(int64_t rows, int64_t cols, bool fused, torch::ScalarType dt) {
  const std::string what = std::string("swiglu ") + (dt == kBF16 ? "bf16 " : "fp32 ") + std::to_string(rows) + "x" +
                           std::to_string(cols) + (fused ? " fused" : "");
  // fused: gate/up are the halves of one [rows, 2 cols] buffer (row stride 2 cols), and so are the gradients.
  auto gu = (torch::randn({rows, 2 * cols}) * 3.0).to(dt).to(kCuda);
  auto g = fused ? gu.narrow(1, 0, cols) : gu.narrow(1, 0, cols).contiguous();
  auto u = fused ? gu.narrow(1, cols, cols) : gu.narrow(1, cols, cols).contiguous();
  auto dy = torch::randn({rows, cols}).to(dt).to(kCuda);
  auto out = torch::full({rows, cols}, NAN, g.options());
  auto dgu = torch::full({rows, 2 * cols}, NAN, g.options());
  auto dg = fused ? dgu.narrow(1, 0, cols) : torch::full({rows, cols}, NAN, g.options());
  auto du = fused ? dgu.narrow(1, cols, cols) : torch::full({rows, cols}, NAN, g.options());
  ablate::kernels::SwiGLUFwdArgs f{g.data_ptr(), u.data_ptr(), out.data_ptr(), rows, cols,
                                   g.stride(0),  u.stride(0),  out.stride(0), dt == kBF16};
  LAUNCH_OK(ablate::kernels::swiglu_forward_cuda(f, stream()), what + " fwd");
  ablate::kernels::SwiGLUBwdArgs b{dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                                   rows,          cols,         dy.stride(0), g.stride(0),   u.stride(0),
                                   dg.stride(0),  du.stride(0), dt == kBF16};
  LAUNCH_OK(ablate::kernels::swiglu_backward_cuda(b, stream()), what + " bwd");
  // fp32 reference on the rounded inputs (contiguous copies).
  auto gc = g.to(torch::kCPU, kF32).contiguous(), uc = u.to(torch::kCPU, kF32).contiguous();
  auto dyc = dy.to(torch::kCPU, kF32).contiguous();
  auto outr = nan_like(gc), dgr = nan_like(gc), dur = nan_like(gc);
  ablate::kernels::swiglu_forward_ref({gc.data_ptr(), uc.data_ptr(), outr.data_ptr(), rows, cols, cols, cols, cols, false});
  ablate::kernels::swiglu_backward_ref({dyc.data_ptr(), gc.data_ptr(), uc.data_ptr(), dgr.data_ptr(), dur.data_ptr(),
                                        rows, cols, cols, cols, cols, cols, cols, false});
  if (dt == kF32) {
    // expf (<= 2 ulp), a reciprocal and 2-3 products against a double reference.
    expect_close(out, outr, 16 * kEpsF32, 16 * kEpsF32, what + " out");
    expect_close(dg, dgr, 16 * kEpsF32, 16 * kEpsF32, what + " dgate");
    expect_close(du, dur, 16 * kEpsF32, 16 * kEpsF32, what + " dup");
  } else {
    auto gg = g.detach().clone().requires_grad_(true), uu = u.detach().clone().requires_grad_(true);
    auto comp = ablate::ops::swiglu_composite(gg, uu);
    comp.backward(dy);
    expect_bf16_within_2x(out, comp, outr, what + " out");
    expect_bf16_within_2x(dg, gg.grad(), dgr, what + " dgate");
    expect_bf16_within_2x(du, uu.grad(), dur, what + " dup");
  }
  if (fused) {
    const int64_t bad = (~torch::isfinite(dgu.to(torch::kCPU, kF32))).sum().item<int64_t>();
    EXPECT_EQ(bad, 0) << what << ": fused gradient has unwritten elements";
  }
}

TEST(FusedOpsGpu, SwiGLURawKernelsVsRef) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(21);
  for (auto dt : {kF32, kBF16})
    for (bool fused : {false, true})
      for (auto rc : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 97}, {129, 257}, {64, 1024}, {37, 2816},
                                                              {4096, 384}})
        swiglu_raw_case(rc.first, rc.second, fused, dt);
}

TEST(FusedOpsGpu, SwiGLUAdapterMatchesCpu) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(22);
  auto gu = torch::randn({2, 33, 2 * 96}) * 3.0;
  auto dy = torch::randn({2, 33, 96});
  auto run = [&](torch::Device dev) {
    auto x = gu.to(dev).detach().requires_grad_(true);
    auto y = ablate::ops::swiglu_fused(x);
    y.backward(dy.to(dev));
    auto g = gu.narrow(-1, 0, 96).to(dev).detach().requires_grad_(true);
    auto u = gu.narrow(-1, 96, 96).to(dev).detach().requires_grad_(true);
    auto y2 = ablate::ops::swiglu(g, u);
    y2.backward(dy.to(dev));
    return std::vector<torch::Tensor>{y, x.grad(), y2, g.grad(), u.grad()};
  };
  const auto cpu = run(torch::kCPU), gpu = run(kCuda);
  for (size_t i = 0; i < cpu.size(); ++i)
    expect_close(gpu[i], cpu[i], 16 * kEpsF32, 16 * kEpsF32, "swiglu adapter #" + std::to_string(i));
}

// ------------------------------------------------------------------------------------------------ residual + RMSNorm
void rmsres_raw_case(int64_t rows, int64_t cols, torch::ScalarType dt, torch::ScalarType wt, bool with_dh,
                     int variant) {
  const auto yt = (dt == kBF16 && wt == kBF16) ? kBF16 : kF32;
  const std::string what = std::string("rmsnorm_residual x ") + (dt == kBF16 ? "bf16" : "fp32") + " w " +
                           (wt == kBF16 ? "bf16 " : "fp32 ") + std::to_string(rows) + "x" + std::to_string(cols) +
                           (with_dh ? " +dh" : "") + " bwd variant " + std::to_string(variant);
  auto x = (torch::randn({rows, cols}) * 2.0).to(kCuda, dt), res = torch::randn({rows, cols}).to(kCuda, dt);
  auto w = (torch::rand({cols}) + 0.5).to(kCuda, wt);
  auto h = torch::full({rows, cols}, NAN, x.options()), y = torch::full({rows, cols}, NAN, x.options().dtype(yt));
  auto rstd = torch::full({rows}, NAN, x.options().dtype(kF32));
  ablate::kernels::RMSNormResidualFwdArgs f;
  f.x = x.data_ptr();
  f.residual = res.data_ptr();
  f.w = w.data_ptr();
  f.h = h.data_ptr();
  f.y = y.data_ptr();
  f.rstd = rstd.data_ptr<float>();
  f.rows = rows;
  f.cols = cols;
  f.eps = 1e-6f;
  f.bf16 = dt == kBF16;
  f.w_bf16 = wt == kBF16;
  LAUNCH_OK(ablate::kernels::rmsnorm_residual_forward_cuda(f, stream()), what + " fwd");
  auto dy = torch::randn({rows, cols}).to(kCuda, yt), dh = torch::randn({rows, cols}).to(kCuda, dt);
  auto dx = torch::full({rows, cols}, NAN, x.options()), dw = torch::full({cols}, NAN, x.options().dtype(kF32));
  auto ws = torch::full({ablate::kernels::rmsnorm_residual_bwd_workspace_floats(rows, cols)}, NAN,
                        x.options().dtype(kF32));
  ablate::kernels::RMSNormResidualBwdArgs b;
  b.dy = dy.data_ptr();
  b.dh = with_dh ? dh.data_ptr() : nullptr;
  b.h = h.data_ptr();
  b.w = w.data_ptr();
  b.rstd = rstd.data_ptr<float>();
  b.dx = dx.data_ptr();
  b.dw = dw.data_ptr<float>();
  b.workspace = ws.data_ptr<float>();
  b.rows = rows;
  b.cols = cols;
  b.bf16 = f.bf16;
  b.w_bf16 = f.w_bf16;
  b.variant = variant;
  LAUNCH_OK(ablate::kernels::rmsnorm_residual_backward_cuda(b, stream()), what + " bwd");

  // fp32 reference on the rounded inputs. The reference backward runs on its own h/rstd.
  auto xc = x.to(torch::kCPU, kF32), rc = res.to(torch::kCPU, kF32), wc = w.to(torch::kCPU, kF32);
  auto hr = nan_like(xc), yr = nan_like(xc), rstdr = torch::full({rows}, NAN);
  ablate::kernels::RMSNormResidualFwdArgs fr = f;
  fr.x = xc.data_ptr();
  fr.residual = rc.data_ptr();
  fr.w = wc.data_ptr();
  fr.h = hr.data_ptr();
  fr.y = yr.data_ptr();
  fr.rstd = rstdr.data_ptr<float>();
  fr.bf16 = fr.w_bf16 = false;
  ablate::kernels::rmsnorm_residual_forward_ref(fr);
  auto dyc = dy.to(torch::kCPU, kF32), dhc = dh.to(torch::kCPU, kF32);
  auto dxr = nan_like(xc), dwr = torch::full({cols}, NAN);
  ablate::kernels::RMSNormResidualBwdArgs br = b;
  br.dy = dyc.data_ptr();
  br.dh = with_dh ? dhc.data_ptr() : nullptr;
  br.h = hr.data_ptr();
  br.w = wc.data_ptr();
  br.rstd = rstdr.data_ptr<float>();
  br.dx = dxr.data_ptr();
  br.dw = dwr.data_ptr<float>();
  br.workspace = nullptr;
  br.bf16 = br.w_bf16 = false;
  ablate::kernels::rmsnorm_residual_backward_ref(br);

  if (dt == kF32 && wt == kF32) {
    // Row statistics sum cols terms in fp32: allow ~sqrt(cols) eps, and rows partial sums for dw.
    const double k = 8 * kEpsF32 * std::sqrt(double(cols));
    expect_close(h, hr, kEpsF32, 0, what + " h");
    expect_close(rstd, rstdr, k, 0, what + " rstd");
    expect_close(y, yr, k, k, what + " y");
    expect_close(dx, dxr, k, k * 4, what + " dx");
    expect_close(dw, dwr, 8 * kEpsF32 * std::sqrt(double(rows * cols)), 8 * kEpsF32 * std::sqrt(double(rows)) * 4,
                 what + " dw");
    return;
  }
  // Mixed / bf16: everything written, rstd within fp32 tolerance of the rounded-h statistics, and the 2x rule.
  expect_close(h, hr, kEpsBF16, 0, what + " h");
  auto xb = x.detach().clone().requires_grad_(true), rb = res.detach().clone().requires_grad_(true);
  auto wb = w.detach().clone().requires_grad_(true);
  auto [hc, yc] = ablate::ops::rmsnorm_residual_composite(xb, rb, wb, 1e-6);
  auto loss = (yc.to(kF32) * dy.to(kF32)).sum();
  if (with_dh) loss = loss + (hc.to(kF32) * dh.to(kF32)).sum();
  loss.backward();
  expect_close(rstd, rstdr, 4 * kEpsBF16, 0, what + " rstd");  // h is rounded to bf16 before the statistics
  expect_bf16_within_2x(y, yc, yr, what + " y");
  expect_bf16_within_2x(dx, xb.grad(), dxr, what + " dx");
  expect_bf16_within_2x(dw, wb.grad(), dwr, what + " dw");  // the kernel's dw is fp32 (the adapter casts it)
}

TEST(FusedOpsGpu, RMSNormResidualRawKernelsVsRef) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(31);
  // 1, 97, 257 columns: scalar path (257: register blocks of 9 warps); 4096 fp32 / 8192 bf16: the
  // widest register kernels (1024 threads); 12288: shared-memory variant at 48 KB; 20000: beyond 48 KB; 2500 and
  // 3000 rows: the persistent blocks loop over rows.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1},    {3, 97},    {129, 257}, {64, 1024},  {33, 4096},
                                                           {5, 8192}, {7, 12288}, {3, 20000}, {2500, 256}, {3000, 2048}};
  for (auto rc : shapes) {
    for (int variant : {1, 2, 3}) {  // every backward kernel variant (wide rows fall back to 1)
      rmsres_raw_case(rc.first, rc.second, kF32, kF32, true, variant);
      rmsres_raw_case(rc.first, rc.second, kBF16, kBF16, true, variant);
    }
    rmsres_raw_case(rc.first, rc.second, kF32, kF32, false, 0);
    rmsres_raw_case(rc.first, rc.second, kBF16, kF32, false, 0);
    rmsres_raw_case(rc.first, rc.second, kF32, kBF16, true, 0);
  }
}

TEST(FusedOpsGpu, RMSNormResidualAdapterMatchesCpu) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(32);
  auto x0 = torch::randn({3, 41, 768}) * 2.0, r0 = torch::randn({3, 41, 768}), w0 = torch::rand({768}) + 0.5;
  auto gy = torch::randn({3, 41, 768}), gh = torch::randn({3, 41, 768});
  auto run = [&](torch::Device dev) {
    // .detach(): on the CPU .to(dev) returns x0 itself, which must not become a grad-requiring leaf.
    auto x = x0.to(dev).detach().requires_grad_(true), r = r0.to(dev).detach().requires_grad_(true);
    auto w = w0.to(dev).detach().requires_grad_(true);
    auto [h, y] = ablate::ops::rmsnorm_residual(x, r, w, 1e-6);
    ((y * gy.to(dev)).sum() + (h * gh.to(dev)).sum()).backward();
    return std::vector<torch::Tensor>{h, y, x.grad(), r.grad(), w.grad()};
  };
  const auto cpu = run(torch::kCPU), gpu = run(kCuda);
  const double k = 8 * kEpsF32 * std::sqrt(768.0);
  const char* names[] = {"h", "y", "dx", "dresidual", "dw"};
  for (int i = 0; i < 5; ++i)
    expect_close(gpu[i], cpu[i], i == 4 ? k * 12 : k, i == 4 ? k * 12 : k * 4,
                 std::string("rmsnorm_residual adapter ") + names[i]);
}

// ------------------------------------------------------------------------------------------------ cross-entropy
void ce_raw_case(int64_t rows, int64_t V, int64_t pad, torch::ScalarType dt) {
  const std::string what = std::string("cross_entropy ") + (dt == kBF16 ? "bf16 " : "fp32 ") + std::to_string(rows) +
                           "x" + std::to_string(V) + " ld+" + std::to_string(pad);
  const int64_t ld = V + pad;
  auto buf = (torch::randn({rows, ld}) * 4.0).to(dt);
  if (pad > 0) buf.narrow(1, V, pad).fill_(123.0);
  auto t = torch::randint(0, V, {rows}, torch::kLong);
  if (rows > 2) t[1] = -100;  // ignored row
  if (rows > 3) t[3] = V;     // out-of-range target: NaN loss, zero gradient
  auto bd = buf.to(kCuda), td = t.to(kCuda);
  auto loss = torch::full({rows}, NAN, bd.options().dtype(kF32)), lse = torch::full({rows}, NAN, bd.options().dtype(kF32));
  auto scale = torch::full({1}, 0.37f, bd.options().dtype(kF32));
  ablate::kernels::CrossEntropyArgs a;
  a.logits = bd.data_ptr();
  a.targets = td.data_ptr<int64_t>();
  a.loss = loss.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.grad_scale = scale.data_ptr<float>();
  a.rows = rows;
  a.vocab = V;
  a.ld = ld;
  a.bf16 = dt == kBF16;
  LAUNCH_OK(ablate::kernels::cross_entropy_cuda(a, stream()), what);

  auto rb = buf.to(kF32).contiguous();
  auto logits_in = rb.narrow(1, 0, V).clone();
  auto lossr = torch::full({rows}, NAN), lser = torch::full({rows}, NAN);
  const float sc = 0.37f;
  ablate::kernels::CrossEntropyArgs r = a;
  r.logits = rb.data_ptr();
  r.targets = t.data_ptr<int64_t>();
  r.loss = lossr.data_ptr<float>();
  r.lse = lser.data_ptr<float>();
  r.grad_scale = &sc;
  r.bf16 = false;
  ablate::kernels::cross_entropy_ref(r);

  auto valid = (t != -100) & (t != V);
  auto lossv = loss.to(torch::kCPU).masked_select(valid), lossrv = lossr.masked_select(valid);
  const double lse_tol = 8 * kEpsF32 * (1.0 + std::log(double(V)));
  expect_close(lse.to(torch::kCPU), lser, lse_tol, lse_tol * 8, what + " lse");
  expect_close(lossv, lossrv, lse_tol * 4, lse_tol * 16, what + " loss");
  if (rows > 2) {
    EXPECT_EQ(loss[1].item<float>(), 0.f) << what << ": ignored row";
  }
  if (rows > 3) {
    EXPECT_TRUE(std::isnan(loss[3].item<float>())) << what << ": out-of-range target";
  }
  auto grad = bd.to(torch::kCPU, kF32).narrow(1, 0, V), gradr = rb.narrow(1, 0, V);
  if (dt == kF32) {
    expect_close(grad, gradr, 64 * kEpsF32, 64 * kEpsF32 * 0.37, what + " grad");
  } else {
    // Composite: d(sum CE)/d(logits) * scale through LibTorch autograd in fp32 on the bf16 logits, cast to bf16
    // (what the model's chunked CE does).
    auto lg = logits_in.to(kCuda).detach().requires_grad_(true);
    auto tt = td.clone().masked_fill_(td.eq(V), -100);  // torch would reject the out-of-range one
    auto l = torch::nn::functional::cross_entropy(
        lg, tt, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
    (l * 0.37).backward();
    expect_bf16_within_2x(grad, lg.grad().to(kBF16), gradr, what + " grad");
  }
  if (pad > 0) {
    EXPECT_EQ(bd.to(torch::kCPU, kF32).narrow(1, V, pad).ne(123.f).sum().item<int64_t>(), 0)
        << what << ": padding columns written";
  }
}

TEST(FusedOpsGpu, CrossEntropyRawKernelVsRef) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(41);
  for (auto dt : {kF32, kBF16}) {
    ce_raw_case(1, 1, 0, dt);
    ce_raw_case(3, 97, 0, dt);      // scalar path (97 not a multiple of the vector width)
    ce_raw_case(7, 1000, 8, dt);    // padded rows, vector path
    ce_raw_case(64, 32000, 0, dt);
    ce_raw_case(5, 151936, 0, dt);  // Qwen vocabulary
    ce_raw_case(6, 50001, 3, dt);   // fp32: ld % 4 == 0, vector body + 1-element tail; bf16: scalar path
    ce_raw_case(4, 1001, 7, dt);    // bf16: ld % 8 == 0, vector body + 1-element tail
  }
}

struct CeOut {
  torch::Tensor loss, dh, dw;
};

CeOut run_lce(const torch::Tensor& h0, const torch::Tensor& w0, const torch::Tensor& t, torch::Device dev,
              torch::ScalarType dt, bool composite, int64_t chunk) {
  auto h = h0.to(dev, dt).detach().requires_grad_(true), w = w0.to(dev, dt).detach().requires_grad_(true);
  auto td = t.to(dev);
  auto l = composite ? ablate::ops::linear_cross_entropy_composite(h, w, td)
                     : ablate::ops::linear_cross_entropy(h, w, td, chunk);
  (l * 1.3).backward();
  return {l.detach(), h.grad(), w.grad()};
}

TEST(FusedOpsGpu, LinearCrossEntropyAdapter) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(42);
  const int64_t N = 300, d = 256, V = 5003;  // odd V: scalar kernel path; chunks of 128 leave a partial last chunk
  auto h0 = torch::randn({N, d}), w0 = torch::randn({V, d}) * 0.1;
  auto t = torch::randint(0, V, {N}, torch::kLong);
  t.masked_fill_(torch::rand({N}) < 0.2, -100);
  // fp32: CUDA kernel path vs CPU reference path.
  const auto cpu = run_lce(h0, w0, t, torch::kCPU, kF32, false, 128);
  const auto gpu = run_lce(h0, w0, t, kCuda, kF32, false, 128);
  expect_close(gpu.loss, cpu.loss, 1e-5, 1e-5, "linear CE fp32 loss");
  expect_close(gpu.dh, cpu.dh, 1e-4, 1e-6, "linear CE fp32 dhidden");
  expect_close(gpu.dw, cpu.dw, 1e-4, 1e-6, "linear CE fp32 dweight");
  // bf16 (V a multiple of 8: vector path) vs the fp32 reference on rounded inputs, against the bf16 composite.
  const int64_t V2 = 4096;
  auto w2 = torch::randn({V2, d}) * 0.1;
  auto t2 = torch::randint(0, V2, {N}, torch::kLong);
  t2.masked_fill_(torch::rand({N}) < 0.2, -100);
  const auto ref = run_lce(h0.to(kBF16).to(kF32), w2.to(kBF16).to(kF32), t2, torch::kCPU, kF32, false, 64);
  const auto ours = run_lce(h0, w2, t2, kCuda, kBF16, false, 128);
  const auto comp = run_lce(h0, w2, t2, kCuda, kBF16, true, 0);
  expect_bf16_within_2x(ours.loss, comp.loss, ref.loss, "linear CE bf16 loss");
  expect_bf16_within_2x(ours.dh, comp.dh, ref.dh, "linear CE bf16 dhidden");
  expect_bf16_within_2x(ours.dw, comp.dw, ref.dw, "linear CE bf16 dweight");
  // Autocast: fp32 inputs, bf16 matmuls inside, gradients returned in fp32.
  {
    auto h = h0.to(kCuda).requires_grad_(true), w = w2.to(kCuda).requires_grad_(true);
    at::autocast::set_autocast_enabled(at::kCUDA, true);
    at::autocast::set_autocast_dtype(at::kCUDA, kBF16);
    auto l = ablate::ops::linear_cross_entropy(h, w, t2.to(kCuda), 128);
    at::autocast::set_autocast_enabled(at::kCUDA, false);
    at::autocast::clear_cache();
    (l * 1.3).backward();
    EXPECT_EQ(h.grad().scalar_type(), kF32);
    EXPECT_EQ(w.grad().scalar_type(), kF32);
    EXPECT_NEAR(l.item<double>(), ours.loss.item<double>(), 1e-4);
    expect_close(h.grad(), ours.dh.to(kF32), 2 * kEpsBF16, 1e-6, "linear CE autocast dhidden");
  }
}

#else  // !ABLATE_WITH_CUDA

TEST(FusedOpsGpu, RopeRawKernelsVsRef) { ABLATE_REQUIRE_CUDA(); }
TEST(FusedOpsGpu, RopeAdapterMatchesCpuAndComposite) { ABLATE_REQUIRE_CUDA(); }
TEST(FusedOpsGpu, SwiGLURawKernelsVsRef) { ABLATE_REQUIRE_CUDA(); }
TEST(FusedOpsGpu, SwiGLUAdapterMatchesCpu) { ABLATE_REQUIRE_CUDA(); }
TEST(FusedOpsGpu, RMSNormResidualRawKernelsVsRef) { ABLATE_REQUIRE_CUDA(); }
TEST(FusedOpsGpu, RMSNormResidualAdapterMatchesCpu) { ABLATE_REQUIRE_CUDA(); }
TEST(FusedOpsGpu, CrossEntropyRawKernelVsRef) { ABLATE_REQUIRE_CUDA(); }
TEST(FusedOpsGpu, LinearCrossEntropyAdapter) { ABLATE_REQUIRE_CUDA(); }

#endif

}  // namespace
