// core::causal_attention on CUDA: bf16/fp16 take SDPA's enable_gqa (flash / cuDNN, no K/V copy), fp32 expands K/V.
// Each is held to the rule of bench/mixers K1: max|ours - fp32 composite| <= 2 max|same-dtype composite - fp32
// composite| + 1e-3, for the output and q/k/v gradients.
#include "core/mixers/causal_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tests/require_cuda.h"

namespace ablate::core {
namespace {

torch::Tensor composite(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t H = q.size(1), KV = k.size(1), T = q.size(2);
  auto kk = k.repeat_interleave(H / KV, 1), vv = v.repeat_interleave(H / KV, 1);
  auto s = torch::matmul(q, kk.transpose(-1, -2)) * (1.0 / std::sqrt(double(q.size(3))));
  auto mask = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool).device(q.device())).triu(1);
  return torch::matmul(torch::softmax(s.masked_fill(mask, -std::numeric_limits<double>::infinity()), -1), vv);
}

std::vector<torch::Tensor> out_and_grads(torch::Tensor (*f)(const torch::Tensor&, const torch::Tensor&,
                                                            const torch::Tensor&),
                                         const std::vector<torch::Tensor>& in, const torch::Tensor& gy,
                                         torch::ScalarType dt) {
  auto q = in[0].to(dt).requires_grad_(true), k = in[1].to(dt).requires_grad_(true),
       v = in[2].to(dt).requires_grad_(true);
  auto y = f(q, k, v);
  auto g = torch::autograd::grad({y}, {q, k, v}, {gy.to(dt)});
  return {y.detach().to(torch::kFloat32), g[0].to(torch::kFloat32), g[1].to(torch::kFloat32),
          g[2].to(torch::kFloat32)};
}

TEST(CausalAttentionGpu, MatchesCompositeWithinTwiceItsError) {
  ABLATE_REQUIRE_CUDA();
  for (auto [H, KV] : {std::pair<int64_t, int64_t>{16, 8}, {16, 1}, {8, 8}}) {
    torch::manual_seed(5);
    const auto opt = torch::TensorOptions().device(torch::kCUDA);
    std::vector<torch::Tensor> in = {torch::randn({2, H, 512, 128}, opt), torch::randn({2, KV, 512, 128}, opt),
                                     torch::randn({2, KV, 512, 128}, opt)};
    const auto gy = torch::randn({2, H, 512, 128}, opt);
    const auto ref = out_and_grads(composite, in, gy, torch::kFloat32);
    for (auto dt : {torch::kBFloat16, torch::kHalf, torch::kFloat32}) {
      const auto ours = out_and_grads(causal_attention, in, gy, dt);
      const auto comp = out_and_grads(composite, in, gy, dt);
      const char* names[] = {"o", "dq", "dk", "dv"};
      for (int i = 0; i < 4; ++i) {
        const double e = (ours[i] - ref[i]).abs().max().item<double>();
        const double ec = (comp[i] - ref[i]).abs().max().item<double>();
        EXPECT_LE(e, 2 * ec + 1e-3) << names[i] << " H" << H << "/" << KV << " " << c10::toString(dt);
      }
    }
  }
}

}  // namespace
}  // namespace ablate::core
