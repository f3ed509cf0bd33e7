// Model pieces: RoPE, GQA attention and causality, chunked CE, LR schedule, sizing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/config.h"
#include "core/model.h"

using namespace ablate;

TEST(Rope, MatchesDirectFormula) {
  const int64_t H = 2, T = 9, hd = 8;
  const double theta = 500000.0;
  auto x = torch::randn({1, H, T, hd}, torch::kFloat64);
  auto [cos, sin] = rope_tables(T, hd, theta, torch::kCPU);
  auto y = apply_rope(x.to(torch::kFloat32), cos, sin).to(torch::kFloat64);
  auto xa = x.accessor<double, 4>();
  auto ya = y.accessor<double, 4>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < hd / 2; ++i) {
        const double a = double(t) * std::pow(theta, -2.0 * double(i) / double(hd));
        const double x1 = xa[0][h][t][i], x2 = xa[0][h][t][i + hd / 2];
        EXPECT_NEAR(ya[0][h][t][i], x1 * std::cos(a) - x2 * std::sin(a), 1e-5);
        EXPECT_NEAR(ya[0][h][t][i + hd / 2], x2 * std::cos(a) + x1 * std::sin(a), 1e-5);
      }
}

TEST(Attention, GqaMatchesRepeatInterleaveReference) {
  torch::manual_seed(0);
  ModelDims m = resolve_model_size("tiny", 257);  // H=4, KV=2
  Attention attn(m);
  const int64_t B = 2, T = 7;
  auto x = torch::randn({B, T, m.d});
  auto [cos, sin] = rope_tables(T, m.head_dim, 10000.0, torch::kCPU);
  auto out = attn->forward(x, cos, sin);
  // Reference: explicit repeat-interleave of K/V heads and a masked softmax.
  auto q = apply_rope(attn->q(x).view({B, T, m.n_heads, m.head_dim}).transpose(1, 2), cos, sin);
  auto k = apply_rope(attn->k(x).view({B, T, m.n_kv_heads, m.head_dim}).transpose(1, 2), cos, sin);
  auto v = attn->v(x).view({B, T, m.n_kv_heads, m.head_dim}).transpose(1, 2);
  const int64_t groups = m.n_heads / m.n_kv_heads;
  k = k.repeat_interleave(groups, 1);
  v = v.repeat_interleave(groups, 1);
  auto s = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(double(m.head_dim));
  auto mask = torch::ones({T, T}, torch::kBool).triu(1);
  s = s.masked_fill(mask, -std::numeric_limits<float>::infinity());
  auto ref = torch::matmul(torch::softmax(s, -1), v).transpose(1, 2).reshape({B, T, -1});
  EXPECT_TRUE(torch::allclose(out, attn->o(ref), 1e-5, 1e-5));
}

TEST(Model, OutputAtTIndependentOfLaterTokens) {
  torch::manual_seed(1);
  Transformer model(resolve_model_size("tiny", 257), 500000.0);
  auto ids = torch::randint(0, 257, {2, 16}, torch::kInt64);
  auto ids2 = ids.clone();
  ids2.narrow(1, 6, 10).random_(0, 257);
  torch::NoGradGuard ng;
  auto a = model->logits(ids), b = model->logits(ids2);
  EXPECT_TRUE(torch::allclose(a.narrow(1, 0, 6), b.narrow(1, 0, 6), 1e-6, 1e-6));
  EXPECT_FALSE(torch::allclose(a.narrow(1, 6, 10), b.narrow(1, 6, 10), 1e-3, 1e-3)) << "later positions must change";
}

