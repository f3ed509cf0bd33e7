// NSA: the chunked fast path against the dense reference (outputs and every gradient), the reference against
// hand-written formulas, fp64 finite differences, causality, real sparsity, GQA-shared selection, and a
// bounded-memory run at T = 8192. Small block sizes (l=8, d=4, l'=16, n=4, w=16) so that sparsity matters.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <tuple>

#include "core/mixers/nsa.h"
#include "kernels/nsa_select.h"

namespace ablate::core {
namespace {

using torch::Tensor;

double rel_err(const Tensor& a, const Tensor& b) {
  const double nb = b.norm().item<double>();
  const double nd = (a - b).norm().item<double>();
  return nb > 0 ? nd / nb : nd;
}

NsaAttentionOptions small_options(int64_t H, int64_t KV, int64_t query_chunk = 32) {
  return NsaAttentionOptions(/*d_model=*/16, H, KV, /*head_dim=*/8)
      .cmp_block(8)
      .cmp_stride(4)
      .slc_block(16)
      .num_selected(4)
      .num_init_blocks(1)
      .num_local_blocks(2)
      .window(16)
      .query_chunk(query_chunk);
}

struct Inputs {
  Tensor q, k, v, x;
  std::vector<Tensor> all() const { return {q, k, v, x}; }
};

Inputs make_inputs(const NsaAttentionOptions& o, int64_t B, int64_t T, torch::Dtype dt = torch::kFloat,
                   double qk_scale = 1.0) {
  auto opt = torch::TensorOptions().dtype(dt);
  Inputs in;
  in.q = (torch::randn({B, T, o.num_heads(), o.head_dim()}, opt) * qk_scale).requires_grad_();
  in.k = (torch::randn({B, T, o.num_kv_heads(), o.head_dim()}, opt) * qk_scale).requires_grad_();
  in.v = torch::randn({B, T, o.num_kv_heads(), o.head_dim()}, opt).requires_grad_();
  in.x = torch::randn({B, T, o.d_model()}, opt).requires_grad_();
  return in;
}

// Gradients of sum(out * w) w.r.t. q, k, v, x and every parameter, keyed by name.
std::map<std::string, Tensor> grads_of(const Tensor& out, const Tensor& w, const Inputs& in, NsaAttentionImpl& m) {
  for (auto& t : in.all()) t.mutable_grad() = Tensor();
  m.zero_grad();
  (out * w).sum().backward();
  std::map<std::string, Tensor> g{{"q", in.q.grad().clone()}, {"k", in.k.grad().clone()},
                                  {"v", in.v.grad().clone()}, {"x", in.x.grad().clone()}};
  for (auto& p : m.named_parameters()) {
    g[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::zeros_like(p.value());
  }
  return g;
}

// Plain causal attention (B, T, H, hd) with K/V expanded to the H heads, optionally windowed.
Tensor causal_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t window = 0) {
  const int64_t T = q.size(1), G = q.size(2) / k.size(2);
  auto qh = q.permute({0, 2, 1, 3});
  auto kh = k.repeat_interleave(G, 2).permute({0, 2, 1, 3});
  auto vh = v.repeat_interleave(G, 2).permute({0, 2, 1, 3});
  auto s = torch::matmul(qh, kh.transpose(-1, -2)) * scale;
  auto t = torch::arange(T).view({T, 1}), j = torch::arange(T).view({1, T});
  auto mask = j <= t;
  if (window > 0) mask = mask & (j > t - window);
  s = s.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  return torch::matmul(torch::softmax(s, -1), vh).permute({0, 2, 1, 3});
}

// ---------------------------------------------------------------------------------------------------------------
// Fast vs reference: outputs, selected indices and all gradients, fp32, ||a-b||/||b|| <= 1e-4.

class NsaFastVsReference : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t>> {};

TEST_P(NsaFastVsReference, OutputsIndicesAndGradientsMatch) {
  const auto [T, G, qchunk] = GetParam();
  const int64_t KV = 2, B = 2;
  torch::manual_seed(1000 + T * 10 + G + qchunk);
  auto o = small_options(G * KV, KV, qchunk);
  NsaAttention m(o);
  auto in = make_inputs(o, B, T);
  auto w = torch::randn({B, T, G * KV, o.head_dim()});

  auto fast = m->forward_branches(in.q, in.k, in.v, in.x);
  auto gf = grads_of(fast.out, w, in, *m);
  auto ref = nsa_reference(*m, in.q, in.k, in.v, in.x);
  auto gr = grads_of(ref.branches.out, w, in, *m);

  ASSERT_TRUE(torch::equal(fast.block_idx, ref.branches.block_idx)) << "selected blocks differ";
  // The selection must really choose: some query has more eligible blocks than it may keep.
  const int64_t max_eligible = (T - 1) / o.slc_block() + 1;
  ASSERT_GT(max_eligible, o.num_selected()) << "test shape too small for top-k to matter";

  const double e_out = rel_err(fast.out, ref.branches.out);
  EXPECT_LT(e_out, 1e-4);
  EXPECT_LT(rel_err(fast.o_cmp, ref.branches.o_cmp), 1e-4);
  EXPECT_LT(rel_err(fast.o_slc, ref.branches.o_slc), 1e-4);
  EXPECT_LT(rel_err(fast.o_swa, ref.branches.o_swa), 1e-4);
  double worst = 0;
  std::string worst_name;
  ASSERT_EQ(gf.size(), gr.size());
  for (auto& [name, g] : gr) {
    ASSERT_TRUE(gf.count(name)) << name;
    if (name == "cmp_k_fc2.bias") {
      // A bias on every compressed key shifts all of a query's cmp scores by q.b: softmax-invariant, so the
      // true gradient is exactly zero and both sides hold only rounding noise.
      const double ref_scale = gr["cmp_k_fc2.weight"].norm().item<double>();
      EXPECT_LT(g.norm().item<double>(), 1e-5 * ref_scale);
      EXPECT_LT(gf[name].norm().item<double>(), 1e-5 * ref_scale);
      continue;
    }
    ASSERT_GT(g.norm().item<double>(), 0) << "reference gradient of " << name << " is zero";
    const double e = rel_err(gf[name], g);
    EXPECT_LT(e, 1e-4) << "gradient of " << name;
    if (e > worst) worst = e, worst_name = name;
  }
  std::printf("[nsa] T=%ld G=%ld chunk=%ld: out rel err %.2e, worst grad rel err %.2e (%s)\n", (long)T, (long)G,
              (long)qchunk, e_out, worst, worst_name.c_str());
}

INSTANTIATE_TEST_SUITE_P(Shapes, NsaFastVsReference,
                         ::testing::Combine(::testing::Values<int64_t>(96, 77), ::testing::Values<int64_t>(1, 2, 4),
                                            ::testing::Values<int64_t>(7, 32)));

TEST(NsaAttention, SequenceShorterThanOneCompressedBlockGivesZeroCmpAndNoNaN) {
  torch::manual_seed(3);
  auto o = small_options(4, 2, 3);
  NsaAttention m(o);
  auto in = make_inputs(o, 2, 5);  // T = 5 < l = 8: no compressed block at all
  auto w = torch::randn({2, 5, 4, 8});
  auto fast = m->forward_branches(in.q, in.k, in.v, in.x);
  EXPECT_EQ(fast.o_cmp.abs().max().item<double>(), 0.0);
  auto gf = grads_of(fast.out, w, in, *m);
  auto ref = nsa_reference(*m, in.q, in.k, in.v, in.x);
  auto gr = grads_of(ref.branches.out, w, in, *m);
  EXPECT_LT(rel_err(fast.out, ref.branches.out), 1e-5);
  for (auto& [name, g] : gf) {
    EXPECT_TRUE(torch::isfinite(g).all().item<bool>()) << name;
    EXPECT_LT((g - gr[name]).abs().max().item<double>(), 1e-5) << name;
  }
}

TEST(NsaAttention, EarlyQueriesWithoutCompressedBlockGetZeroAndFiniteGradients) {
  torch::manual_seed(4);
  auto o = small_options(2, 1, 5);
  NsaAttention m(o);
  auto in = make_inputs(o, 1, 40);
  auto fast = m->forward_branches(in.q, in.k, in.v, in.x);
  // t < l - 1 = 7 has no complete compressed block; t = 7 has one.
  EXPECT_EQ(fast.o_cmp.slice(1, 0, 7).abs().max().item<double>(), 0.0);
  EXPECT_GT(fast.o_cmp.select(1, 7).abs().max().item<double>(), 0.0);
  fast.out.sum().backward();
  for (auto& t : in.all()) EXPECT_TRUE(torch::isfinite(t.grad()).all().item<bool>());
}

// ---------------------------------------------------------------------------------------------------------------
// The oracle itself, against formulas written out by hand.

TEST(NsaReference, FullSelectionAndWideWindowEqualCausalAttention) {
  torch::manual_seed(5);
  const int64_t T = 50;
  auto o = small_options(4, 2).num_selected(4).window(T);  // Ns = ceil(50/16) = 4: every block selected
  NsaAttention m(o);
  auto in = make_inputs(o, 2, T);
  torch::NoGradGuard ng;
  auto want = causal_attention(in.q, in.k, in.v, o.scale());
  auto ref = nsa_reference(*m, in.q, in.k, in.v, in.x);
  EXPECT_LT(rel_err(ref.branches.o_slc, want), 1e-6);
  EXPECT_LT(rel_err(ref.branches.o_swa, want), 1e-6);
  auto fast = m->forward_branches(in.q, in.k, in.v, in.x);
  EXPECT_LT(rel_err(fast.o_slc, want), 1e-6);
  EXPECT_LT(rel_err(fast.o_swa, want), 1e-6);
  // And a real window differs from full attention, and matches the windowed formula.
  auto o2 = small_options(4, 2).window(16);
  auto swa = nsa_window_attention(in.q, in.k, in.v, o2);
  EXPECT_LT(rel_err(swa, causal_attention(in.q, in.k, in.v, o2.scale(), 16)), 1e-6);
  EXPECT_GT(rel_err(swa, want), 1e-2);
}

TEST(NsaReference, CompressionAndCompressedAttentionMatchHandFormula) {
  torch::manual_seed(6);
  const int64_t T = 37, B = 1;
  auto o = small_options(4, 2);
  NsaAttention m(o);
  auto in = make_inputs(o, B, T);
  torch::NoGradGuard ng;
  auto kc = m->compress_keys(in.k), vc = m->compress_values(in.v);
  ASSERT_EQ(kc.size(1), (T - 8) / 4 + 1);
  // phi(block j) = fc2(gelu(fc1(flatten(k[j*d : j*d+l] + pe)))) for KV head 1, block 3.
  auto blk = in.k.index({0, torch::indexing::Slice(12, 20), 1}) + m->cmp_k_pe;  // (l, hd)
  auto want_kc = m->cmp_k_fc2(torch::gelu(m->cmp_k_fc1(blk.reshape({1, -1})))).view({-1});
  EXPECT_LT(rel_err(kc.index({0, 3, 1}), want_kc), 1e-6);

  auto ref = nsa_reference(*m, in.q, in.k, in.v, in.x);
  // Query t = 21, head 3 (kv head 1): blocks j with 4j + 7 <= 21 -> j = 0..3.
  const int64_t t = 21, h = 3, kvh = 1;
  auto qv = in.q.index({0, t, h});
  std::vector<double> s;
  for (int64_t j = 0; j <= 3; ++j) s.push_back((qv * kc.index({0, j, kvh})).sum().item<double>() * o.scale());
  double mx = *std::max_element(s.begin(), s.end()), z = 0;
  for (double e : s) z += std::exp(e - mx);
  auto want = torch::zeros({8});
  for (int64_t j = 0; j <= 3; ++j) want += std::exp(s[j] - mx) / z * vc.index({0, j, kvh});
  EXPECT_LT(rel_err(ref.branches.o_cmp.index({0, t, h}), want), 1e-6);
  EXPECT_LT(rel_err(m->forward_branches(in.q, in.k, in.v, in.x).o_cmp.index({0, t, h}), want), 1e-6);
  for (int64_t j = 4; j < kc.size(1); ++j) EXPECT_EQ(ref.p_cmp.index({0, t, h, j}).item<double>(), 0.0);
}

TEST(NsaSelection, ImportanceFollowsEquationNine) {
  // l = 8, d = 4, l' = 16: r = l/d = 2 sub-blocks per compressed block, m = l'/d = 4 per selection block.
  auto o = small_options(2, 1);
  torch::manual_seed(7);
  const int64_t ncb = 9, ns = 3;  // 9 compressed blocks reach sub-block 9 < 3*4
  auto p = torch::rand({2, ncb}, torch::kDouble);
  auto got = nsa_cmp_to_slc_importance(p, ns, o);
  ASSERT_EQ(got.sizes(), (std::vector<int64_t>{2, ns}));
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t j = 0; j < ns; ++j) {
      double want = 0;
      for (int64_t mm = 0; mm < 4; ++mm) {
        for (int64_t nn = 0; nn < 2; ++nn) {
          const int64_t i = 4 * j + mm - nn;
          if (i >= 0 && i < ncb) want += p[b][i].item<double>();
        }
      }
      EXPECT_NEAR(got[b][j].item<double>(), want, 1e-12) << "b=" << b << " j=" << j;
    }
  }
}

