// CUDA paths (label gpu): the quantization and fused low-bit Adam kernels against the CPU reference, and
// every optimizer on CUDA against the same optimizer on CPU. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <sstream>

#include "core/optim/adamw.h"
#include "core/optim/optimizer.h"
#include "core/optim/quant_state.h"
#include "tests/require_cuda.h"

namespace ablate {
namespace {

using core::optim::NamedParams;
using core::optim::OptimConfig;
using kernels::QuantMap;

TEST(OptimGpuTest, QuantEncodeDecodeCudaMatchesCpuReferenceBitExactly) {
  ABLATE_REQUIRE_CUDA();
  torch::manual_seed(0);
  for (QuantMap m : {QuantMap::kDynamicSigned8, QuantMap::kDynamicUnsigned8, QuantMap::kDynamicSigned4,
                     QuantMap::kLinearUnsigned4, QuantMap::kLinearSquareSigned4, QuantMap::kLinearSquareSigned8}) {
    for (int64_t block : {256, 128, 64}) {
      const int64_t n = 5000;  // partial last block
      torch::Tensor x = torch::randn({n}) * torch::rand({n}).pow(4);
      if (m == QuantMap::kDynamicUnsigned8 || m == QuantMap::kLinearUnsigned4) x = x.abs();
      core::optim::QuantizedTensor c(n, m, block, torch::kCPU), g(n, m, block, torch::Device(torch::kCUDA));
      c.encode(x);
      g.encode(x.cuda());
      EXPECT_TRUE(torch::equal(c.codes(), g.codes().cpu())) << "map " << int(m) << " block " << block;
      EXPECT_TRUE(torch::equal(c.scale(), g.scale().cpu())) << "map " << int(m) << " block " << block;
      EXPECT_TRUE(torch::equal(c.decode(), g.decode().cpu())) << "map " << int(m) << " block " << block;
    }
  }
}

// Shapes chosen so that every Kronecker factor SOAP/Shampoo keeps is full rank from the first step: a side
// longer than max_precond_dim (32) stays unrotated, and a kept side is never longer than the other one
// (G G^T of an m x n gradient has rank min(m, n)). With a rank-deficient factor the eigenbasis of its null
// space is arbitrary, so CPU and GPU eigh legitimately pick different bases and the trajectories diverge:
// that would not be a bug, and the first version of this test failed on the H200 for exactly that reason.
NamedParams model(const torch::Device& d) {
  torch::manual_seed(3);
  return {{"tok_embeddings.weight", torch::randn({40, 16}).to(d).requires_grad_()},  // L skipped, R 16x16
          {"layers.0.proj.weight", torch::randn({24, 48}).to(d).requires_grad_()},  // L 24x24, R skipped
          {"layers.0.square.weight", torch::randn({20, 20}).to(d).requires_grad_()},  // both sides
          {"layers.0.norm.weight", torch::ones({16}).to(d).requires_grad_()},
          {"lm_head.weight", torch::randn({48, 24}).to(d).requires_grad_()}};  // L skipped, R 24x24
}

// CUDA and CPU run the same algorithm but not the same floating-point operations (eigh, QR, reductions), so
// the trajectories agree to rounding, amplified by the eigen-solvers; for the quantized preconditioners a
// rounding difference can also flip a code. The bound is relative to how far the parameters moved.
double cross_device_tolerance(const std::string& name) {
  if (name == "soap8bit" || name == "soap4bit") return 5e-2;
  if (name == "soap" || name == "shampoo") return 1e-3;
  return 1e-5;  // AdamW family: elementwise math, differences are fp32 rounding only
}

TEST(OptimGpuTest, EveryOptimizerOnCudaMatchesCpu) {
  ABLATE_REQUIRE_CUDA();
  OptimConfig cfg;
  cfg.lr = 1e-2;
  cfg.precondition_frequency = 2;
  cfg.max_precond_dim = 32;
  cfg.min_quant_numel = 256;  // quantize the moments of these small tensors too, so the low-bit paths run
  for (const auto& name : core::optim::optimizer_names()) {
    NamedParams c = model(torch::kCPU), g = model(torch::Device(torch::kCUDA));
    std::vector<torch::Tensor> start;
    for (auto& [n, p] : c) start.push_back(p.detach().clone());
    auto oc = make_optimizer(name, c, cfg);
    auto og = make_optimizer(name, g, cfg);
    for (int t = 1; t <= 5; ++t) {
      torch::manual_seed(100 + t);
      for (size_t k = 0; k < c.size(); ++k) {
        const torch::Tensor grad = torch::randn(c[k].second.sizes()) * 0.1;
        c[k].second.mutable_grad() = grad;
        g[k].second.mutable_grad() = grad.cuda();
      }
      oc->step();
      og->step();
    }
    for (size_t k = 0; k < c.size(); ++k) {
      const torch::Tensor pc = c[k].second.detach(), pg = g[k].second.detach().cpu();
      const double moved = (pc - start[k]).norm().item<double>();
      ASSERT_GT(moved, 0.0) << name << " " << c[k].first << " did not move";
      const double rel = (pc - pg).norm().item<double>() / moved;
      EXPECT_LE(rel, cross_device_tolerance(name)) << name << " " << c[k].first;
    }
    EXPECT_EQ(oc->state_bytes(), og->state_bytes()) << name;
  }
}

TEST(OptimGpuTest, FusedLowBitAdamKernelMatchesReferenceCodes) {
  ABLATE_REQUIRE_CUDA();
  OptimConfig cfg;
  cfg.lr = 1e-2;
  for (int bits : {8, 4}) {
    torch::manual_seed(bits);
    const torch::Tensor init = torch::randn({256, 512});
    torch::Tensor pc = init.clone().requires_grad_(), pg = init.cuda().requires_grad_();
    core::optim::AdamWLowBit oc({{{}, {pc}, 0.1}}, cfg, bits), og({{{}, {pg}, 0.1}}, cfg, bits);
    for (int t = 0; t < 3; ++t) {
      const torch::Tensor grad = torch::randn({256, 512});
      pc.mutable_grad() = grad;
      pg.mutable_grad() = grad.cuda();
      oc.step();
      og.step();
    }
    EXPECT_LE((pc.detach() - pg.detach().cpu()).abs().max().item<double>(), 1e-6) << bits;
    const int64_t differ = oc.exp_avg_quantized(0).codes().ne(og.exp_avg_quantized(0).codes().cpu()).sum().item<int64_t>();
    EXPECT_LE(differ, 4) << bits << "-bit m codes differ between CUDA and CPU";
  }
}

// Parameters for the multi-tensor tests: two groups (weight decay 0.1 and 0), sizes from one quantization
// block to thousands, some left unquantized (numel % block != 0 or below min_quant_numel) and, in the decayed
// group, one contiguous view at a 4-byte offset (not 16-byte aligned, so it takes the per-tensor path).
std::vector<core::optim::ParamGroup> multi_tensor_groups(const torch::Device& d) {
  torch::manual_seed(11);
  const std::vector<std::vector<int64_t>> decay_shapes = {{64, 4}, {512, 512}, {128, 3}, {1024, 130}, {2, 1024}};
  const std::vector<std::vector<int64_t>> no_decay_shapes = {{128}, {256}, {3000}, {40, 256}, {512}};
  core::optim::ParamGroup decay, no_decay;
  decay.weight_decay = 0.1;
  no_decay.weight_decay = 0.0;
  for (const auto& s : decay_shapes) decay.params.push_back(torch::randn(s).to(d));
  for (const auto& s : no_decay_shapes) no_decay.params.push_back(torch::randn(s).to(d));
  decay.params.push_back(torch::randn({4096 + 1}).to(d).narrow(0, 1, 4096));  // misaligned view
  return {decay, no_decay};
}

struct MultiTensorRun {
  std::vector<core::optim::ParamGroup> groups;
  std::unique_ptr<core::optim::AdamWLowBit> opt;
};

// Steps a multi-tensor CUDA, a per-tensor CUDA and a CPU AdamWLowBit through the same gradients. At step 3
// parameter 1 has no gradient, so from then on its step count differs from the others' (a separate launch).
std::vector<MultiTensorRun> run_multi_tensor_case(int bits, int64_t block, int steps) {
  OptimConfig cfg;
  cfg.lr = 1e-2;
  cfg.beta2 = 0.95;
  cfg.block_size = block;
  cfg.min_quant_numel = 128;
  std::vector<MultiTensorRun> runs(3);
  const torch::Device cuda(torch::kCUDA), cpu(torch::kCPU);
  runs[0].groups = multi_tensor_groups(cuda);
  runs[1].groups = multi_tensor_groups(cuda);
  runs[2].groups = multi_tensor_groups(cpu);
  for (int r = 0; r < 3; ++r) {
    runs[r].opt = std::make_unique<core::optim::AdamWLowBit>(runs[r].groups, cfg, bits);
    runs[r].opt->set_multi_tensor(r == 0);
  }
  for (int t = 1; t <= steps; ++t) {
    torch::manual_seed(200 + t);
    for (int64_t i = 0; i < runs[0].opt->num_params(); ++i) {
      const auto sizes = runs[0].opt->param(i).sizes();
      // Magnitudes over several decades, so that the codes span the maps.
      const torch::Tensor grad = torch::randn(sizes) * torch::pow(10.0, torch::rand(sizes) * -6.0);
      for (auto& run : runs) {
        torch::Tensor p = run.opt->param(i);
        p.mutable_grad() = (t == 3 && i == 1) ? torch::Tensor() : grad.to(p.device());
      }
    }
    for (auto& run : runs) run.opt->step();
  }
  return runs;
}

bool bit_equal(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor x = a.detach().cpu().contiguous(), y = b.detach().cpu().contiguous();
  return x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type() &&
         std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

// The multi-tensor CUDA launch (one per group) against the per-tensor CUDA kernel: parameters, codes and scales
// of the quantized tensors bit-identical after every kind of tensor took several steps; 8- and 4-bit, every
// block size the kernel takes; the unquantized ones (torch _foreach ops vs per-tensor ops) equal to fp32 rounding.
TEST(OptimGpuTest, MultiTensorLowBitAdamMatchesPerTensorKernelBitExactly) {
  ABLATE_REQUIRE_CUDA();
  for (int bits : {8, 4}) {
    for (int64_t block : {128, 256, 512}) {
      auto runs = run_multi_tensor_case(bits, block, 5);
      const auto& multi = *runs[0].opt;
      const auto& per = *runs[1].opt;
      int64_t quantized = 0;
      for (int64_t i = 0; i < multi.num_params(); ++i) {
        const std::string where = std::to_string(bits) + "-bit block " + std::to_string(multi.block_size()) +
                                  " param " + std::to_string(i);
        ASSERT_EQ(multi.is_quantized(i), per.is_quantized(i)) << where;
        EXPECT_EQ(multi.step_count(i), per.step_count(i)) << where;
        if (multi.is_quantized(i)) {
          EXPECT_TRUE(bit_equal(multi.param(i), per.param(i))) << where << ": parameters differ";
          ++quantized;
          EXPECT_TRUE(bit_equal(multi.exp_avg_quantized(i).codes(), per.exp_avg_quantized(i).codes())) << where;
          EXPECT_TRUE(bit_equal(multi.exp_avg_quantized(i).scale(), per.exp_avg_quantized(i).scale())) << where;
          EXPECT_TRUE(bit_equal(multi.exp_avg_sq_quantized(i).codes(), per.exp_avg_sq_quantized(i).codes())) << where;
          EXPECT_TRUE(bit_equal(multi.exp_avg_sq_quantized(i).scale(), per.exp_avg_sq_quantized(i).scale())) << where;
        } else {
          // Unquantized tensors: the same torch ops as _foreach ops (multi) or one by one (per tensor); CUDA's
          // scalar division may round differently between the two kernels, so these agree to fp32 rounding.
          const auto close = [](const torch::Tensor& x, const torch::Tensor& y) {
            const double scale = std::max(y.abs().max().item<double>(), 1e-30);
            return (x.cpu() - y.cpu()).abs().max().item<double>() <= 1e-6 * scale;
          };
          EXPECT_TRUE(close(multi.param(i), per.param(i))) << where << ": parameters differ";
          EXPECT_TRUE(close(multi.exp_avg(i), per.exp_avg(i))) << where;
          EXPECT_TRUE(close(multi.exp_avg_sq(i), per.exp_avg_sq(i))) << where;
        }
      }
      EXPECT_GE(quantized, 5) << bits << "-bit block " << block << ": too few quantized tensors to mean anything";
      EXPECT_EQ(multi.state_bytes(), per.state_bytes());
    }
  }
}

// The same run against the CPU reference (adam_lowbit_step_ref), quantized tensors only (the unquantized ones go
// through torch ops, whose CUDA and CPU kernels round differently): both use IEEE fp32 operations in the same
// order without FMA contraction, so they are expected bit-identical as well.
TEST(OptimGpuTest, MultiTensorLowBitAdamMatchesCpuReferenceBitExactly) {
  ABLATE_REQUIRE_CUDA();
  for (int bits : {8, 4}) {
    for (int64_t block : {128, 256, 512}) {
      auto runs = run_multi_tensor_case(bits, block, 5);
      const auto& multi = *runs[0].opt;
      const auto& ref = *runs[2].opt;
      for (int64_t i = 0; i < multi.num_params(); ++i) {
        if (!multi.is_quantized(i)) continue;
        const std::string where = std::to_string(bits) + "-bit block " + std::to_string(multi.block_size()) +
                                  " param " + std::to_string(i);
        EXPECT_TRUE(bit_equal(multi.param(i), ref.param(i)))
            << where << ": max |diff| " << (multi.param(i).cpu() - ref.param(i)).abs().max().item<double>();
        EXPECT_TRUE(bit_equal(multi.exp_avg_quantized(i).codes(), ref.exp_avg_quantized(i).codes())) << where;
        EXPECT_TRUE(bit_equal(multi.exp_avg_quantized(i).scale(), ref.exp_avg_quantized(i).scale())) << where;
        EXPECT_TRUE(bit_equal(multi.exp_avg_sq_quantized(i).codes(), ref.exp_avg_sq_quantized(i).codes())) << where;
        EXPECT_TRUE(bit_equal(multi.exp_avg_sq_quantized(i).scale(), ref.exp_avg_sq_quantized(i).scale())) << where;
      }
    }
  }
}

// A resumed multi-tensor run continues bit-identically: the state layout (and so the checkpoint format) is the
// per-tensor one.
TEST(OptimGpuTest, MultiTensorLowBitAdamCheckpointResumes) {
  ABLATE_REQUIRE_CUDA();
  for (int bits : {8, 4}) {
    auto runs = run_multi_tensor_case(bits, 0, 2);
    auto& a = *runs[0].opt;
    std::stringstream buf;
    {
      torch::serialize::OutputArchive ar;
      a.save(ar);
      ar.save_to(buf);
    }
    auto groups = multi_tensor_groups(torch::Device(torch::kCUDA));
    for (size_t g = 0; g < groups.size(); ++g)
      for (size_t k = 0; k < groups[g].params.size(); ++k) groups[g].params[k].copy_(runs[0].groups[g].params[k]);
    OptimConfig cfg;
    cfg.lr = 1e-2;
    cfg.beta2 = 0.95;
    cfg.min_quant_numel = 128;
    core::optim::AdamWLowBit b(groups, cfg, bits);
    {
      torch::serialize::InputArchive ar;
      ar.load_from(buf);
      b.load(ar);
    }
    b.set_multi_tensor(true);
    a.set_multi_tensor(true);
    for (int t = 0; t < 2; ++t) {
      torch::manual_seed(500 + t);
      for (int64_t i = 0; i < a.num_params(); ++i) {
        const torch::Tensor grad = torch::randn(a.param(i).sizes()).cuda() * 1e-2;
        torch::Tensor pa = a.param(i), pb = b.param(i);
        pa.mutable_grad() = grad;
        pb.mutable_grad() = grad.clone();
      }
      a.step();
      b.step();
    }
    for (int64_t i = 0; i < a.num_params(); ++i) {
      EXPECT_TRUE(bit_equal(a.param(i), b.param(i))) << bits << "-bit param " << i;
      if (a.is_quantized(i)) {
        EXPECT_TRUE(bit_equal(a.exp_avg_quantized(i).codes(), b.exp_avg_quantized(i).codes())) << bits << " " << i;
        EXPECT_TRUE(bit_equal(a.exp_avg_sq_quantized(i).scale(), b.exp_avg_sq_quantized(i).scale())) << bits << " " << i;
      }
    }
  }
}

}  // namespace
}  // namespace ablate
