// core::causal_attention (the Transformer's attention call) against softmax(QK^T/sqrt(d) + causal mask)V written
// out with K/V repeat-interleaved to the query heads: forward and gradients, MHA and GQA, fp32 and fp64 on CPU.
#include "core/mixers/causal_attention.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::grads_of;
using testing::rel_err;

torch::Tensor composite(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t H = q.size(1), KV = k.size(1), T = q.size(2);
  auto kk = k.repeat_interleave(H / KV, 1), vv = v.repeat_interleave(H / KV, 1);
  auto s = torch::matmul(q, kk.transpose(-1, -2)) / std::sqrt(double(q.size(3)));
  auto mask = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool)).triu(1);
  return torch::matmul(torch::softmax(s.masked_fill(mask, -std::numeric_limits<double>::infinity()), -1), vv);
}

struct Shape {
  int64_t H, KV;
  torch::ScalarType dtype;
  double tol;
};

class CausalAttention : public ::testing::TestWithParam<Shape> {};

TEST_P(CausalAttention, MatchesCompositeForwardAndBackward) {
  const auto s = GetParam();
  torch::manual_seed(3);
  const auto opt = torch::TensorOptions().dtype(s.dtype);
  std::vector<torch::Tensor> in = {torch::randn({2, s.H, 37, 16}, opt), torch::randn({2, s.KV, 37, 16}, opt),
                                   torch::randn({2, s.KV, 37, 16}, opt)};
  const auto w = torch::randn({2, s.H, 37, 16}, opt);  // a fixed cotangent through a weighted sum
  auto ours = [&](const std::vector<torch::Tensor>& x) { return (causal_attention(x[0], x[1], x[2]) * w).sum(); };
  auto ref = [&](const std::vector<torch::Tensor>& x) { return (composite(x[0], x[1], x[2]) * w).sum(); };
  EXPECT_LE(rel_err(causal_attention(in[0], in[1], in[2]), composite(in[0], in[1], in[2])), s.tol);
  const auto go = grads_of(ours, in), gr = grads_of(ref, in);
  for (size_t i = 0; i < go.size(); ++i) EXPECT_LE(rel_err(go[i], gr[i]), s.tol) << "gradient of input " << i;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CausalAttention,
                         ::testing::Values(Shape{4, 4, torch::kFloat32, 1e-5}, Shape{8, 2, torch::kFloat32, 1e-5},
                                           Shape{8, 1, torch::kFloat64, 1e-12}, Shape{6, 3, torch::kFloat64, 1e-12}));

TEST(CausalAttentionErrors, HeadsNotAMultipleOfKvHeads) {
  auto q = torch::randn({1, 6, 8, 16}), k = torch::randn({1, 4, 8, 16});
  EXPECT_THROW(causal_attention(q, k, k), c10::Error);
}

}  // namespace
}  // namespace ablate::core