TEST(NsaSelection, EligibleForcedAndTopImportance) {
  torch::manual_seed(8);
  const int64_t T = 120;
  auto o = small_options(4, 2);
  NsaAttention m(o);
  auto in = make_inputs(o, 2, T);
  torch::NoGradGuard ng;
  auto ref = nsa_reference(*m, in.q, in.k, in.v, in.x);
  auto idx = m->forward_branches(in.q, in.k, in.v, in.x).block_idx;
  ASSERT_TRUE(torch::equal(idx, ref.branches.block_idx));
  int64_t chose_by_score = 0;
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t kv = 0; kv < 2; ++kv) {
        const int64_t jcur = t / 16;
        std::set<int64_t> sel;
        for (int64_t s = 0; s < 4; ++s) {
          const int64_t j = idx[b][t][kv][s].item<int64_t>();
          if (j < 0) continue;
          EXPECT_LE(j, jcur) << "ineligible block";
          EXPECT_TRUE(sel.insert(j).second) << "duplicate block";
        }
        EXPECT_EQ(static_cast<int64_t>(sel.size()), std::min<int64_t>(4, jcur + 1));
        EXPECT_TRUE(sel.count(0)) << "initial block missing at t=" << t;
        EXPECT_TRUE(sel.count(jcur)) << "own block missing at t=" << t;
        if (jcur >= 1) {
          EXPECT_TRUE(sel.count(jcur - 1)) << "previous block missing at t=" << t;
        }
        // The free slot holds the most important non-forced eligible block.
        if (jcur + 1 > 4) {
          int64_t best = -1;
          double best_v = -1;
          for (int64_t j = 1; j < jcur - 1; ++j) {
            const double vj = ref.importance[b][t][kv][j].item<double>();
            if (vj > best_v) best_v = vj, best = j;
          }
          EXPECT_TRUE(sel.count(best)) << "b=" << b << " t=" << t << " kv=" << kv;
          ++chose_by_score;
        }
      }
    }
  }
  EXPECT_GT(chose_by_score, 100);
}

