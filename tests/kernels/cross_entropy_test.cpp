// Fused linear + cross-entropy: the CPU reference path (chunks + cross_entropy_ref) against the full-logits LibTorch
// composite, loss and gradients, fp32, awkward shapes and chunkings, ignored targets; the raw reference kernel
// against log_softmax.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/ops/cross_entropy.h"
#include "kernels/cross_entropy.h"

namespace {

double max_err(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

struct Case {
  int64_t N, d, V, chunk;
  double ignore_frac;
};

void check(const Case& c) {
  auto h = torch::randn({c.N, c.d}).requires_grad_(true);
  auto w = (torch::randn({c.V, c.d}) * 0.5).requires_grad_(true);
  auto t = torch::randint(0, c.V, {c.N}, torch::kLong);
  t.masked_fill_(torch::rand({c.N}) < c.ignore_frac, -100);
  auto h2 = h.detach().clone().requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  auto l1 = ablate::ops::linear_cross_entropy(h, w, t, c.chunk);
  auto l2 = ablate::ops::linear_cross_entropy_composite(h2, w2, t);
  EXPECT_EQ(l1.scalar_type(), torch::kFloat32);
  EXPECT_NEAR(l1.item<double>(), l2.item<double>(), 1e-5 * (1.0 + std::abs(l2.item<double>())))
      << "loss N=" << c.N << " d=" << c.d << " V=" << c.V << " chunk=" << c.chunk;
  (l1 * 1.7).backward();  // a non-unit upstream gradient exercises the backward's rescaling
  (l2 * 1.7).backward();
  EXPECT_LT(max_err(h.grad(), h2.grad()), 1e-5) << "dhidden N=" << c.N << " V=" << c.V;
  EXPECT_LT(max_err(w.grad(), w2.grad()), 1e-5) << "dweight N=" << c.N << " V=" << c.V;
}

TEST(LinearCrossEntropyRef, MatchesFullLogitsComposite) {
  torch::manual_seed(1);
  for (const Case& c : std::vector<Case>{{1, 1, 1, 0, 0.0},
                                         {3, 8, 97, 0, 0.0},
                                         {3, 8, 97, 1, 0.3},
                                         {37, 16, 211, 5, 0.2},
                                         {64, 64, 1000, 17, 0.1},
                                         {130, 32, 129, 128, 0.5}})
    check(c);
}

TEST(LinearCrossEntropyRef, AllIgnoredGivesZeroLossAndGradients) {
  auto h = torch::randn({6, 4}).requires_grad_(true), w = torch::randn({9, 4}).requires_grad_(true);
  auto t = torch::full({6}, -100, torch::kLong);
  auto l = ablate::ops::linear_cross_entropy(h, w, t, 4);
  EXPECT_EQ(l.item<float>(), 0.f);
  l.backward();
  EXPECT_EQ(h.grad().abs().max().item<float>(), 0.f);
  EXPECT_EQ(w.grad().abs().max().item<float>(), 0.f);
}

TEST(LinearCrossEntropyRef, NoGradPathSkipsGradients) {
  auto h = torch::randn({5, 4}), w = torch::randn({7, 4});
  auto t = torch::randint(0, 7, {5}, torch::kLong);
  EXPECT_NEAR(ablate::ops::linear_cross_entropy(h, w, t, 2).item<double>(),
              ablate::ops::linear_cross_entropy_composite(h, w, t).item<double>(), 1e-5);
}

TEST(CrossEntropyRawRef, MatchesLogSoftmaxAndWritesGradInPlace) {
  torch::manual_seed(2);
  const int64_t rows = 7, V = 50, ld = 53;  // padded rows: the last 3 columns must stay untouched
  auto buf = torch::randn({rows, ld}) * 5.0;
  buf.narrow(1, V, ld - V).fill_(123.f);
  auto logits = buf.narrow(1, 0, V).clone();
  auto t = torch::randint(0, V, {rows}, torch::kLong);
  t[2] = -100;  // ignored
  t[5] = V;     // out of range: NaN loss, zero gradient
  auto loss = torch::full({rows}, std::nanf("")), lse = torch::full({rows}, std::nanf(""));
  const float scale = 0.25f;
  ablate::kernels::CrossEntropyArgs a;
  a.logits = buf.data_ptr<float>();
  a.targets = t.data_ptr<int64_t>();
  a.loss = loss.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.grad_scale = &scale;
  a.rows = rows;
  a.vocab = V;
  a.ld = ld;
  ablate::kernels::cross_entropy_ref(a);
  const auto logp = torch::log_softmax(logits.to(torch::kFloat64), 1);
  const auto ref_lse = torch::logsumexp(logits.to(torch::kFloat64), 1);
  EXPECT_LT(max_err(lse, ref_lse), 1e-5);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tr = t[r].item<int64_t>();
    if (tr == -100) {
      EXPECT_EQ(loss[r].item<float>(), 0.f);
      EXPECT_EQ(buf[r].narrow(0, 0, V).abs().max().item<float>(), 0.f);
    } else if (tr == V) {
      EXPECT_TRUE(std::isnan(loss[r].item<float>()));
      EXPECT_EQ(buf[r].narrow(0, 0, V).abs().max().item<float>(), 0.f);
    } else {
      EXPECT_NEAR(loss[r].item<double>(), -logp[r][tr].item<double>(), 1e-5);
      auto g = logp[r].exp() * scale;
      g[tr] -= scale;
      EXPECT_LT(max_err(buf[r].narrow(0, 0, V), g), 1e-6);
    }
  }
  EXPECT_EQ(buf.narrow(1, V, ld - V).ne(123.f).sum().item<int64_t>(), 0) << "padding columns were written";
}

TEST(LinearCrossEntropyRef, RejectsBadShapes) {
  auto h = torch::randn({4, 8}), w = torch::randn({10, 8});
  EXPECT_THROW(ablate::ops::linear_cross_entropy(h, torch::randn({10, 7}), torch::zeros({4}, torch::kLong)),
               c10::Error);
  EXPECT_THROW(ablate::ops::linear_cross_entropy(h, w, torch::zeros({5}, torch::kLong)), c10::Error);
  EXPECT_THROW(ablate::ops::linear_cross_entropy(h, w, torch::zeros({4}, torch::kFloat32)), c10::Error);
}

}  // namespace
