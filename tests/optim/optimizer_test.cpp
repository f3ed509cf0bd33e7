// The optimizer interface: parameter groups, factory, zero_grad/skipping, bf16 parameters, and
// save -> load -> continue being bitwise identical to uninterrupted stepping for every optimizer.
#include <gtest/gtest.h>

#include <sstream>

#include "core/optim/adamw.h"
#include "core/optim/optimizer.h"

namespace ablate {
namespace {

using core::optim::make_optimizer;
using core::optim::make_param_groups;
using core::optim::NamedParams;
using core::optim::OptimConfig;
using core::optim::optimizer_names;

TEST(ParamGroupsTest, NoDecayForVectorsBiasesNormsAndEmbeddingsButTheHeadIsDecayed) {
  NamedParams np = {
      {"tok_embeddings.weight", torch::zeros({100, 8}).requires_grad_()},
      {"layers.0.attention.wq.weight", torch::zeros({8, 8}).requires_grad_()},
      {"layers.0.attention.wq.bias", torch::zeros({8}).requires_grad_()},
      {"layers.0.attention_norm.weight", torch::zeros({8}).requires_grad_()},
      {"layers.0.q_norm.scale2d", torch::zeros({8, 8}).requires_grad_()},
      {"layers.0.mixer.A_log", torch::zeros({8}).requires_grad_()},
      {"layers.0.conv.bias2d.bias", torch::zeros({2, 2}).requires_grad_()},
      {"Pos_Embed", torch::zeros({4, 8}).requires_grad_()},
      {"frozen.weight", torch::zeros({8, 8})},
      {"lm_head.weight", torch::zeros({100, 8}).requires_grad_()},
  };
  const auto groups = make_param_groups(np, 0.1);
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_DOUBLE_EQ(groups[0].weight_decay, 0.1);
  EXPECT_DOUBLE_EQ(groups[1].weight_decay, 0.0);
  EXPECT_EQ(groups[0].names, (std::vector<std::string>{"layers.0.attention.wq.weight", "lm_head.weight"}));
  EXPECT_EQ(groups[1].names,
            (std::vector<std::string>{"tok_embeddings.weight", "layers.0.attention.wq.bias",
                                      "layers.0.attention_norm.weight", "layers.0.q_norm.scale2d",
                                      "layers.0.mixer.A_log", "layers.0.conv.bias2d.bias", "Pos_Embed"}));
}

TEST(FactoryTest, EveryNameBuildsItsOptimizerAndUnknownNamesAreRejected) {
  NamedParams np = {{"w", torch::randn({8, 8}).requires_grad_()}, {"b.bias", torch::randn({8}).requires_grad_()}};
  for (const auto& n : optimizer_names()) {
    auto opt = make_optimizer(n, np, OptimConfig{});
    ASSERT_NE(opt, nullptr);
    EXPECT_EQ(opt->name(), n);
    EXPECT_EQ(opt->num_params(), 2);
    EXPECT_EQ(opt->param_groups().size(), 2u);
  }
  try {
    make_optimizer("lion", np, OptimConfig{});
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected one of: adamw"), std::string::npos) << e.what();
  }
}

TEST(OptimizerTest, ParamsWithoutGradAreSkippedAndZeroGradClears) {
  torch::Tensor a = torch::randn({4, 4}).requires_grad_(), b = torch::randn({4}).requires_grad_();
  auto opt = make_optimizer("adamw", NamedParams{{"a", a}, {"b", b}}, OptimConfig{});
  const torch::Tensor b0 = b.detach().clone(), a0 = a.detach().clone();
  a.mutable_grad() = torch::ones({4, 4});
  opt->step();
  EXPECT_FALSE(torch::equal(a.detach(), a0));
  EXPECT_TRUE(torch::equal(b.detach(), b0));
  EXPECT_EQ(opt->step_count(0), 1);
  EXPECT_EQ(opt->step_count(1), 0);
  opt->zero_grad(false);
  EXPECT_TRUE(a.grad().defined() && a.grad().eq(0).all().item<bool>());
  opt->zero_grad();
  EXPECT_FALSE(a.grad().defined());
}

TEST(OptimizerTest, Bf16ParametersGetTheFp32ResultRoundedToNearest) {
  torch::manual_seed(4);
  const torch::Tensor init = torch::randn({8, 16}).to(torch::kBFloat16);
  torch::Tensor p16 = init.clone().requires_grad_(), p32 = init.to(torch::kFloat).requires_grad_();
  OptimConfig cfg;
  cfg.lr = 1e-1;
  for (const std::string name : {"adamw", "soap", "shampoo"}) {
    auto o16 = make_optimizer(name, NamedParams{{"w", p16}}, cfg);
    auto o32 = make_optimizer(name, NamedParams{{"w", p32}}, cfg);
    for (int t = 0; t < 2; ++t) {  // SOAP's first step only initializes its eigenbases
      const torch::Tensor g = torch::randn({8, 16});
      p16.mutable_grad() = g.to(torch::kBFloat16);
      p32.mutable_grad() = g.to(torch::kBFloat16).to(torch::kFloat);
      o16->step();
      o32->step();
      p32.detach().copy_(p32.detach().to(torch::kBFloat16));  // the bf16 run re-reads its rounded weights
    }
    EXPECT_EQ(p16.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(torch::equal(p16.detach(), p32.detach().to(torch::kBFloat16))) << name;
    EXPECT_FALSE(torch::equal(p16.detach(), init)) << name << " did not move the parameter";
    p16.detach().copy_(init);
    p32.detach().copy_(init.to(torch::kFloat));
  }
}

// A small "model": embedding (no decay, 2-D), a 64x128 projection (quantized by the low-bit AdamWs),
// a norm weight, a bias and the head. SOAP/Shampoo refresh every 2 steps, so refreshes happen after resume.
NamedParams make_model(uint64_t seed) {
  torch::manual_seed(seed);
  return {{"tok_embeddings.weight", torch::randn({40, 16}).requires_grad_()},
          {"layers.0.proj.weight", torch::randn({64, 128}).requires_grad_()},
          {"layers.0.norm.weight", torch::ones({16}).requires_grad_()},
          {"layers.0.proj.bias", torch::zeros({64}).requires_grad_()},
          {"lm_head.weight", torch::randn({24, 16}).requires_grad_()}};
}

void set_grads(NamedParams& np, int t) {
  torch::manual_seed(1000 + t);
  for (auto& [n, p] : np) p.mutable_grad() = torch::randn(p.sizes()) * 0.1;
}

TEST(CheckpointTest, SaveLoadContinueIsBitwiseIdenticalForEveryOptimizer) {
  OptimConfig cfg;
  cfg.lr = 1e-2;
  cfg.precondition_frequency = 2;
  cfg.max_precond_dim = 64;  // the 128 side of the projection stays unrotated
  for (const auto& name : optimizer_names()) {
    NamedParams a = make_model(7);
    auto opt_a = make_optimizer(name, a, cfg);
    for (int t = 1; t <= 3; ++t) {
      set_grads(a, t);
      opt_a->step();
    }
    opt_a->set_lr(5e-3);
    std::stringstream buf;
    {
      torch::serialize::OutputArchive ar;
      opt_a->save(ar);
      ar.save_to(buf);
    }
    // Resume: fresh parameters holding the saved values, a fresh optimizer, the loaded state.
    NamedParams b = make_model(99);
    for (size_t k = 0; k < a.size(); ++k) b[k].second.detach().copy_(a[k].second.detach());
    auto opt_b = make_optimizer(name, b, cfg);
    {
      torch::serialize::InputArchive ar;
      ar.load_from(buf);
      opt_b->load(ar);
    }
    EXPECT_EQ(opt_b->lr(), 5e-3) << name;
    EXPECT_EQ(opt_b->state_bytes(), opt_a->state_bytes()) << name;
    for (int t = 4; t <= 7; ++t) {
      set_grads(a, t);
      set_grads(b, t);
      opt_a->step();
      opt_b->step();
    }
    for (size_t k = 0; k < a.size(); ++k)
      EXPECT_TRUE(torch::equal(a[k].second.detach(), b[k].second.detach())) << name << ": " << a[k].first << " differs";
    EXPECT_EQ(opt_b->step_count(0), 7) << name;

    // Without the load, the continuation must differ (the check above is not vacuous).
    NamedParams c = make_model(99);
    for (size_t k = 0; k < a.size(); ++k) c[k].second.detach().copy_(b[k].second.detach());
    auto opt_c = make_optimizer(name, c, cfg);
    set_grads(c, 8);
    set_grads(b, 8);
    opt_c->set_lr(5e-3);
    opt_b->step();
    opt_c->step();
    EXPECT_FALSE(torch::equal(b[1].second.detach(), c[1].second.detach())) << name;
  }
}

TEST(CheckpointTest, LoadingIntoAnotherOptimizerOrModelFailsWithAClearMessage) {
  OptimConfig cfg;
  NamedParams a = make_model(1);
  auto adamw = make_optimizer("adamw", a, cfg);
  std::stringstream buf;
  torch::serialize::OutputArchive ar;
  adamw->save(ar);
  ar.save_to(buf);
  auto soap = make_optimizer("soap", a, cfg);
  torch::serialize::InputArchive in;
  in.load_from(buf);
  try {
    soap->load(in);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("checkpoint holds optimizer 'adamw'"), std::string::npos) << e.what();
  }
  NamedParams smaller(a.begin(), a.begin() + 2);
  auto adamw2 = make_optimizer("adamw", smaller, cfg);
  buf.seekg(0);
  torch::serialize::InputArchive in2;
  in2.load_from(buf);
  EXPECT_THROW(adamw2->load(in2), c10::Error);
}

}  // namespace
}  // namespace ablate