// Heads of a GQA group share blocks: the selected branch of every head reads the group's blocks, even where
// that head's own importance would pick a different block.
TEST(NsaSelection, SharedWithinGqaGroup) {
  torch::manual_seed(9);
  const int64_t T = 128, G = 4, KV = 2, H = G * KV;
  auto o = small_options(H, KV);
  NsaAttention m(o);
  auto in = make_inputs(o, 1, T, torch::kFloat, 2.0);
  torch::NoGradGuard ng;
  auto fast = m->forward_branches(in.q, in.k, in.v, in.x);
  auto ref = nsa_reference(*m, in.q, in.k, in.v, in.x);
  ASSERT_EQ(fast.block_idx.size(2), KV);
  // Per-head selection, as if each head were its own group.
  auto o_per_head = small_options(H, H);
  auto imp_h = nsa_cmp_to_slc_importance(ref.p_cmp.permute({0, 2, 1, 3}), o.num_slc_blocks(T), o);  // (1,H,T,Ns)
  auto own = nsa_select_blocks(imp_h, torch::arange(T), o_per_head).permute({0, 2, 1, 3});     // (1,T,H,n)
  int64_t differing = 0, clearly_different = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      auto group_idx = fast.block_idx[0][t][h / G];
      auto own_idx = own[0][t][h];
      if (torch::equal(group_idx, own_idx)) continue;
      ++differing;
      // Attention of this one query over the tokens of a given block set.
      auto attend = [&](const Tensor& blocks) {
        std::vector<int64_t> toks;
        for (int64_t s = 0; s < o.num_selected(); ++s) {
          const int64_t j = blocks[s].item<int64_t>();
          for (int64_t p = j * 16; j >= 0 && p < (j + 1) * 16 && p <= t; ++p) toks.push_back(p);
        }
        auto ti = torch::tensor(toks, torch::kLong);
        auto K = in.k.index({0, ti, h / G}), V = in.v.index({0, ti, h / G});
        auto p = torch::softmax(torch::matmul(K, in.q.index({0, t, h})) * o.scale(), 0);
        return torch::matmul(p, V);
      };
      auto got = fast.o_slc.index({0, t, h});
      const double e_group = rel_err(got, attend(group_idx)), e_own = rel_err(got, attend(own_idx));
      EXPECT_LT(e_group, 1e-5) << "t=" << t << " h=" << h;
      EXPECT_GT(e_own, 10 * e_group + 1e-6) << "t=" << t << " h=" << h;
      clearly_different += e_own > 1e-2;
    }
  }
  EXPECT_GT(differing, 10) << "too few heads disagree with their group: the test would not show sharing";
  EXPECT_GT(clearly_different, 5);
}

