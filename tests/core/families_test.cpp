// Every model family of the study: sizing and exact parameter counts, causality, learning on the real corpus,
// activation checkpointing, and the CLI (seed README command lines, rejected values).
#include <gtest/gtest.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <unordered_map>
#include <sstream>

#include "core/cli.h"
#include "core/config.h"
#include "core/fsutil.h"
#include "core/prepare_data.h"
#include "core/model.h"
#include "core/train.h"
#include "tests/scratch_dir.h"

namespace fs = std::filesystem;
using namespace ablate;

namespace {

const char* kFortunes = "/usr/share/games/fortunes";

struct Family {
  const char* label;
  const char* pattern;     // --block_pattern ("" for pure models)
  const char* mamba_type;  // --mamba_type
  const char* attn;        // --attn_type
  const char* family;      // expected ModelDims::family
};
const Family kFamilies[] = {{"dense", "", "none", "dense", "transformer"},
                            {"nsa", "", "none", "nsa", "transformer"},
                            {"mamba2", "", "mamba2", "dense", "mamba2"},
                            {"deltanet", "", "deltanet", "dense", "deltanet"},
                            {"mdma_nsa", "MDMA", "none", "nsa", "hybrid"}};

TrainConfig family_config(const Family& f, const std::string& size) {
  TrainConfig c;
  c.model_size = size;
  c.block_pattern = f.pattern;
  c.mamba_type = f.mamba_type;
  c.attn_type = f.attn;
  return c;
}

// NSA settings small enough that all three branches are sparse at T = 48..64.
void small_nsa(TrainConfig& c) {
  c.nsa_cmp_block_size = 8;
  c.nsa_cmp_stride = 4;
  c.nsa_block_size = 8;
  c.nsa_num_selected_blocks = 4;
  c.nsa_window_size = 16;
}

int64_t numel(const std::vector<torch::Tensor>& ps) {
  int64_t n = 0;
  for (const auto& p : ps) n += p.numel();
  return n;
}

// Removed when this test process exits (tests/scratch_dir.h).
fs::path temp_dir(const std::string& tag) { return ablate::testing::scratch_dir("ablate-families-test", tag); }

const fs::path& fortunes_data() {
  static fs::path dir = [] {
    if (!fs::is_directory(kFortunes)) return fs::path();
    auto d = temp_dir("fortunes");
    prepare_data({kFortunes}, d.string(), 0.05);
    return d;
  }();
  return dir;
}

// Tensor bytes alive on the CPU: an allocator that records every block's size (data pointer == context, as
// LibTorch's raw_allocate requires).
class CountingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = n ? c10::alloc_cpu(n) : nullptr;
    if (p) {
      std::lock_guard<std::mutex> g(mu());
      sizes()[p] = n;
      live_ += static_cast<int64_t>(n);
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
  static int64_t live() { return live_.load(); }

 private:
  static void release(void* p) {
    if (!p) return;
    {
      std::lock_guard<std::mutex> g(mu());
      auto it = sizes().find(p);
      if (it != sizes().end()) {
        live_ -= static_cast<int64_t>(it->second);
        sizes().erase(it);
      }
    }
    c10::free_cpu(p);
  }
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static std::unordered_map<void*, size_t>& sizes() {
    static auto* m = new std::unordered_map<void*, size_t>();  // leaked: blocks may be freed at exit
    return *m;
  }
  static inline std::atomic<int64_t> live_{0};
};

}  // namespace

// ---------------------------------------------------------------- model-type resolution and sizing

TEST(Families, ModelTypeResolution) {
  TrainConfig c;
  auto m = resolve_model(c, 257);
  EXPECT_EQ(m.family, "transformer");  // default mamba_type none (the seed defaulted to mamba2, bug 14.2.1)
  EXPECT_EQ(m.pattern, "A");
  c.mamba_type = "mamba2";
  EXPECT_EQ(resolve_model(c, 257).pattern, "M");
  c.mamba_type = "deltanet";
  EXPECT_EQ(resolve_model(c, 257).pattern, "D");
  c.block_pattern = "mdma";  // a pattern wins over mamba_type; letters are upper-cased
  c.attn_type = "flash_sparse_attention";
  m = resolve_model(c, 257);
  EXPECT_EQ(m.family, "hybrid");
  EXPECT_EQ(m.pattern, "MDMA");
  EXPECT_EQ(m.attn_type, "nsa");
  EXPECT_TRUE(m.hybrid_init);
  EXPECT_EQ(m.n_layers, 4);  // tiny has 2 layers: max(1, 2 / 4) = 1 repeat
  std::string types;
  for (int64_t i = 0; i < m.n_layers; ++i) types += m.layer_type(i);
  EXPECT_EQ(types, "MDMA");
  c.block_repeats = 3;
  m = resolve_model(c, 257);
  EXPECT_EQ(m.n_layers, 12);
  EXPECT_EQ(m.layer_type(7), 'A');
}

