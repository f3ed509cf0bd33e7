#include "scheduler/sweep/grid.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace ablate::scheduler::sweep {
namespace {

using ::testing::HasSubstr;

// Expects ParseAndExpand to fail with kInvalidArgument and a message containing every fragment.
void ExpectRejected(const std::string& yaml, std::initializer_list<std::string> fragments) {
  auto r = ParseAndExpand(yaml);
  ASSERT_FALSE(r.ok()) << "accepted:\n" << yaml;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  for (const auto& f : fragments) EXPECT_THAT(std::string(r.status().message()), HasSubstr(f)) << yaml;
}

constexpr const char* kDemo = R"(
name: demo
grid:
  model_size: [tiny, mini]
  block_pattern: [A]
  attention: [dense]
  optimizer: [adamw]
  context_length: [128, 256]
exclude:
  - {model_size: mini, context_length: 256}
train:
  num_train_steps: 200
  batch_size: 8
  learning_rate: 3.0e-3
  dataset: fortunes
)";

TEST(GridTest, GoldenExpansionWithExclude) {
  auto r = ParseAndExpand(kDemo);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->cells.size(), 3u);
  // Grid order, last axis fastest; (mini, 256) excluded.
  std::vector<std::pair<std::string, std::string>> expected = {{"tiny", "128"}, {"tiny", "256"}, {"mini", "128"}};
  for (size_t i = 0; i < 3; ++i) {
    const Cell& c = r->cells[i];
    EXPECT_EQ(c.cell_index, static_cast<int>(i));
    ASSERT_EQ(c.factors.size(), 5u);
    EXPECT_EQ(c.factors[0], (std::pair<std::string, std::string>{"model_size", expected[i].first}));
    EXPECT_EQ(c.factors[4], (std::pair<std::string, std::string>{"context_length", expected[i].second}));
    std::map<std::string, std::string> params = {
        {"model_size", expected[i].first}, {"block_pattern", "A"}, {"attn_type", "dense"},
        {"optimizer_type", "adamw"},       {"context_length", expected[i].second},
        {"num_train_steps", "200"},        {"batch_size", "8"},    {"learning_rate", "3.0e-3"},
        {"dataset", "fortunes"}};
    EXPECT_EQ(c.params, params);
    EXPECT_EQ(c.config_hash, ConfigHash(params));
    EXPECT_EQ(c.total_steps, 200);
  }
  EXPECT_EQ(r->factor_names, (std::vector<std::string>{"model_size", "context_length"}));
}

TEST(GridTest, ConfigHashIsSha256OfSortedKeyValueLines) {
  // sha256("a=1\nb=2\n"), computed independently (printf 'a=1\nb=2\n' | sha256sum).
  EXPECT_EQ(ConfigHash({{"b", "2"}, {"a", "1"}}), "4a73850fde34aad40ff8649b93a66523a5fe744357a3931caea0f10609d0d930");
}

TEST(GridTest, ConfigHashIsStableAcrossFormattingAndOrder) {
  auto a = ParseAndExpand(kDemo);
  auto b = ParseAndExpand(R"(
# same sweep, other layout and train key order
name: demo
train: {dataset: fortunes, learning_rate: 3.0e-3, batch_size: 8, num_train_steps: 200}
grid:
  model_size:
    - tiny
    - mini
  block_pattern: [A]
  attention: [dense]
  optimizer: [adamw]
  context_length: [128, 256]
exclude: [{context_length: 256, model_size: mini}]
)");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->cells.size(), b->cells.size());
  for (size_t i = 0; i < a->cells.size(); ++i) EXPECT_EQ(a->cells[i].config_hash, b->cells[i].config_hash);
  EXPECT_NE(a->cells[0].config_hash, a->cells[1].config_hash);
  EXPECT_EQ(a->spec_hash, b->spec_hash);
}