// ---------------------------------------------------------------------------------------------------------------

TEST(NsaAttention, Causality) {
  torch::manual_seed(10);
  const int64_t T = 90, t0 = 53;
  auto o = small_options(4, 2, 16);
  NsaAttention m(o);
  auto in = make_inputs(o, 2, T);
  torch::NoGradGuard ng;
  auto base = m->forward_branches(in.q, in.k, in.v, in.x);
  Inputs p;
  auto perturb = [&](const Tensor& t) {
    auto c = t.clone();
    c.slice(1, t0 + 1).add_(torch::randn_like(c.slice(1, t0 + 1)) * 3.0);
    return c;
  };
  p.q = perturb(in.q), p.k = perturb(in.k), p.v = perturb(in.v), p.x = perturb(in.x);
  auto after = m->forward_branches(p.q, p.k, p.v, p.x);
  EXPECT_TRUE(torch::equal(base.block_idx.slice(1, 0, t0 + 1), after.block_idx.slice(1, 0, t0 + 1)));
  EXPECT_LT((base.out.slice(1, 0, t0 + 1) - after.out.slice(1, 0, t0 + 1)).abs().max().item<double>(), 1e-6);
  EXPECT_GT((base.out.slice(1, t0 + 1) - after.out.slice(1, t0 + 1)).abs().max().item<double>(), 1e-2);
}