TEST(Families, PrintConfigCountsNearNamedSizes) {
  for (const auto& f : kFamilies) {
    for (auto [size, target] : std::vector<std::pair<std::string, double>>{
             {"0.6B", 0.6e9}, {"1B", 1e9}, {"4B", 4e9}, {"8B", 8e9}, {"100M", 1e8}, {"2.5B", 2.5e9}}) {
      const auto m = resolve_model(family_config(f, size), kSeedVocab);
      const double n = double(count_params(m));
      EXPECT_LT(std::abs(n - target) / target, 0.10) << f.label << " " << m.to_string() << " -> " << n;
      EXPECT_EQ(m.family, f.family);
      EXPECT_GE(m.n_heads, m.n_kv_heads) << f.label << " " << size;
      EXPECT_EQ(m.n_heads % m.n_kv_heads, 0);
      EXPECT_EQ(m.n_heads * m.head_dim, m.d);
      EXPECT_EQ(m.n_layers % static_cast<int64_t>(m.pattern.size()), 0);
      const auto text = describe_model(m);
      EXPECT_NE(text.find("total: " + std::to_string(count_params(m))), std::string::npos) << text;
    }
  }
  // Reference points (seed 1.3): the Transformer's 4B is 4096 x 16 and 8B is 4096 x 40.
  auto t4 = resolve_model(family_config(kFamilies[0], "4B"), kSeedVocab);
  EXPECT_EQ(t4.d, 4096);
  EXPECT_EQ(t4.n_layers, 16);
  auto t8 = resolve_model(family_config(kFamilies[0], "8B"), kSeedVocab);
  EXPECT_EQ(t8.d, 4096);
  EXPECT_EQ(t8.n_layers, 40);
}

TEST(Families, SeedTableNames) {
  const auto m = resolve_model_size("SMALL", kSeedVocab);
  EXPECT_EQ(m.d, 1024);
  EXPECT_EQ(m.n_layers, 28);
  EXPECT_EQ(m.n_heads, 16);
  EXPECT_EQ(m.n_kv_heads, 8);
  EXPECT_EQ(m.intermediate, 3072);
  const auto l = resolve_model_size("LARGE", kSeedVocab);
  EXPECT_EQ(l.head_dim, 128);
  EXPECT_EQ(l.n_heads, 32);
  TrainConfig c;
  c.model_size = "MEDIUM";
  c.block_pattern = "MDMA";
  const auto h = resolve_model(c, kSeedVocab);
  EXPECT_EQ(h.d, 2560);
  EXPECT_EQ(h.n_layers, 36);  // 36 / 4 = 9 repeats
}