TEST(GridTest, NoVaryingAxisListsAllFactors) {
  auto r = ParseAndExpand("name: one\ngrid: {model_size: [tiny], attention: [nsa]}\n");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cells.size(), 1u);
  EXPECT_EQ(r->factor_names, (std::vector<std::string>{"model_size", "attention"}));
  EXPECT_EQ(r->cells[0].params.at("attn_type"), "nsa");
  EXPECT_EQ(r->cells[0].total_steps, 0);
}

TEST(GridTest, AcceptsSizeStringsAndAliases) {
  auto r = ParseAndExpand(
      "name: sizes\ngrid:\n  model_size: [100M, 0.6B, 1b, 4B, 8B, 125k, 42]\n"
      "  attention: [dense, nsa, native_sparse_attention, fsa, flash_sparse_attention]\n"
      "  optimizer: [adamw, adamw8bit, adamw4bit, soap, soap8bit, soap4bit, shampoo]\n"
      "  block_pattern: [MDA, AAAA, M]\n");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cells.size(), 7u * 5 * 7 * 3);
}

TEST(GridTest, RejectsUnknownModelSize) {
  ExpectRejected("name: x\ngrid: {model_size: [tiny, huge]}\n",
                 {"grid.model_size[1]: unknown model size 'huge'", "tiny|mini|small", "100M, 0.6B"});
  ExpectRejected("name: x\ngrid: {model_size: [0B]}\n", {"grid.model_size[0]"});
  ExpectRejected("name: x\ngrid: {model_size: [1.5T]}\n", {"grid.model_size[0]"});
  ExpectRejected("name: x\ngrid: {model_size: [-1M]}\n", {"grid.model_size[0]"});
}

TEST(GridTest, RejectsUnknownAttentionListingValidValues) {
  ExpectRejected("name: x\ngrid: {attention: [flash]}\n",
                 {"grid.attention[0]: unknown attention 'flash'", "dense", "nsa", "flash_sparse_attention"});
}

TEST(GridTest, RejectsUnknownOptimizerListingValidValues) {
  ExpectRejected("name: x\ngrid: {optimizer: [adamw, sgd]}\n",
                 {"grid.optimizer[1]: unknown optimizer 'sgd'", "adamw8bit", "shampoo"});
}

TEST(GridTest, RejectsBadContextLength) {
  ExpectRejected("name: x\ngrid: {context_length: [-5]}\n", {"grid.context_length[0]: must be a positive integer, got -5"});
  ExpectRejected("name: x\ngrid: {context_length: [0]}\n", {"grid.context_length[0]"});
  ExpectRejected("name: x\ngrid: {context_length: [12.5]}\n", {"grid.context_length[0]"});
  ExpectRejected("name: x\ngrid: {context_length: [abc]}\n", {"grid.context_length[0]"});
}

TEST(GridTest, RejectsBlockPatternLetters) {
  ExpectRejected("name: x\ngrid: {block_pattern: [MDA, MXA]}\n", {"grid.block_pattern[1]", "'X'", "M", "D", "A"});
  ExpectRejected("name: x\ngrid: {block_pattern: [mda]}\n", {"grid.block_pattern[0]"});
}

TEST(GridTest, RejectsEmptyGridAndEmptyAxis) {
  ExpectRejected("name: x\ngrid: {}\n", {"grid: empty"});
  ExpectRejected("name: x\n", {"grid: required"});
  ExpectRejected("name: x\ngrid: {model_size: []}\n", {"grid.model_size: empty list"});
  ExpectRejected("name: x\ngrid: {model_size: tiny}\n", {"grid.model_size: must be a list"});
}

TEST(GridTest, RejectsUnknownAxis) {
  ExpectRejected("name: x\ngrid: {model_size: [tiny], dropout: [0.1]}\n",
                 {"grid.dropout: unknown grid axis", "context_length"});
}

