// Data preparation, training on the real corpus, checkpoint/resume and checkpoint verification.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/data.h"
#include "core/fsutil.h"
#include "core/train.h"
#include "tests/scratch_dir.h"

namespace fs = std::filesystem;
using namespace ablate;

namespace {

const char* kFortunes = "/usr/share/games/fortunes";

// Removed when this test process exits (tests/scratch_dir.h).
fs::path temp_dir(const std::string& tag) { return ablate::testing::scratch_dir("ablate-core-test", tag); }

std::vector<uint16_t> read_tokens(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<uint16_t> t(b.size() / 2);
  std::memcpy(t.data(), b.data(), t.size() * 2);
  return t;
}

// The real corpus, prepared once per test binary run.
const fs::path& fortunes_data() {
  static fs::path dir = [] {
    if (!fs::is_directory(kFortunes)) return fs::path();
    auto d = temp_dir("fortunes");
    prepare_data({kFortunes}, d.string(), 0.05);
    return d;
  }();
  return dir;
}

TrainConfig small_config(const fs::path& data, const fs::path& out) {
  TrainConfig c;
  c.model_size = "tiny";
  c.data_dir = data.string();
  c.output_dir = out.string();
  c.run_name = "r";
  c.context_length = 64;
  c.batch_size = 8;
  c.num_train_steps = 20;
  c.warmup_steps = 2;
  c.learning_rate = 3e-3;
  c.log_interval = 10;
  c.eval_interval = 1000;
  c.eval_batches = 2;
  c.save_interval = 10;
  c.num_threads = 1;
  c.seed = 7;
  return c;
}

}  // namespace

TEST(PrepareData, RoundTripOnSmallCorpus) {
  auto dir = temp_dir("prep");
  fs::create_directories(dir / "in" / "sub");
  { std::ofstream(dir / "in" / "a") << "first doc\n%\nsecond\ndoc\n%\n"; }
  { std::ofstream(dir / "in" / "sub" / "b") << "third doc\n"; }
  { std::ofstream(dir / "in" / "a.dat", std::ios::binary) << std::string("\0\1\2", 3); }
  { std::ofstream(dir / "in" / "bin", std::ios::binary) << std::string("x\0y", 3); }
  const auto s = prepare_data({(dir / "in").string()}, (dir / "out").string(), 0.3);
  EXPECT_EQ(s.files, 2);
  EXPECT_EQ(s.documents, 3);
  EXPECT_GE(s.val_docs, 1);
  EXPECT_GE(s.train_docs, 1);
  nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir / "out" / "meta.json"));
  EXPECT_EQ(meta["tokenizer"], "byte");
  EXPECT_EQ(meta["vocab_size"], 257);
  EXPECT_EQ(meta["eos_id"], 256);
  auto train = read_tokens(dir / "out" / "train.bin"), val = read_tokens(dir / "out" / "val.bin");
  EXPECT_EQ(int64_t(train.size()), meta["train_tokens"].get<int64_t>());
  EXPECT_EQ(int64_t(val.size()), meta["val_tokens"].get<int64_t>());
  // Decode both splits back into documents: together exactly the three inputs.
  std::multiset<std::string> docs;
  for (const auto* t : {&train, &val}) {
    std::string cur;
    for (uint16_t id : *t) {
      if (id == 256) {
        docs.insert(cur);
        cur.clear();
      } else {
        ASSERT_LT(id, 256);
        cur += char(id);
      }
    }
    EXPECT_TRUE(cur.empty()) << "every document ends with EOS";
  }
  EXPECT_EQ(docs, (std::multiset<std::string>{"first doc", "second\ndoc", "third doc"}));
  // Deterministic: a second run gives identical files.
  prepare_data({(dir / "in").string()}, (dir / "out2").string(), 0.3);
  EXPECT_EQ(read_tokens(dir / "out2" / "train.bin"), train);
  EXPECT_THROW(prepare_data({(dir / "missing").string()}, (dir / "o3").string(), 0.3), ConfigError);
  remove_tree(dir);
}

TEST(Training, TinyModelLearnsFortunes) {
  ASSERT_TRUE(fs::is_directory(kFortunes))
      << kFortunes << " is missing: install the corpus with scripts/setup-deps.sh (Debian package fortunes)";
  auto out = temp_dir("learn");
  auto c = small_config(fortunes_data(), out);
  c.num_train_steps = 80;
  c.warmup_steps = 8;
  c.eval_batches = 4;
  c.save_interval = 1000;
  TrainResult r;
  ASSERT_EQ(run_training(c, &r), kExitOk);
  ASSERT_EQ(r.step_losses.size(), 80u);
  EXPECT_GT(r.step_losses.front(), 5.0);            // starts near ln(257) = 5.55
  EXPECT_LT(r.final_eval_loss, 3.6) << "eval loss did not fall enough";
  EXPECT_LT(r.step_losses.back(), r.step_losses.front() - 1.5);
  remove_tree(out);
}