// Exact counts against built modules, per mixer and in total, at small sizes (the 0.6B builds are in the slow test).
TEST(Families, CountsEqualBuiltModels) {
  for (const auto& f : kFamilies) {
    for (const std::string size : {"tiny", "mini", "3M"}) {
      auto c = family_config(f, size);
      const auto m = resolve_model(c, 257);
      LanguageModel model(m, 500000.0);
      EXPECT_EQ(numel(model->parameters()), count_params(m)) << f.label << " " << m.to_string();
      for (const auto& b : *model->blocks) {
        auto* blk = b->as<Block>();
        EXPECT_EQ(numel(blk->parameters()), block_params(m, blk->type)) << f.label << " " << blk->type;
        if (blk->attn) {
          EXPECT_EQ(numel(blk->attn->parameters()), attention_params(m));
        }
        if (blk->mamba) {
          EXPECT_EQ(numel(blk->mamba->parameters()), mamba2_mixer_params(m));
          EXPECT_EQ(mamba2_mixer_params(m), core::Mamba2MixerImpl::expected_num_parameters(blk->mamba->options));
        }
        if (blk->deltanet) {
          EXPECT_EQ(numel(blk->deltanet->parameters()), deltanet_mixer_params(m));
          EXPECT_EQ(deltanet_mixer_params(m),
                    core::GatedDeltaNetMixerImpl::expected_num_parameters(blk->deltanet->options));
        }
      }
    }
  }
  // Seed 1.5's per-mixer reference counts at d = 1024 and 2048.
  ModelDims m;
  m.d = 1024;
  EXPECT_EQ(mamba2_mixer_params(m), 6'600'032);
  EXPECT_EQ(deltanet_mixer_params(m), 8'437'920);
  m.n_heads = 16;
  m.n_kv_heads = 8;
  m.head_dim = 64;
  EXPECT_EQ(attention_params(m), 3'145'728);
  m.d = 2048;
  EXPECT_EQ(mamba2_mixer_params(m), 25'847'232);
  EXPECT_EQ(deltanet_mixer_params(m), 33'718'464);
}

TEST(Families, InitFollowsSeed) {
  torch::manual_seed(0);
  TrainConfig c;
  c.model_size = "small";
  c.block_pattern = "MDMA";
  c.block_repeats = 2;  // n = 8 layers
  const auto m = resolve_model(c, 257);
  LanguageModel model(m, 500000.0);
  const double n = double(m.n_layers);
  auto std_of = [](const torch::Tensor& t) { return t.std().item<double>(); };
  auto* attn_block = model->blocks[3]->as<Block>();
  auto* gdn_block = model->blocks[1]->as<Block>();
  auto* mamba_block = model->blocks[0]->as<Block>();
  EXPECT_NEAR(std_of(attn_block->attn->o->weight), 0.02 / std::sqrt(2 * n), 0.0015);
  EXPECT_NEAR(std_of(attn_block->attn->q->weight), 0.02, 0.0015);
  EXPECT_NEAR(std_of(gdn_block->deltanet->o_proj->weight), 0.02 / std::sqrt(2 * n), 0.0015);
  EXPECT_NEAR(std_of(mamba_block->mlp->down->weight), 0.02 / std::sqrt(2 * n), 0.0015);
  EXPECT_NEAR(std_of(mamba_block->mamba->out_proj->weight), 0.02, 0.0015);  // not matched by the seed's rule
  EXPECT_NEAR(std_of(model->head->weight), 0.02 / std::sqrt(n), 0.001);
  EXPECT_NEAR(std_of(model->embed->weight), 0.02, 0.001);
  EXPECT_TRUE(torch::equal(mamba_block->mamba->D, torch::ones_like(mamba_block->mamba->D)));  // mixer init kept
  // Pure models: plain N(0, 0.02) everywhere.
  c.block_pattern = "";
  c.mamba_type = "deltanet";
  LanguageModel pure(resolve_model(c, 257), 500000.0);
  EXPECT_NEAR(std_of(pure->blocks[0]->as<Block>()->deltanet->o_proj->weight), 0.02, 0.0015);
  EXPECT_NEAR(std_of(pure->head->weight), 0.02, 0.001);
}

// ---------------------------------------------------------------- causality

TEST(Families, WholeModelIsCausal) {
  at::set_num_threads(1);
  for (const auto& f : kFamilies) {
    torch::manual_seed(3);
    auto c = family_config(f, "tiny");
    small_nsa(c);
    LanguageModel model(resolve_model(c, 257), 500000.0);
    const int64_t T = 48, t = 29;
    auto ids = torch::randint(0, 257, {2, T}, torch::kInt64);
    auto ids2 = ids.clone();
    ids2.narrow(1, t + 1, T - t - 1).random_(0, 257);
    torch::NoGradGuard ng;
    auto a = model->logits(ids), b = model->logits(ids2);
    EXPECT_TRUE(torch::allclose(a.narrow(1, 0, t + 1), b.narrow(1, 0, t + 1), 1e-5, 1e-5))
        << f.label << ": logits at <= t changed, max diff "
        << (a.narrow(1, 0, t + 1) - b.narrow(1, 0, t + 1)).abs().max().item<double>();
    EXPECT_FALSE(torch::allclose(a.narrow(1, t + 1, T - t - 1), b.narrow(1, t + 1, T - t - 1), 1e-3, 1e-3))
        << f.label << ": later positions must change";
  }
}