TEST(GridTest, RejectsDuplicateAxisValues) {
  ExpectRejected("name: x\ngrid: {model_size: [tiny, tiny]}\n", {"grid.model_size[1]: duplicate value 'tiny'"});
}

TEST(GridTest, MalformedYamlReportsLineAndColumn) {
  ExpectRejected("name: x\ngrid:\n  model_size: [tiny\n", {"malformed YAML at line", "column"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\n  bad: indent\n", {"malformed YAML at line 3"});
}

TEST(GridTest, RejectsUnknownTopLevelKey) {
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrian: {seed: 1}\n",
                 {"trian: unknown top-level key", "name, grid, exclude, train"});
}

TEST(GridTest, RejectsNameProblems) {
  ExpectRejected("grid: {model_size: [tiny]}\n", {"name: required"});
  ExpectRejected("name: 'bad name!'\ngrid: {model_size: [tiny]}\n", {"name: 'bad name!' must match"});
  ExpectRejected("", {"empty"});
  ExpectRejected("- a\n- b\n", {"top level must be a map"});
}

TEST(GridTest, RejectsUnknownTrainKeys) {
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {lr: 0.1}\n",
                 {"train.lr: unknown ablate-train setting", "learning_rate"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {model_size: mini}\n",
                 {"train.model_size", "grid axis"});
}

TEST(GridTest, TypeChecksNumericTrainSettings) {
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {num_train_steps: ten}\n",
                 {"train.num_train_steps: must be a positive integer, got 'ten'"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {batch_size: 0}\n", {"train.batch_size"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {learning_rate: fast}\n",
                 {"train.learning_rate: must be a positive number"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {weight_decay: -0.1}\n", {"train.weight_decay"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {gradient_checkpointing: maybe}\n",
                 {"train.gradient_checkpointing: must be true or false"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\ntrain: {seed: [1, 2]}\n", {"train.seed: must be a single value"});
  auto ok = ParseAndExpand(
      "name: x\ngrid: {model_size: [tiny]}\ntrain: {warmup_steps: 0, seed: 7, min_lr_ratio: 0.1, max_grad_norm: 1.0, "
      "dtype: bf16, log_interval: 10, eval_interval: 50, eval_batches: 4, save_interval: 0, rope_theta: 10000, "
      "gradient_checkpointing: true, device: cpu, gradient_accumulation_steps: 2, weight_decay: 0.1}\n");
  EXPECT_TRUE(ok.ok()) << ok.status();
}

TEST(GridTest, RejectsExcludeProblems) {
  ExpectRejected("name: x\ngrid: {model_size: [tiny, mini]}\nexclude: [{attention: dense}]\n",
                 {"exclude[0].attention: not a grid axis"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny, mini]}\nexclude: [{model_size: small}]\n",
                 {"exclude[0].model_size: value 'small' is not in grid.model_size"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\nexclude: [{model_size: tiny}]\n",
                 {"exclude: removes every cell"});
  ExpectRejected("name: x\ngrid: {model_size: [tiny]}\nexclude: {model_size: tiny}\n", {"exclude: must be a list"});
}

TEST(GridTest, ResourcesRanksMakesGangCellsWithTheirOwnIdentity) {
  const std::string base = "name: g\ngrid:\n  model_size: [tiny]\n  context_length: [64]\n";
  auto one = ParseAndExpand(base);
  auto two = ParseAndExpand(base + "resources:\n  ranks: 2\n");
  ASSERT_TRUE(one.ok() && two.ok()) << two.status();
  EXPECT_EQ(one->cells[0].ranks, 1);
  EXPECT_EQ(two->cells[0].ranks, 2);
  EXPECT_EQ(two->cells[0].params, one->cells[0].params);            // same flags for ablate-train
  EXPECT_NE(two->cells[0].config_hash, one->cells[0].config_hash);  // another global batch: another result
  EXPECT_NE(two->spec_hash, one->spec_hash);
  auto explicit_one = ParseAndExpand(base + "resources:\n  ranks: 1\n");
  ASSERT_TRUE(explicit_one.ok());
  EXPECT_EQ(explicit_one->cells[0].config_hash, one->cells[0].config_hash);
  ExpectRejected(base + "resources:\n  ranks: 0\n", {"resources.ranks", "1..64"});
  ExpectRejected(base + "resources:\n  ranks: two\n", {"resources.ranks"});
}

TEST(GridTest, ResourcesGpusRunOneRankPerGpuWithTheirOwnIdentity) {
  const std::string base = "name: g\ngrid:\n  model_size: [tiny]\n  context_length: [64]\n";
  auto one = ParseAndExpand(base);
  auto two = ParseAndExpand(base + "train:\n  parallel: zero\nresources:\n  gpus: 2\n");
  ASSERT_TRUE(one.ok() && two.ok()) << two.status();
  EXPECT_EQ(two->cells[0].gpus, 2);
  EXPECT_EQ(two->cells[0].params.at("nproc"), "2");  // the worker passes it on: ablate-train --nproc 2
  EXPECT_EQ(two->cells[0].params.at("parallel"), "zero");
  EXPECT_EQ(one->cells[0].params.count("nproc"), 0u);
  EXPECT_NE(two->cells[0].config_hash, one->cells[0].config_hash);  // gpus x batch_size: another result
  // Per-GPU memory: ddp replicates the optimizer state, zero splits it; checkpointing divides activations.
  const std::map<std::string, std::string> m = {{"model_size", "1B"}, {"optimizer_type", "adamw"},
                                                {"context_length", "4096"}, {"batch_size", "1"}};
  auto with = [&](std::map<std::string, std::string> extra) {
    auto p = m;
    for (auto& [k, v] : extra) p[k] = v;
    return p;
  };
  const int64_t n = ModelParams("1B");
  EXPECT_EQ(EstimateMemoryBytes(with({}), 2), EstimateMemoryBytes(with({}), 1));
  EXPECT_EQ(EstimateMemoryBytes(with({}), 1) - EstimateMemoryBytes(with({{"parallel", "zero"}}), 2), 4 * n);
  EXPECT_LT(EstimateMemoryBytes(with({{"gradient_checkpointing", "true"}}), 1), EstimateMemoryBytes(with({}), 1));
  ExpectRejected(base + "train:\n  parallel: fsdp\n", {"train.parallel", "ddp", "zero", "'fsdp'"});
  auto both = ParseAndExpand(base + "resources:\n  gpus: 2\n  ranks: 2\n");  // 2 workers x 2 GPUs: 4 ranks
  ASSERT_TRUE(both.ok()) << both.status();
  EXPECT_EQ(both->cells[0].params.at("nproc"), "2");
  EXPECT_EQ(both->cells[0].ranks, 2);
  EXPECT_NE(both->cells[0].config_hash, two->cells[0].config_hash);
  ExpectRejected(base + "train:\n  nproc: 2\n", {"train.nproc: unknown ablate-train setting"});
}

TEST(GridTest, EnforcesCellLimit) {
  std::string yaml = "name: big\ngrid:\n  context_length: [";
  for (int i = 1; i <= 200; ++i) yaml += (i > 1 ? "," : "") + std::to_string(i);
  yaml += "]\n  model_size: [";
  for (int i = 1; i <= 60; ++i) yaml += (i > 1 ? "," : "") + std::to_string(i) + "M";
  yaml += "]\n";
  ExpectRejected(yaml, {"grid: the cross product has more than 10000 cells"});
  auto small_limit = ParseAndExpand("name: x\ngrid: {context_length: [1, 2, 3]}\n", 2);
  EXPECT_FALSE(small_limit.ok());
  EXPECT_TRUE(ParseAndExpand("name: x\ngrid: {context_length: [1, 2]}\n", 2).ok());
}

}  // namespace
}  // namespace ablate::scheduler::sweep