// The selected branch reads only its blocks, the window only [t - w + 1, t].
TEST(NsaAttention, SelectedAndWindowBranchesAreReallySparse) {
  torch::manual_seed(11);
  const int64_t T = 160, B = 2;
  auto o = small_options(4, 2, 16);
  NsaAttention m(o);
  auto in = make_inputs(o, B, T);
  torch::NoGradGuard ng;
  auto base = m->forward_branches(in.q, in.k, in.v, in.x);
  const int64_t jb = 3;  // tokens [48, 64)
  auto k2 = in.k.clone(), v2 = in.v.clone();
  k2.slice(1, 48, 64).add_(torch::randn_like(k2.slice(1, 48, 64)) * 5.0);
  v2.slice(1, 48, 64).add_(torch::randn_like(v2.slice(1, 48, 64)) * 5.0);
  auto slc2 = nsa_selected_attention(in.q, k2, v2, base.block_idx, o);  // same (fixed) selection
  auto swa2 = nsa_window_attention(in.q, k2, v2, o);
  int64_t unselected = 0, selected = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 64 + 16; t < T; ++t) {  // block 3 is eligible, not local, outside the window
      for (int64_t kv = 0; kv < 2; ++kv) {
        const bool chosen = (base.block_idx[b][t][kv] == jb).any().item<bool>();
        auto heads = torch::indexing::Slice(kv * 2, kv * 2 + 2);
        const double diff = (slc2.index({b, t, heads}) - base.o_slc.index({b, t, heads})).abs().max().item<double>();
        if (chosen) {
          ++selected;
          EXPECT_GT(diff, 1e-3) << "b=" << b << " t=" << t;
        } else {
          ++unselected;
          EXPECT_EQ(diff, 0.0) << "b=" << b << " t=" << t << ": unselected block changed the output";
        }
        EXPECT_EQ((swa2.index({b, t, heads}) - base.o_swa.index({b, t, heads})).abs().max().item<double>(), 0.0);
      }
    }
  }
  EXPECT_GT(unselected, 20);
  EXPECT_GT(selected, 5);
}

// ---------------------------------------------------------------------------------------------------------------
// fp64 central differences (LibTorch C++ has no gradcheck). Selection is held fixed by checking that the chosen
// blocks do not change under any perturbation.