// ---------------------------------------------------------------- fused kernels vs LibTorch composites

// The default model runs the hand-written kernels of core/ops (RoPE, SwiGLU, residual + RMSNorm, linear + CE);
// --kernel_type baseline runs the composites. Same weights, same batch: the loss and every gradient must agree to
// fp32 accumulation-order error (the kernels reduce in a different order, nothing else differs).
TEST(Families, FusedKernelsMatchComposites) {
  at::set_num_threads(1);
  for (const auto& f : kFamilies) {
    auto c = family_config(f, "tiny");
    small_nsa(c);
    c.kernel_type = "baseline";
    const auto base_dims = resolve_model(c, 257);
    c.kernel_type = "liger";
    const auto fused_dims = resolve_model(c, 257);
    ASSERT_FALSE(base_dims.fused_kernels || base_dims.fused_loss) << f.label;
    ASSERT_TRUE(fused_dims.fused_kernels && fused_dims.fused_loss) << f.label;
    torch::manual_seed(11);
    LanguageModel fused(fused_dims, 500000.0);
    torch::manual_seed(11);
    LanguageModel base(base_dims, 500000.0);
    auto ids = torch::randint(0, 257, {2, 40}, torch::kInt64);
    auto targets = torch::randint(0, 257, {2, 40}, torch::kInt64);
    auto lf = fused->loss(ids, targets), lb = base->loss(ids, targets);
    EXPECT_NEAR(lf.item<double>(), lb.item<double>(), 1e-5 * std::abs(lb.item<double>())) << f.label;
    lf.backward();
    lb.backward();
    auto pf = fused->named_parameters(), pb = base->named_parameters();
    ASSERT_EQ(pf.size(), pb.size());
    double global = 0.0;
    for (const auto& kv : pb) global = std::max(global, kv.value().grad().abs().max().item<double>());
    double worst = 0.0;
    std::string worst_name;
    for (const auto& kv : pb) {
      const auto& gb = kv.value().grad();
      const auto& gf = pf[kv.key()].grad();
      ASSERT_TRUE(gb.defined() && gf.defined()) << f.label << " " << kv.key();
      // Relative to the tensor's gradient scale: fp32 sums of O(100) terms differ by ~1e-6 of their magnitude.
      // The floor (1e-3 of the largest gradient anywhere) is for tensors whose exact gradient is zero and whose
      // computed one is rounding noise, e.g. NSA's key-compression bias: it shifts every compressed key of a
      // query's softmax by the same q.b, which the softmax ignores.
      const double err =
          (gf - gb).abs().max().item<double>() / std::max(gb.abs().max().item<double>(), 1e-3 * global);
      if (err > worst) worst = err, worst_name = kv.key();
    }
    EXPECT_LT(worst, 1e-4) << f.label << ": worst relative gradient difference in " << worst_name;
  }
}

// ---------------------------------------------------------------- activation checkpointing