// --profile_steps: the profiled steps leave a Chrome trace and a summary table naming real ops, and the run's
// losses are those of an unprofiled run (profiling only observes).
TEST(Training, ProfileWritesTraceAndSummary) {
  ASSERT_TRUE(fs::is_directory(kFortunes)) << kFortunes << " is missing";
  auto out = temp_dir("profile");
  auto c = small_config(fortunes_data(), out);
  c.num_train_steps = 5;
  c.save_interval = 1000;
  TrainResult plain;
  ASSERT_EQ(run_training(c, &plain), kExitOk);
  c.profile_steps = 2;
  c.run_name = "profiled";
  TrainResult profiled;
  ASSERT_EQ(run_training(c, &profiled), kExitOk);
  EXPECT_EQ(profiled.step_losses, plain.step_losses);
  const auto dir = out / "profiled" / "profile";
  ASSERT_TRUE(fs::exists(dir / "trace.json")) << dir;
  std::ifstream sf(dir / "summary.txt");
  const std::string summary((std::istreambuf_iterator<char>(sf)), std::istreambuf_iterator<char>());
  EXPECT_NE(summary.find("profile of steps 3-4"), std::string::npos) << summary;
  EXPECT_NE(summary.find("aten::mm"), std::string::npos) << summary;
  const auto trace = nlohmann::json::parse(std::ifstream(dir / "trace.json"));
  EXPECT_GT(trace.at("traceEvents").size(), 100u);
  c.profile_steps = -1;
  EXPECT_THROW(c.validate(), ConfigError);
  remove_tree(out);
}

TEST(Training, ResumeIsBitwiseIdentical) {
  ASSERT_TRUE(fs::is_directory(kFortunes)) << kFortunes << " is missing: run scripts/setup-deps.sh";
  auto out = temp_dir("resume");
  auto c = small_config(fortunes_data(), out);
  TrainResult straight;
  ASSERT_EQ(run_training(c, &straight), kExitOk);
  ASSERT_EQ(straight.step_losses.size(), 20u);

  auto c2 = c;
  c2.run_name = "resumed";
  c2.resume_from = (out / "r" / "checkpoint-10").string();
  TrainResult resumed;
  ASSERT_EQ(run_training(c2, &resumed), kExitOk);
  ASSERT_EQ(resumed.first_step, 11);
  ASSERT_EQ(resumed.step_losses.size(), 10u);
  for (size_t i = 0; i < 10; ++i)
    EXPECT_EQ(resumed.step_losses[i], straight.step_losses[10 + i]) << "step " << 11 + i;  // bitwise
  EXPECT_EQ(resumed.final_eval_loss, straight.final_eval_loss);
  remove_tree(out);
}

TEST(Training, CorruptedCheckpointIsRefused) {
  ASSERT_TRUE(fs::is_directory(kFortunes)) << kFortunes << " is missing: run scripts/setup-deps.sh";
  auto out = temp_dir("corrupt");
  auto c = small_config(fortunes_data(), out);
  c.num_train_steps = 2;
  c.save_interval = 2;
  ASSERT_EQ(run_training(c, nullptr), kExitOk);
  const auto ckpt = out / "r" / "checkpoint-2";
  EXPECT_NO_THROW(verify_checkpoint(ckpt.string()));
  {
    std::fstream f(ckpt / "model.pt", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    char b = 0;
    f.seekg(100);
    f.read(&b, 1);
    b = char(b ^ 0x5a);
    f.seekp(100);
    f.write(&b, 1);
  }
  try {
    verify_checkpoint(ckpt.string());
    FAIL() << "corrupted checkpoint accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.pt"), std::string::npos) << e.what();
  }
  auto c2 = c;
  c2.resume_from = ckpt.string();
  c2.num_train_steps = 4;
  EXPECT_EQ(run_training(c2, nullptr), kExitInvalidConfig);
  fs::remove(ckpt / "manifest.json");
  EXPECT_THROW(verify_checkpoint(ckpt.string()), ConfigError);
  remove_tree(out);
}

TEST(Config, RejectsBadAndUnimplementedSettings) {
  TrainConfig c;
  c.attn_type = "nsa";
  EXPECT_NO_THROW(c.validate());  // NSA and M/D blocks are built now (tests/core/families_test.cpp)
  c.attn_type = "bogus";
  EXPECT_THROW(c.validate(), ConfigError);
  c = TrainConfig{};
  c.block_pattern = "MDA";
  EXPECT_NO_THROW(c.validate());
  c.block_pattern = "MXA";
  EXPECT_THROW(c.validate(), ConfigError);
  c = TrainConfig{};
  for (const char* o : {"adamw", "adamw8bit", "adamw_8bit", "adamw4bit", "soap", "soap_4bit", "shampoo"}) {
    c.optimizer_type = o;
    EXPECT_NO_THROW(c.validate()) << o;
  }
  c.optimizer_type = "lion";
  try {
    c.validate();
    FAIL() << "unknown optimizer accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("soap8bit"), std::string::npos) << "lists the valid names: " << e.what();
  }
  c = TrainConfig{};
  c.context_length = 0;
  EXPECT_THROW(c.validate(), ConfigError);
  c = TrainConfig{};
  c.context_length = 777;  // any positive length is fine (the seed only allowed a fixed list)
  EXPECT_NO_THROW(c.validate());
}