TEST(NsaAttention, FiniteDifferenceGradientsFp64) {
  torch::manual_seed(12);
  const int64_t T = 22;
  auto o = NsaAttentionOptions(/*d_model=*/6, /*H=*/2, /*KV=*/1, /*hd=*/4)
               .cmp_block(4)
               .cmp_stride(2)
               .slc_block(4)
               .num_selected(3)
               .num_init_blocks(1)
               .num_local_blocks(1)
               .window(6)
               .query_chunk(3);
  NsaAttention m(o);
  m->to(torch::kDouble);
  auto in = make_inputs(o, 1, T, torch::kDouble);
  auto w = torch::randn({1, T, 2, 4}, torch::kDouble);
  auto base = m->forward_branches(in.q, in.k, in.v, in.x);
  const auto idx0 = base.block_idx.clone();
  auto g = grads_of(base.out, w, in, *m);

  std::map<std::string, Tensor> tensors{{"q", in.q}, {"k", in.k}, {"v", in.v}, {"x", in.x}};
  for (auto& p : m->named_parameters()) tensors[p.key()] = p.value();
  const double eps = 1e-6;
  torch::NoGradGuard ng;
  auto loss = [&]() {
    auto r = m->forward_branches(in.q, in.k, in.v, in.x);
    EXPECT_TRUE(torch::equal(r.block_idx, idx0)) << "selection changed under the perturbation";
    return (r.out * w).sum().item<double>();
  };
  int64_t checked = 0;
  double worst = 0;
  for (auto& [name, t] : tensors) {
    auto flat = t.view({-1});
    const int64_t n = flat.numel(), step = std::max<int64_t>(1, n / 20);
    for (int64_t i = 0; i < n; i += step) {
      const double old = flat[i].item<double>();
      flat[i] = old + eps;
      const double lp = loss();
      flat[i] = old - eps;
      const double lm = loss();
      flat[i] = old;
      const double num = (lp - lm) / (2 * eps);
      const double ana = g[name].view({-1})[i].item<double>();
      EXPECT_NEAR(ana, num, 1e-7 + 1e-5 * std::abs(num)) << name << "[" << i << "]";
      worst = std::max(worst, std::abs(ana - num));
      ++checked;
    }
  }
  std::printf("[nsa] finite differences: %ld entries, worst |analytic - numeric| = %.2e\n", (long)checked, worst);
  EXPECT_GT(checked, 150);
}

// ---------------------------------------------------------------------------------------------------------------

int64_t peak_rss_kb() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6));
  }
  return -1;
}

bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  return static_cast<bool>(f);
}

// T = 8192 (paper l, d, l'; n and w reduced to keep the CPU time to seconds): forward + backward stay far
// below what one head's T x T fp32 scores would need, and no per-chunk intermediate exceeds the budget.
TEST(NsaAttention, LongContextMemoryIsBounded) {
  torch::manual_seed(13);
  const int64_t T = 8192, B = 1;
  auto o = NsaAttentionOptions(/*d_model=*/32, /*H=*/2, /*KV=*/1, /*hd=*/16)
               .num_selected(4)
               .window(256)
               .chunk_budget(int64_t{1} << 18);
  NsaAttention m(o);
  // Warm up on a short sequence first, so one-time runtime costs (the intra-op thread pool and its per-thread
  // malloc arenas, autograd's engine threads) are in the baseline and the growth measured below is what T costs.
  {
    auto warm = make_inputs(o, B, 512);
    m->forward(warm.q, warm.k, warm.v, warm.x).square().sum().backward();
  }
  auto in = make_inputs(o, B, T);
  const bool can_reset = reset_peak_rss();
  const int64_t before = peak_rss_kb();
  nsa_reset_chunk_stats();
  auto out = m->forward(in.q, in.k, in.v, in.x);
  out.square().sum().backward();
  const int64_t after = peak_rss_kb();
  const int64_t scores_one_head_kb = T * T * 4 / 1024;  // 256 MiB
  std::printf("[nsa] T=%ld: peak RSS growth %ld KiB (reset=%d), one head of T x T fp32 scores = %ld KiB, "
              "largest chunk intermediate %ld elements (T*T = %ld)\n",
              (long)T, (long)(after - before), can_reset ? 1 : 0, (long)scores_one_head_kb,
              (long)nsa_max_chunk_numel(), (long)(T * T));
  for (auto& t : in.all()) EXPECT_TRUE(torch::isfinite(t.grad()).all().item<bool>());
  EXPECT_GT(nsa_max_chunk_numel(), 0);
  EXPECT_LE(nsa_max_chunk_numel(), o.chunk_budget());
  EXPECT_LT(nsa_max_chunk_numel(), T * T / 64);
  if (can_reset && before > 0) {
    EXPECT_LT(after - before, scores_one_head_kb / 4);
  }
}