TEST(Checkpointing, SameLossAndGradientsLessSavedMemory) {
  at::set_num_threads(1);  // tiny ops: OpenMP threads only add contention on shared cores
  torch::manual_seed(5);
  TrainConfig c;
  c.model_size = "tiny";
  c.block_pattern = "MDMA";  // every mixer type, NSA in the A block
  c.attn_type = "nsa";
  c.mamba_d_state = 32;
  small_nsa(c);
  LanguageModel model(resolve_model(c, 257), 500000.0);
  model->train();
  const int64_t B = 2, T = 64;
  auto ids = torch::randint(0, 257, {B, T}, torch::kInt64);
  auto tgt = torch::randint(0, 257, {B, T}, torch::kInt64);

  // Leaked on purpose: tensors allocated through it (the gradients) may outlive this test's locals.
  static CountingAllocator& counter = *new CountingAllocator();
  c10::Allocator* original = c10::GetCPUAllocator();
  auto run = [&](bool ckpt, int64_t* saved_bytes) {
    model->set_gradient_checkpointing(ckpt);
    model->zero_grad();
    c10::SetCPUAllocator(&counter, /*priority=*/255);
    const int64_t before = counter.live();
    auto loss = model->loss(ids, tgt);
    *saved_bytes = counter.live() - before;  // what the graph keeps for backward (plus the loss scalar)
    loss.backward();
    c10::SetCPUAllocator(original, /*priority=*/255);
    std::vector<torch::Tensor> grads;
    for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
    return std::make_pair(loss.item<double>(), grads);
  };
  int64_t plain_bytes = 0, ckpt_bytes = 0;
  auto [l0, g0] = run(false, &plain_bytes);
  auto [l1, g1] = run(true, &ckpt_bytes);
  EXPECT_EQ(l0, l1);
  const auto names = model->named_parameters();
  ASSERT_EQ(g0.size(), g1.size());
  for (size_t i = 0; i < g0.size(); ++i) {
    ASSERT_TRUE(g0[i].defined() && g1[i].defined()) << names[i].key();
    const double diff = (g0[i] - g1[i]).abs().max().item<double>();
    EXPECT_LE(diff, 1e-6) << names[i].key();
    EXPECT_GT(g0[i].abs().max().item<double>(), 0.0) << names[i].key() << " got no gradient";
  }
  // Accumulation: a second checkpointed backward without zeroing doubles every gradient.
  {
    model->zero_grad();
    model->loss(ids, tgt).backward();
    model->loss(ids, tgt).backward();
    for (size_t i = 0; i < g1.size(); ++i)
      EXPECT_TRUE(torch::allclose(model->parameters()[i].grad(), 2 * g1[i], 1e-5, 1e-7)) << names[i].key();
  }
  std::cout << "saved for backward: plain " << plain_bytes / 1024 << " KiB, checkpointed " << ckpt_bytes / 1024
            << " KiB\n";
  EXPECT_GT(plain_bytes, 0);
  EXPECT_LT(ckpt_bytes * 3, plain_bytes) << "checkpointing should keep far less than a third";
  // Under bf16 autocast (left before backward, as the training loop does) the recomputation re-enters autocast,
  // so it rebuilds the same low-precision graph: identical loss and gradients.
  {
    auto amp = [&](bool ckpt) {
      model->set_gradient_checkpointing(ckpt);
      model->zero_grad();
      at::autocast::set_autocast_enabled(at::kCPU, true);
      at::autocast::set_autocast_dtype(at::kCPU, torch::kBFloat16);
      auto loss = model->loss(ids, tgt);
      at::autocast::set_autocast_enabled(at::kCPU, false);
      at::autocast::clear_cache();
      loss.backward();
      std::vector<torch::Tensor> grads;
      for (const auto& p : model->parameters()) grads.push_back(p.grad().clone());
      return std::make_pair(loss.item<double>(), grads);
    };
    auto [a0, ga] = amp(false);
    auto [a1, gb] = amp(true);
    EXPECT_EQ(a0, a1);
    EXPECT_NE(a0, l0);  // it really ran in bf16
    for (size_t i = 0; i < ga.size(); ++i)
      EXPECT_LE((ga[i] - gb[i]).abs().max().item<double>(), 1e-6) << names[i].key();
  }
  // Eval / no-grad forward does not go through the checkpoint function.
  model->eval();
  torch::NoGradGuard ng;
  model->set_gradient_checkpointing(true);
  EXPECT_DOUBLE_EQ(model->loss(ids, tgt).item<double>(), l0);
}

// ---------------------------------------------------------------- learning on the real corpus