TEST(ChunkedCE, EqualsFullLogitsValueAndGrad) {
  torch::manual_seed(2);
  const int64_t N = 50, d = 16, V = 37;
  auto h = torch::randn({N, d}, torch::kFloat64).requires_grad_(true);
  auto w = torch::randn({V, d}, torch::kFloat64).requires_grad_(true);
  auto t = torch::randint(0, V, {N}, torch::kInt64);
  t.index_put_({torch::tensor({0, 5, 49})}, -100);
  auto h2 = h.detach().clone().requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  auto l1 = chunked_linear_cross_entropy(h, w, t, /*chunk_rows=*/7);
  auto l2 = torch::nn::functional::cross_entropy(torch::matmul(h2, w2.t()), t,
                                                 torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
  EXPECT_NEAR(l1.item<double>(), l2.item<double>(), 1e-6);
  (l1 * 3.0).backward();
  (l2 * 3.0).backward();
  EXPECT_TRUE(torch::allclose(h.grad(), h2.grad(), 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(w.grad(), w2.grad(), 1e-5, 1e-6));
}

TEST(LrSchedule, WarmupThenCosine) {
  const double lr = 1e-3;
  EXPECT_DOUBLE_EQ(lr_at_step(1, lr, 10, 110, 0.1), 1e-4);  // first step is lr/W, not 0
  EXPECT_DOUBLE_EQ(lr_at_step(5, lr, 10, 110, 0.1), 5e-4);
  EXPECT_DOUBLE_EQ(lr_at_step(10, lr, 10, 110, 0.1), 1e-3);
  EXPECT_NEAR(lr_at_step(60, lr, 10, 110, 0.1), lr * (0.1 + 0.45), 1e-12);  // halfway: cos = 0
  EXPECT_NEAR(lr_at_step(110, lr, 10, 110, 0.1), 1e-4, 1e-12);
  EXPECT_NEAR(lr_at_step(50, lr, 0, 100, 0.0), 5e-4, 1e-12);
}

TEST(Sizing, ParsesSizeStrings) {
  EXPECT_EQ(parse_size_string("0.6B"), 600000000);
  EXPECT_EQ(parse_size_string("100M"), 100000000);
  EXPECT_EQ(parse_size_string(" 1.5b "), 1500000000);
  EXPECT_EQ(parse_size_string("2500K"), 2500000);
  EXPECT_THROW(parse_size_string("huge"), ConfigError);
  EXPECT_THROW(parse_size_string("1.2.3B"), ConfigError);
}

TEST(Sizing, SearchHitsNamedSizesWithValidHeads) {
  for (auto [name, target] : std::vector<std::pair<std::string, double>>{
           {"100M", 1e8}, {"0.6B", 6e8}, {"1B", 1e9}, {"4B", 4e9}, {"8B", 8e9}}) {
    const auto m = resolve_model_size(name, 257);
    const double p = double(count_params(m));
    EXPECT_LT(std::abs(p - target) / target, 0.10) << name << " -> " << m.to_string() << " params " << p;
    EXPECT_GE(m.n_heads, m.n_kv_heads) << name;
    EXPECT_EQ(m.n_heads % m.n_kv_heads, 0) << name;
    EXPECT_EQ(m.n_heads * m.head_dim, m.d) << name;
  }
}

TEST(Sizing, CountEqualsBuiltModel) {
  for (const std::string s : {"tiny", "mini", "small", "3M"}) {
    const auto m = resolve_model_size(s, 257);
    Transformer model(m, 500000.0);
    int64_t n = 0;
    for (const auto& p : model->parameters()) n += p.numel();
    EXPECT_EQ(n, count_params(m)) << m.to_string();
  }
  const auto tiny = resolve_model_size("tiny", 257);
  EXPECT_EQ(tiny.padded_vocab, 320);
  EXPECT_EQ(tiny.intermediate, 192);  // ceil64(8*64/3 = 170)
}

// Initialisation (core/mixers/param_init.h): Linears and the embedding are allocated unfilled and filled once in
// parallel. Every family: no parameter left unfilled (all finite, every N(0, s) weight with a plausible spread),
// and the values depend on the seed only, not on the thread count.
TEST(Model, InitFillsEveryParameterAndIgnoresThreadCount) {
  const int threads = at::get_num_threads();
  for (const char* pattern : {"A", "M", "D", "MDMA"}) {
    for (const char* attn : {"dense", "nsa"}) {
      if (std::string(attn) == "nsa" && std::string(pattern).find('A') == std::string::npos) continue;
      TrainConfig cfg;
      cfg.model_size = "tiny";
      cfg.block_pattern = pattern;
      cfg.attn_type = attn;
      const ModelDims m = resolve_model(cfg, 257);
      auto build = [&](int nthreads) {
        at::set_num_threads(nthreads);
        torch::manual_seed(3);
        return Transformer(m, 500000.0);
      };
      auto a = build(1), b = build(std::max(2, threads));
      const auto pa = a->named_parameters(), pb = b->named_parameters();
      ASSERT_EQ(pa.size(), pb.size());
      for (size_t i = 0; i < pa.size(); ++i) {
        const auto& name = pa[i].key();
        const auto& t = pa[i].value();
        EXPECT_TRUE(torch::isfinite(t).all().item<bool>()) << pattern << "/" << attn << " " << name;
        EXPECT_TRUE(torch::equal(t, pb[i].value())) << pattern << "/" << attn << " " << name << " depends on threads";
        // Linear weights and the embedding: N(0, 0.02) or the scaled 0.02 / sqrt(2n) of the output projections.
        if (t.dim() == 2 && t.numel() >= 4096) {
          const double sd = t.std().item<double>();
          EXPECT_GT(sd, 0.002) << name;
          EXPECT_LT(sd, 0.03) << name;
        }
      }
      // Another seed gives other weights.
      torch::manual_seed(4);
      Transformer c(m, 500000.0);
      EXPECT_FALSE(torch::equal(a->named_parameters()["embed.weight"], c->named_parameters()["embed.weight"]));
    }
  }
  at::set_num_threads(threads);
}