// Paper configuration at T = 4096 (H=4, KV=1, hd=64): agreement with the reference and a timing line.
TEST(NsaAttention, PaperConfigTimingAgainstReference) {
  torch::manual_seed(14);
  const int64_t T = 4096;
  // A 16 MiB chunk budget: on CPU, intermediates under glibc's mmap ceiling are reused instead of re-faulted.
  auto o = NsaAttentionOptions(/*d_model=*/64, /*H=*/4, /*KV=*/1, /*hd=*/64).chunk_budget(int64_t{1} << 22);
  NsaAttention m(o);
  auto in = make_inputs(o, 1, T);
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  auto out = m->forward(in.q, in.k, in.v, in.x);
  auto t1 = clock::now();
  out.square().sum().backward();
  auto t2 = clock::now();
  NsaReferenceOutput ref;
  {
    torch::NoGradGuard ng;
    auto t3 = clock::now();
    ref = nsa_reference(*m, in.q, in.k, in.v, in.x);
    auto t4 = clock::now();
    auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
    std::printf("[nsa] CPU T=%ld H=4 KV=1 hd=64 (l=32 d=16 l'=64 n=16 w=512): fast fwd %.0f ms, fast bwd %.0f ms, "
                "dense reference fwd %.0f ms\n",
                (long)T, ms(t0, t1), ms(t1, t2), ms(t3, t4));
  }
  const double e = rel_err(out.detach(), ref.branches.out);
  std::printf("[nsa] T=%ld paper config: out rel err vs reference %.2e\n", (long)T, e);
  EXPECT_LT(e, 1e-4);
}

// bf16 inputs: softmax statistics run in fp32; the result stays near the fp32 computation.
TEST(NsaAttention, Bf16RunsAndStaysCloseToFp32) {
  torch::manual_seed(15);
  auto o = small_options(4, 2, 16);
  NsaAttention m(o);
  auto in = make_inputs(o, 2, 77);
  auto want = m->forward(in.q, in.k, in.v, in.x).detach();
  m->to(torch::kBFloat16);
  Inputs lo;
  lo.q = in.q.detach().to(torch::kBFloat16).requires_grad_();
  lo.k = in.k.detach().to(torch::kBFloat16).requires_grad_();
  lo.v = in.v.detach().to(torch::kBFloat16).requires_grad_();
  lo.x = in.x.detach().to(torch::kBFloat16).requires_grad_();
  auto got = m->forward(lo.q, lo.k, lo.v, lo.x);
  EXPECT_EQ(got.scalar_type(), torch::kBFloat16);
  EXPECT_LT(rel_err(got.to(torch::kFloat), want), 3e-2);
  got.to(torch::kFloat).square().sum().backward();
  for (auto& t : lo.all()) EXPECT_TRUE(torch::isfinite(t.grad().to(torch::kFloat)).all().item<bool>());
}

TEST(NsaAttentionOptions, RejectsInconsistentSettings) {
  EXPECT_THROW(NsaAttention(NsaAttentionOptions(16, 6, 4, 8)), c10::Error);                // H % KV
  EXPECT_THROW(NsaAttention(NsaAttentionOptions(16, 4, 2, 8).cmp_block(10)), c10::Error);  // l % d
  EXPECT_THROW(NsaAttention(NsaAttentionOptions(16, 4, 2, 8).slc_block(40)), c10::Error);  // l' % d
  EXPECT_THROW(NsaAttention(NsaAttentionOptions(16, 4, 2, 8).num_selected(2)), c10::Error);  // < forced
  NsaAttention m(small_options(4, 2));
  auto in = make_inputs(small_options(4, 2), 1, 20);
  EXPECT_THROW(m->forward(in.q, in.q, in.v, in.x), c10::Error);  // k with H heads
}