TEST(Families, EachFamilyLearnsFortunes) {
  ASSERT_TRUE(fs::is_directory(kFortunes))
      << kFortunes << " is missing: install the corpus with scripts/setup-deps.sh (Debian package fortunes)";
  for (const auto& f : kFamilies) {
    const auto t0 = std::chrono::steady_clock::now();
    auto out = temp_dir(std::string("learn-") + f.label);
    auto c = family_config(f, "tiny");
    small_nsa(c);
    c.mamba_d_state = 32;  // tiny model: a smaller state keeps the CPU test fast
    c.data_dir = fortunes_data().string();
    c.output_dir = out.string();
    c.run_name = "r";
    c.context_length = 64;
    c.batch_size = 8;
    c.num_train_steps = 40;
    c.warmup_steps = 4;
    c.learning_rate = 5e-3;
    c.log_interval = 20;
    c.eval_interval = 1000;
    c.eval_batches = 4;
    c.save_interval = 1000;
    c.num_threads = 1;
    c.seed = 11;
    c.gradient_checkpointing = f.pattern[0] != '\0';  // the hybrid also exercises checkpointing in the loop
    TrainResult r;
    ASSERT_EQ(run_training(c, &r), kExitOk) << f.label;
    ASSERT_EQ(r.step_losses.size(), 40u);
    const double start = r.step_losses.front();  // loss of the untrained model (first batch, before any update)
    EXPECT_GT(start, 5.0) << f.label;            // ~ ln(257) = 5.55
    EXPECT_LT(r.final_eval_loss, start - 1.5) << f.label << ": eval loss " << r.final_eval_loss << " from " << start;
    std::cout << f.label << ": loss " << start << " -> eval " << r.final_eval_loss << " in "
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s\n";
    remove_tree(out);
  }
}

// ---------------------------------------------------------------- CLI

namespace {

std::vector<std::string> split(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;)
    if (w != "\\") out.push_back(w);
  return out;
}

// The seed's command (launcher and "train.py" dropped), parsed with --print_config appended.
TrainConfig parse_ok(const std::string& command) {
  auto words = split(command);
  auto it = std::find(words.begin(), words.end(), "train.py");
  EXPECT_NE(it, words.end()) << command;
  std::vector<std::string> args(it + 1, words.end());
  args.push_back("--print_config");
  TrainConfig c;
  std::ostringstream out, err;
  EXPECT_EQ(parse_train_args(args, c, out, err), -1) << command << "\n" << err.str();
  EXPECT_TRUE(c.print_config);
  return c;
}

std::string parse_error(std::vector<std::string> args) {
  TrainConfig c;
  std::ostringstream out, err;
  EXPECT_EQ(parse_train_args(args, c, out, err), kExitInvalidConfig) << "accepted: " << args.back();
  return err.str();
}

}  // namespace

TEST(Cli, SeedReadmeCommandsParseAndResolve) {
  // /work/shared/SEED-README.md, verbatim (the resume example ends in a literal "...", so it is not a command).
  const std::string hybrid = "python train.py --model_size 1B --block_pattern MDMA --attn_type nsa --optimizer_type adamw8bit";
  const std::string fsdp =
      "torchrun --nproc_per_node=4 train.py --model_size 1B --block_pattern MDMA --attn_type nsa --optimizer_type "
      "adamw8bit";
  const std::string smoke = R"(python train.py \
    --model_size 0.6B \
    --attention_type dense \
    --optimizer_type adamw_8bit \
    --context_length 32768 \
    --num_train_steps 2 \
    --log_interval 1 \
    --batch_size 1 \
    --gradient_accumulation_steps 4 \
    --dtype bfloat16)";
  const std::string docker = "python train.py --model_size 0.6B --attention_type nsa";

  for (const auto& cmd : {hybrid, fsdp}) {
    auto c = parse_ok(cmd);
    EXPECT_EQ(c.optimizer_type, "adamw8bit");
    const auto m = resolve_model(c, kSeedVocab);
    EXPECT_EQ(m.family, "hybrid");
    EXPECT_EQ(m.pattern, "MDMA");
    EXPECT_EQ(m.attn_type, "nsa");
    EXPECT_LT(std::abs(double(count_params(m)) - 1e9) / 1e9, 0.10) << m.to_string();
    EXPECT_EQ(run_training(c), kExitOk);  // prints the config (no data needed)
  }
  {
    auto c = parse_ok(smoke);
    EXPECT_EQ(c.optimizer_type, "adamw8bit");  // adamw_8bit alias
    EXPECT_EQ(c.context_length, 32768);
    EXPECT_EQ(c.dtype, "bfloat16");
    EXPECT_EQ(c.gradient_accumulation_steps, 4);
    const auto m = resolve_model(c, kSeedVocab);
    EXPECT_EQ(m.family, "transformer");
    EXPECT_EQ(m.attn_type, "dense");
    EXPECT_EQ(run_training(c), kExitOk);
  }
  {
    auto c = parse_ok(docker);
    const auto m = resolve_model(c, kSeedVocab);
    EXPECT_EQ(m.family, "transformer");
    EXPECT_EQ(m.attn_type, "nsa");
  }
  // The seed's single-dash aliases and its other flags.
  auto c = parse_ok("python train.py --model_size 100M -attn fsa -lr 3e-4 -wd 0.05 -clip 0.5 --mamba_type mamba2 "
                    "--mamba_d_state 64 --mamba_d_conv 4 --mamba_expand 2 --mamba_headdim 32 --nsa_block_size 64 "
                    "--nsa_window_size 256 --nsa_num_selected_blocks 8 --kernel_type triton --ce_kernel_type liger "
                    "--dataset_name HuggingFaceFW/fineweb-edu --dataset_subset sample-10BT --precondition_frequency 5 "
                    "--shampoo_beta 0.9 --max_precond_dim 4096 --gradient_checkpointing --context_length 1000 "
                    "--block_repeats -1 --save_interval 5000 --run_name x --output_dir ./o --rope_theta 1e5");
  EXPECT_EQ(c.attn_type, "fsa");
  EXPECT_DOUBLE_EQ(c.learning_rate, 3e-4);
  EXPECT_DOUBLE_EQ(c.max_grad_norm, 0.5);
  EXPECT_EQ(c.context_length, 1000);
  EXPECT_TRUE(c.gradient_checkpointing);
  const auto m = resolve_model(c, kSeedVocab);
  EXPECT_EQ(m.family, "mamba2");
  EXPECT_EQ(m.mamba_d_state, 64);
  EXPECT_EQ(m.mamba_headdim, 32);
}

TEST(Cli, RejectedValuesListTheValidOnes) {
  auto e = parse_error({"--block_pattern", "MXA"});
  EXPECT_NE(e.find("'X'"), std::string::npos) << e;
  EXPECT_NE(e.find("M = Mamba2, D = Gated DeltaNet, A = attention"), std::string::npos) << e;
  e = parse_error({"--mamba_type", "mamba3"});
  EXPECT_NE(e.find("none, mamba2, deltanet"), std::string::npos) << e;
  e = parse_error({"--attn_type", "sparse"});
  EXPECT_NE(e.find("dense, nsa, native_sparse_attention, fsa, flash_sparse_attention"), std::string::npos) << e;
  e = parse_error({"--optimizer_type", "lion"});
  EXPECT_NE(e.find("adamw8bit"), std::string::npos) << e;
  e = parse_error({"--kernel_type", "cuda"});
  EXPECT_NE(e.find("baseline, triton, liger"), std::string::npos) << e;
  e = parse_error({"--model_size", "huge"});
  EXPECT_NE(e.find("SMALL"), std::string::npos) << e;
  e = parse_error({"--nsa_cmp_block_size", "30"});
  EXPECT_NE(e.find("multiple of --nsa_cmp_stride"), std::string::npos) << e;
  e = parse_error({"--block_repeats", "0"});
  EXPECT_NE(e.find("-1"), std::string::npos) << e;
  e = parse_error({"--no_such_flag", "1"});
  EXPECT_NE(e.find("no_such_flag"), std::string::npos) << e;
  // A missing dataset explains how to make one.
  TrainConfig c;
  c.data_dir = "/nonexistent/ablate-data";
  try {
    resolve_data_dir(c);
    FAIL() << "missing dataset accepted";
  } catch (const ConfigError& err) {
    EXPECT_NE(std::string(err.what()).find("prepare-data"), std::string::npos) << err.what();
  }
}

// ---------------------------------------------------------------- real-size builds (label slow)

TEST(FamiliesSlow, BuiltModelsAt0p6BMatchPrintedCounts) {
  for (const auto& f : kFamilies) {
    const auto m = resolve_model(family_config(f, "0.6B"), kSeedVocab);
    LanguageModel model(m, 500000.0);
    EXPECT_EQ(numel(model->parameters()), count_params(m)) << f.label << " " << m.to_string();
    std::cout << f.label << " 0.6B: " << m.to_string() << " params " << count_params(m) << "\n";
  }
}