// ---------------------------------------------------------------------------------------------------------------
// kernels/nsa_select_ref.cpp writes down the contract of the CUDA kernels (o, lse, and dq/dk/dv from lse and
// delta = rowsum(dO * o)); it must agree with the LibTorch selected branch, incl. -1 slots, a query in the first
// block, T not a multiple of l', and an all-empty row (o = 0, lse = -inf, zero gradients).

TEST(NsaSelectKernelRef, MatchesLibTorchSelectedBranch) {
  for (const int64_t G : {1, 3, 4}) {
    const int64_t B = 2, KV = 2, H = G * KV, T = 77, empty_t = 40;
    torch::manual_seed(77 + G);
    auto o = small_options(H, KV);
    const int64_t hd = o.head_dim(), n = o.num_selected(), ns = o.num_slc_blocks(T);
    auto q = torch::randn({B, T, H, hd}).requires_grad_();
    auto k = torch::randn({B, T, KV, hd}).requires_grad_();
    auto v = torch::randn({B, T, KV, hd}).requires_grad_();
    auto idx = nsa_select_blocks(torch::rand({B, KV, T, ns}), torch::arange(T), o).permute({0, 2, 1, 3}).contiguous();
    idx.select(1, empty_t).fill_(-1);
    ASSERT_TRUE((idx.select(1, 3) == -1).sum().item<int64_t>() == B * KV * (n - 1)) << "t=3 sees block 0 only";
    auto out = nsa_selected_attention(q, k, v, idx, o);
    auto w = torch::randn({B, T, H, hd});
    (out * w).sum().backward();

    kernels::NsaSelectShape sh;
    sh.B = B, sh.T = T, sh.H = H, sh.KV = KV, sh.head_dim = hd, sh.num_selected = n, sh.block = o.slc_block();
    sh.scale = static_cast<float>(o.scale());
    auto qd = q.detach().contiguous(), kd = k.detach().contiguous(), vd = v.detach().contiguous();
    auto o_ref = torch::empty_like(qd);
    auto lse = torch::empty({B, T, H});
    kernels::NsaSelectFwdArgs fa;
    fa.s = sh;
    fa.q = qd.data_ptr(), fa.k = kd.data_ptr(), fa.v = vd.data_ptr();
    fa.block_idx = idx.data_ptr<int64_t>();
    fa.o = o_ref.data_ptr(), fa.lse = lse.data_ptr<float>();
    ASSERT_TRUE(kernels::nsa_select_forward_ref(fa));
    const double e_o = (o_ref - out.detach()).abs().max().item<double>();
    EXPECT_LT(e_o, 2e-5) << "G=" << G;
    EXPECT_EQ(o_ref.select(1, empty_t).abs().max().item<double>(), 0.0);
    EXPECT_TRUE(torch::isneginf(lse.select(1, empty_t)).all().item<bool>());
    EXPECT_TRUE(torch::isfinite(lse.select(1, empty_t + 1)).all().item<bool>());

    auto delta = (w * o_ref).sum(-1).contiguous();
    auto dq = torch::empty_like(qd), dk = torch::zeros_like(kd), dv = torch::zeros_like(vd);
    kernels::NsaSelectBwdArgs ba;
    ba.s = sh;
    ba.q = qd.data_ptr(), ba.k = kd.data_ptr(), ba.v = vd.data_ptr();
    ba.block_idx = idx.data_ptr<int64_t>();
    ba.dout = w.data_ptr(), ba.lse = lse.data_ptr<float>(), ba.delta = delta.data_ptr<float>();
    ba.dq = dq.data_ptr(), ba.dk = dk.data_ptr<float>(), ba.dv = dv.data_ptr<float>();
    ASSERT_TRUE(kernels::nsa_select_backward_ref(ba));
    const double e_dq = rel_err(dq, q.grad()), e_dk = rel_err(dk, k.grad()), e_dv = rel_err(dv, v.grad());
    std::printf("[nsa select ref] G=%ld  max|o| err %.2e  rel dq %.2e dk %.2e dv %.2e\n", static_cast<long>(G), e_o,
                e_dq, e_dk, e_dv);
    EXPECT_LT(e_dq, 2e-5);
    EXPECT_LT(e_dk, 2e-5);
    EXPECT_LT(e_dv, 2e-5);
    EXPECT_EQ(dq.select(1, empty_t).abs().max().item<double>(), 0.0);
  }
}

}  // namespace
}  // namespace ablate::core
