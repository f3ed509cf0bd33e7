// The training loop's acceptance tests on CPU: bitwise-exact resume for every optimizer x precision, fp16 loss
// scaling, checkpoint corruption, divergence, retention, metrics; plus the FLOP formula. Tiny model, context 32,
// 8 steps, so every case runs in about a second on one thread.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <tuple>

#include "core/checkpoint.h"
#include "core/data.h"
#include "core/flops.h"
#include "core/fsutil.h"
#include "core/model.h"
#include "core/optim/optimizer.h"
#include "core/precision.h"
#include "core/train.h"
#include "tests/scratch_dir.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace ablate;

namespace {

// Removed when this test process exits (tests/scratch_dir.h).
fs::path temp_dir(const std::string& tag) { return ablate::testing::scratch_dir("ablate-train-resume", tag); }

// A small synthetic corpus (deterministic pseudo-random words), prepared once per test binary.
const fs::path& synthetic_data() {
  static fs::path dir = [] {
    auto root = temp_dir("data");
    const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs",
                           "far", "away", "from", "a", "big", "red", "barn", "in", "summer", "rain"};
    uint64_t x = 12345;
    std::ofstream f(root / "corpus.txt");
    for (int doc = 0; doc < 300; ++doc) {
      for (int w = 0; w < 24; ++w) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        f << words[(x >> 33) % 20] << (w % 8 == 7 ? ".\n" : " ");
      }
      f << "\n%\n";
    }
    f.close();
    prepare_data({(root / "corpus.txt").string()}, (root / "prepared").string(), 0.1);
    return root / "prepared";
  }();
  return dir;
}

TrainConfig tiny_config(const fs::path& out, const std::string& optimizer, const std::string& dtype) {
  TrainConfig c;
  c.model_size = "tiny";
  c.data_dir = synthetic_data().string();
  c.output_dir = out.string();
  c.run_name = "straight";
  c.optimizer_type = optimizer;
  c.dtype = dtype;
  c.context_length = 32;
  c.batch_size = 4;
  c.num_train_steps = 8;
  c.warmup_steps = 2;
  c.learning_rate = 3e-3;
  c.precondition_frequency = 2;  // SOAP/Shampoo refresh before and after the resume point
  c.log_interval = 4;
  c.eval_interval = 1000;
  c.eval_batches = 1;
  c.save_interval = 1000;  // the straight run saves only at its end
  c.keep_checkpoints = 0;
  c.num_threads = 1;
  c.device = "cpu";
  c.seed = 11;
  return c;
}

// Every leaf of an archive (nested module archives flattened to "a.b.key").
void read_archive_into(torch::serialize::InputArchive& ar, const std::string& prefix,
                       std::map<std::string, c10::IValue>& out) {
  for (const auto& k : ar.keys()) {
    c10::IValue v;
    if (!ar.try_read(k, v)) continue;
    if (v.isObject()) {
      torch::serialize::InputArchive sub;
      if (ar.try_read(k, sub)) read_archive_into(sub, prefix + k + ".", out);
    } else {
      out[prefix + k] = v;
    }
  }
}

std::map<std::string, c10::IValue> read_archive(const fs::path& p) {
  torch::serialize::InputArchive ar;
  ar.load_from(p.string());
  std::map<std::string, c10::IValue> out;
  read_archive_into(ar, "", out);
  return out;
}

// Bitwise equality of two archives (model or optimizer state).
void expect_same_archive(const fs::path& a, const fs::path& b) {
  const auto x = read_archive(a), y = read_archive(b);
  ASSERT_EQ(x.size(), y.size()) << a << " vs " << b;
  ASSERT_FALSE(x.empty());
  for (const auto& [k, v] : x) {
    ASSERT_TRUE(y.count(k)) << k;
    const auto& w = y.at(k);
    if (v.isTensor()) {
      ASSERT_TRUE(w.isTensor()) << k;
      EXPECT_TRUE(torch::equal(v.toTensor(), w.toTensor())) << "tensor " << k << " differs: " << a << " vs " << b;
    } else if (v.isInt() || v.isDouble() || v.isString() || v.isBool()) {
      EXPECT_TRUE(v == w) << k;
    }
  }
}

std::vector<json> read_events(const fs::path& p) {
  std::vector<json> out;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line)) out.push_back(json::parse(line));
  return out;
}

int open_events(const fs::path& p) { return ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644); }

}  // namespace

// ------------------------------------------------------------------ straight == stop + resume, bitwise

class ResumeExact : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(ResumeExact, StraightEqualsStopAndResume) {
  const auto [optimizer, dtype] = GetParam();
  auto out = temp_dir("resume-" + optimizer + "-" + dtype);
  auto c = tiny_config(out, optimizer, dtype);
  const int64_t N = c.num_train_steps, half = N / 2;

  TrainResult straight;
  ASSERT_EQ(run_training(c, &straight), kExitOk);
  ASSERT_EQ(straight.step_losses.size(), size_t(N));

  auto cb = c;  // identical run, interrupted right after its checkpoint at N/2
  cb.run_name = "interrupted";
  cb.save_interval = half;
  TrainHooks stop;
  stop.stop_after_step = half;
  TrainResult first;
  ASSERT_EQ(run_training(cb, &first, &stop), kExitOk);
  ASSERT_EQ(first.step_losses.size(), size_t(half));
  ASSERT_TRUE(fs::exists(out / "interrupted" / ("checkpoint-" + std::to_string(half)) / "manifest.json"));
  ASSERT_FALSE(fs::exists(out / "interrupted" / ("checkpoint-" + std::to_string(N))));

  auto cc = c;
  cc.run_name = "resumed";
  cc.resume_from = (out / "interrupted" / ("checkpoint-" + std::to_string(half))).string();
  TrainResult second;
  ASSERT_EQ(run_training(cc, &second), kExitOk);
  ASSERT_EQ(second.first_step, half + 1);
  ASSERT_EQ(second.step_losses.size(), size_t(N - half));

  for (int64_t i = 0; i < N; ++i) {
    const double got = i < half ? first.step_losses[i] : second.step_losses[i - half];
    const double scale = i < half ? first.loss_scales[i] : second.loss_scales[i - half];
    EXPECT_EQ(got, straight.step_losses[i]) << optimizer << "/" << dtype << " step " << i + 1;  // bitwise
    EXPECT_EQ(scale, straight.loss_scales[i]) << "loss scale, step " << i + 1;
    EXPECT_TRUE(std::isfinite(straight.step_losses[i]));
  }
  EXPECT_EQ(second.skipped_steps, straight.skipped_steps);
  EXPECT_EQ(second.final_eval_loss, straight.final_eval_loss);
  const auto end = "checkpoint-" + std::to_string(N);
  expect_same_archive(out / "straight" / end / "model.pt", out / "resumed" / end / "model.pt");
  expect_same_archive(out / "straight" / end / "optimizer.pt", out / "resumed" / end / "optimizer.pt");
  if (dtype == "float32") {
    EXPECT_LT(straight.step_losses.back(), straight.step_losses.front()) << "it learns";
  }
  remove_tree(out.string());
}

INSTANTIATE_TEST_SUITE_P(EveryOptimizerAndPrecision, ResumeExact,
                         ::testing::Combine(::testing::Values("adamw", "adamw8bit", "adamw4bit", "soap", "soap8bit",
                                                              "soap4bit", "shampoo"),
                                            ::testing::Values("float32", "bfloat16", "float16")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

TEST(ResumeExactExtra, GradientAccumulationAndAliasName) {
  auto out = temp_dir("resume-ga");
  auto c = tiny_config(out, "adamw_8bit", "bfloat16");
  c.gradient_accumulation_steps = 2;
  c.num_train_steps = 6;
  c.save_interval = 3;
  TrainResult straight;
  ASSERT_EQ(run_training(c, &straight), kExitOk);
  auto c2 = c;
  c2.run_name = "resumed";
  c2.resume_from = (out / "straight" / "checkpoint-3").string();
  TrainResult resumed;
  ASSERT_EQ(run_training(c2, &resumed), kExitOk);
  ASSERT_EQ(resumed.step_losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed.step_losses[i], straight.step_losses[3 + i]) << "step " << 4 + i;
  // A different optimizer cannot take over the state.
  auto c3 = c2;
  c3.optimizer_type = "soap";
  EXPECT_EQ(run_training(c3, nullptr), kExitInvalidConfig);
  remove_tree(out.string());
}

TEST(ResumeExactExtra, HybridMambaDeltaNetNsaModel) {
  // The model families resume exactly too (Mamba2 + Gated DeltaNet + NSA attention in one stack), and their
  // sequence-mixing FLOPs enter MFU.
  auto out = temp_dir("resume-hybrid");
  auto c = tiny_config(out, "soap", "bfloat16");
  c.block_pattern = "MDA";
  c.block_repeats = 1;
  c.attn_type = "nsa";
  c.nsa_block_size = 16;
  c.nsa_cmp_block_size = 16;
  c.nsa_cmp_stride = 8;
  c.nsa_num_selected_blocks = 3;
  c.nsa_window_size = 16;
  c.num_train_steps = 4;
  c.save_interval = 2;
  TrainResult straight;
  ASSERT_EQ(run_training(c, &straight), kExitOk);
  auto c2 = c;
  c2.run_name = "resumed";
  c2.resume_from = (out / "straight" / "checkpoint-2").string();
  TrainResult resumed;
  ASSERT_EQ(run_training(c2, &resumed), kExitOk);
  ASSERT_EQ(resumed.step_losses.size(), 2u);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(resumed.step_losses[i], straight.step_losses[2 + i]) << "step " << 3 + i;
  expect_same_archive(out / "straight" / "checkpoint-4" / "model.pt", out / "resumed" / "checkpoint-4" / "model.pt");

  const FlopsSpec s = flops_spec(resolve_model(c, 257), c);
  EXPECT_EQ(s.pattern, "MDA");
  EXPECT_EQ(s.attn_type, "nsa");
  const auto f = training_flops_per_token(s, 0);
  EXPECT_GT(f.ssd, 0);
  EXPECT_GT(f.delta_rule, 0);
  EXPECT_GT(f.attention, 0);
  EXPECT_GT(straight.flops_per_token, f.total()) << "plus the projections";
  remove_tree(out.string());
}

// ------------------------------------------------------------------ fp16 dynamic loss scaling

TEST(LossScaling, PolicyGrowsAndBacksOff) {
  LossScaler s(true);
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_FALSE(s.update(true));
  EXPECT_EQ(s.scale(), 32768.0);
  EXPECT_EQ(s.skipped_steps(), 1);
  for (int i = 0; i < 1999; ++i) ASSERT_TRUE(s.update(false));
  EXPECT_EQ(s.scale(), 32768.0);
  EXPECT_TRUE(s.update(false));  // the 2000th clean step in a row
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.growth_tracker(), 0);
  LossScaler off(false);
  EXPECT_EQ(off.scale(), 1.0);
  EXPECT_TRUE(off.update(false));
  EXPECT_FALSE(off.update(true));
  EXPECT_EQ(off.scale(), 1.0);
}

TEST(LossScaling, InjectedOverflowIsSkippedHalvedCountedAndResumed) {
  auto out = temp_dir("fp16-overflow");
  auto c = tiny_config(out, "adamw", "float16");
  c.num_train_steps = 6;
  c.save_interval = 1;
  c.log_interval = 1;
  TrainResult base;
  {
    auto cb = c;
    cb.run_name = "base";
    ASSERT_EQ(run_training(cb, &base), kExitOk);
  }
  const fs::path events = out / "events.jsonl";
  c.events_fd = open_events(events);
  TrainHooks inject;
  inject.grad_overflow_steps = {3};
  TrainResult r;
  ASSERT_EQ(run_training(c, &r, &inject), kExitOk);
  ::close(c.events_fd);
  c.events_fd = -1;

  EXPECT_EQ(r.skipped_steps, base.skipped_steps + 1);
  EXPECT_FALSE(std::isfinite(r.grad_norms[2]));
  EXPECT_EQ(r.loss_scales[2], r.loss_scales[1] * 0.5) << "the overflowing step halves the scale";
  for (int i = 0; i < 3; ++i) EXPECT_EQ(r.step_losses[i], base.step_losses[i]) << "same up to the skip";
  // The skipped step left the weights alone: checkpoint-3 holds the weights of checkpoint-2.
  expect_same_archive(out / "straight" / "checkpoint-2" / "model.pt", out / "straight" / "checkpoint-3" / "model.pt");
  // ... and the optimizer did not count it.
  const auto opt = read_archive(out / "straight" / "checkpoint-6" / "optimizer.pt");
  EXPECT_EQ(opt.at("p0/step").toInt(), 6 - r.skipped_steps);
  const json st = json::parse(std::ifstream(out / "straight" / "checkpoint-3" / "state.json"));
  EXPECT_EQ(st["loss_scaler"]["skipped_steps"].get<int64_t>(), base.skipped_steps + 1);
  EXPECT_EQ(st["loss_scaler"]["scale"].get<double>(), r.loss_scales[2]);
  // The metric counts it.
  std::map<int64_t, int64_t> skipped_metric;
  for (const auto& e : read_events(events))
    if (e["event"] == "metrics" && e["values"].contains("train/skipped_steps"))
      skipped_metric[e["step"].get<int64_t>()] = e["values"]["train/skipped_steps"].get<int64_t>();
  ASSERT_TRUE(skipped_metric.count(2) && skipped_metric.count(3));
  EXPECT_EQ(skipped_metric[3], skipped_metric[2] + 1);
  EXPECT_EQ(skipped_metric.rbegin()->second, r.skipped_steps);

  // Resuming after the skip restores the scale and the skip count exactly.
  auto c2 = c;
  c2.run_name = "resumed";
  c2.resume_from = (out / "straight" / "checkpoint-3").string();
  TrainResult resumed;
  ASSERT_EQ(run_training(c2, &resumed), kExitOk);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(resumed.step_losses[i], r.step_losses[3 + i]);
    EXPECT_EQ(resumed.loss_scales[i], r.loss_scales[3 + i]);
  }
  EXPECT_EQ(resumed.skipped_steps, r.skipped_steps);
  remove_tree(out.string());
}

TEST(LossScaling, OverflowWithoutScalingIsDivergence) {
  auto out = temp_dir("fp32-overflow");
  auto c = tiny_config(out, "adamw", "float32");
  TrainHooks inject;
  inject.grad_overflow_steps = {2};
  EXPECT_EQ(run_training(c, nullptr, &inject), kExitDiverged);
  EXPECT_FALSE(fs::exists(out / "straight" / "checkpoint-8"));
  remove_tree(out.string());
}

// ------------------------------------------------------------------ divergence

TEST(Divergence, NanLossExitsThreeAndWritesNoCheckpoint) {
  auto out = temp_dir("nan");
  auto c = tiny_config(out, "soap", "bfloat16");
  c.save_interval = 2;
  const fs::path events = out / "events.jsonl";
  c.events_fd = open_events(events);
  TrainHooks inject;
  inject.nan_loss_steps = {3};
  TrainResult r;
  EXPECT_EQ(run_training(c, &r, &inject), kExitDiverged);
  ::close(c.events_fd);
  EXPECT_TRUE(fs::exists(out / "straight" / "checkpoint-2" / "manifest.json"));  // from before the NaN
  for (int s = 3; s <= 8; ++s) EXPECT_FALSE(fs::exists(out / "straight" / ("checkpoint-" + std::to_string(s))));
  const auto ev = read_events(events);
  ASSERT_FALSE(ev.empty());
  EXPECT_EQ(ev.back()["event"], "finished");
  EXPECT_EQ(ev.back()["failure_class"], "diverged");
  EXPECT_NE(ev.back()["message"].get<std::string>().find("step 3"), std::string::npos);

  // NaN on the very first step: no checkpoint directory at all.
  auto c1 = tiny_config(out, "adamw", "float16");
  c1.run_name = "first";
  inject.nan_loss_steps = {1};
  EXPECT_EQ(run_training(c1, nullptr, &inject), kExitDiverged);
  EXPECT_FALSE(fs::exists(out / "first"));
  remove_tree(out.string());
}

// ------------------------------------------------------------------ corrupt / incomplete checkpoints

namespace {

void copy_tree(const fs::path& from, const fs::path& to) {
  remove_tree(to.string());
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) fs::copy_file(e.path(), to / e.path().filename());
}

// Resume must fail with exit 2, before any step, and the message must name `file`.
void expect_refused(const TrainConfig& base, const fs::path& ckpt, const std::string& file, const std::string& what) {
  try {
    verify_checkpoint(ckpt.string());
    ADD_FAILURE() << what << ": verify_checkpoint accepted it";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << what << ": " << e.what();
  }
  auto c = base;
  c.run_name = "after-" + file;
  c.resume_from = ckpt.string();
  const fs::path events = ckpt.parent_path() / ("events-" + file + ".jsonl");
  c.events_fd = open_events(events);
  TrainResult r;
  EXPECT_EQ(run_training(c, &r), kExitInvalidConfig) << what;
  ::close(c.events_fd);
  EXPECT_TRUE(r.step_losses.empty()) << what << ": trained from a bad checkpoint";
  const auto ev = read_events(events);
  ASSERT_FALSE(ev.empty());
  EXPECT_EQ(ev.back()["failure_class"], "invalid_config");
  EXPECT_NE(ev.back()["message"].get<std::string>().find(file), std::string::npos) << ev.back().dump();
}

}  // namespace

TEST(Checkpoint, CorruptTruncatedOrMissingFilesAreRefusedByName) {
  auto out = temp_dir("corrupt");
  auto c = tiny_config(out, "soap4bit", "float16");
  c.num_train_steps = 2;
  ASSERT_EQ(run_training(c, nullptr), kExitOk);
  const fs::path good = out / "straight" / "checkpoint-2";
  ASSERT_NO_THROW(verify_checkpoint(good.string()));
  auto resume = c;
  resume.num_train_steps = 3;
  const fs::path bad = out / "bad";
  for (const std::string f : {"model.pt", "optimizer.pt", "rng.pt", "state.json", "manifest.json"}) {
    // Truncated.
    copy_tree(good, bad);
    fs::resize_file(bad / f, fs::file_size(bad / f) - 1);
    expect_refused(resume, bad, f, "truncated " + f);
    // One byte flipped in the middle.
    copy_tree(good, bad);
    {
      std::fstream s(bad / f, std::ios::in | std::ios::out | std::ios::binary);
      const auto pos = static_cast<std::streamoff>(fs::file_size(bad / f) / 2);
      char b = 0;
      s.seekg(pos);
      s.read(&b, 1);
      b = char(b ^ 0x01);
      s.seekp(pos);
      s.write(&b, 1);
    }
    expect_refused(resume, bad, f, "flipped byte in " + f);
    // Deleted.
    copy_tree(good, bad);
    fs::remove(bad / f);
    expect_refused(resume, bad, f, "missing " + f);
  }
  // An interrupted write (temporary directory, no manifest) is not a checkpoint either.
  copy_tree(good, bad);
  fs::remove(bad / "manifest.json");
  fs::rename(bad, out / "checkpoint-9.tmp-1");
  expect_refused(resume, out / "checkpoint-9.tmp-1", "manifest.json", "incomplete");
  // The untouched checkpoint still resumes.
  resume.resume_from = good.string();
  resume.run_name = "ok";
  EXPECT_EQ(run_training(resume, nullptr), kExitOk);
  remove_tree(out.string());
}

TEST(Checkpoint, KeepsTheNewestK) {
  auto out = temp_dir("keep");
  auto c = tiny_config(out, "adamw", "float32");
  c.num_train_steps = 6;
  c.save_interval = 1;
  c.keep_checkpoints = 2;
  ASSERT_EQ(run_training(c, nullptr), kExitOk);
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(out / "straight")) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"checkpoint-5", "checkpoint-6"}));
  // keep 1: only the one just written remains, and it is complete.
  c.run_name = "one";
  c.keep_checkpoints = 1;
  ASSERT_EQ(run_training(c, nullptr), kExitOk);
  left.clear();
  for (const auto& e : fs::directory_iterator(out / "one")) left.push_back(e.path().filename().string());
  EXPECT_EQ(left, (std::vector<std::string>{"checkpoint-6"}));
  EXPECT_NO_THROW(verify_checkpoint((out / "one" / "checkpoint-6").string()));
  remove_tree(out.string());
}

// ------------------------------------------------------------------ metrics

TEST(Metrics, EveryIntervalReportsTheContractValues) {
  for (const std::string opt : {"adamw8bit", "soap4bit", "shampoo"}) {
    auto out = temp_dir("metrics-" + opt);
    auto c = tiny_config(out, opt, "float32");
    c.log_interval = 2;
    c.eval_interval = 4;
    c.peak_tflops = 0.001;  // 1 GFLOP/s: makes MFU visible on a CPU
    const fs::path events = out / "events.jsonl";
    c.events_fd = open_events(events);
    TrainResult r;
    ASSERT_EQ(run_training(c, &r), kExitOk);
    ::close(c.events_fd);

    // The optimizer-state metric is Optimizer::state_bytes() of the same model, computed independently here.
    const ModelDims dims = resolve_model_size("tiny", 257);
    torch::manual_seed(0);
    Transformer model(dims, c.rope_theta);
    core::optim::OptimConfig oc;
    oc.precondition_frequency = c.precondition_frequency;
    const int64_t expected = core::optim::make_optimizer(opt, model->named_parameters(), oc)->state_bytes();
    EXPECT_GT(expected, 0);

    int train_events = 0, eval_events = 0;
    for (const auto& e : read_events(events)) {
      if (e["event"] != "metrics") continue;
      const auto& v = e["values"];
      if (v.contains("train/loss")) {
        ++train_events;
        for (const char* k : {"train/loss", "train/lr", "train/tokens_per_sec", "train/grad_norm", "train/mfu",
                              "train/peak_memory_bytes", "train/optimizer_state_bytes", "train/skipped_steps"})
          EXPECT_TRUE(v.contains(k)) << opt << ": " << k << " missing in " << e.dump();
        EXPECT_EQ(v["train/optimizer_state_bytes"].get<int64_t>(), expected) << opt;
        EXPECT_GT(v["train/tokens_per_sec"].get<double>(), 0);
        EXPECT_GT(v["train/peak_memory_bytes"].get<int64_t>(), 0);
        const double mfu = v["train/mfu"].get<double>();
        EXPECT_NEAR(mfu, r.flops_per_token * v["train/tokens_per_sec"].get<double>() / 1e9, 1e-9 + 1e-9 * mfu);
      } else if (v.contains("eval/loss")) {
        ++eval_events;
        EXPECT_NEAR(v["eval/perplexity"].get<double>(), std::exp(v["eval/loss"].get<double>()), 1e-9);
      }
    }
    EXPECT_EQ(train_events, 4) << "steps 2, 4, 6, 8";
    EXPECT_EQ(eval_events, 2) << "step 4 and the end";
    EXPECT_EQ(r.optimizer_state_bytes, expected);
    // Warmup: step 1's learning rate is lr / warmup, not zero; the schedule ends at min_lr_ratio * lr.
    EXPECT_DOUBLE_EQ(r.step_lrs.front(), c.learning_rate / double(c.warmup_steps));
    EXPECT_GT(r.step_lrs.front(), 0.0);
    EXPECT_DOUBLE_EQ(r.step_lrs.back(), c.learning_rate * c.min_lr_ratio);
    remove_tree(out.string());
  }
}

TEST(Metrics, MfuIsZeroWithoutAPeakOnCpu) {
  auto out = temp_dir("mfu0");
  auto c = tiny_config(out, "adamw", "float32");
  c.num_train_steps = 2;
  c.log_interval = 1;
  const fs::path events = out / "events.jsonl";
  c.events_fd = open_events(events);
  ASSERT_EQ(run_training(c, nullptr), kExitOk);
  ::close(c.events_fd);
  int seen = 0;
  for (const auto& e : read_events(events))
    if (e["event"] == "metrics" && e["values"].contains("train/mfu")) {
      EXPECT_EQ(e["values"]["train/mfu"].get<double>(), 0.0);
      ++seen;
    }
  EXPECT_EQ(seen, 2);
  remove_tree(out.string());
}

// ------------------------------------------------------------------ asynchronous checkpoint saves (F27)

namespace {

// Sets an environment variable for one scope (the test hooks of core/train.cpp's background writer).
struct ScopedEnv {
  std::string name;
  ScopedEnv(const std::string& n, const std::string& v) : name(n) { ::setenv(n.c_str(), v.c_str(), 1); }
  ~ScopedEnv() { ::unsetenv(name.c_str()); }
};

std::string file_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Names in dir that are not complete checkpoints: temporary directories of interrupted or abandoned saves.
std::vector<std::string> leftovers(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp") != std::string::npos) out.push_back(e.path().filename().string());
  return out;
}

}  // namespace

// A background save writes exactly the files a synchronous save writes at that step, even while training goes on
// during a slow write (the snapshot is a copy, not a view of the live state), and a resume from it is bitwise.
class AsyncCheckpoint : public ::testing::TestWithParam<std::string> {};

TEST_P(AsyncCheckpoint, SlowWriteHoldsTheStateOfItsStepAndResumesExactly) {
  const std::string optimizer = GetParam();
  auto out = temp_dir("async-" + optimizer);
  auto c = tiny_config(out / "sync", optimizer, "float32");
  c.save_interval = 4;  // checkpoints 4 and 8
  c.run_name = "r";
  c.async_checkpoint = false;
  TrainResult sync;
  ASSERT_EQ(run_training(c, &sync), kExitOk);
  EXPECT_EQ(sync.checkpoints_async, 0);

  auto ca = c;
  ca.output_dir = (out / "async").string();
  ca.async_checkpoint = true;
  TrainResult async;
  {
    // The save of step 4 takes >= 800 ms: steps 5-8 train meanwhile, then step 8 waits for it.
    ScopedEnv delay("ABLATE_TEST_CHECKPOINT_WRITE_DELAY_MS", "800");
    ScopedEnv steps("ABLATE_TEST_CHECKPOINT_WRITE_DELAY_STEPS", "4");
    ASSERT_EQ(run_training(ca, &async), kExitOk);
  }
  EXPECT_EQ(async.step_losses, sync.step_losses);
  EXPECT_EQ(async.checkpoints_async, 2);
  EXPECT_EQ(async.checkpoint_waits, 1) << "step 8 found the save of step 4 still writing";
  EXPECT_GT(async.checkpoint_wait_s, 0.1);
  ASSERT_EQ(async.checkpoint_events.size(), 2u);
  EXPECT_EQ(async.checkpoint_events[0].first, 4);
  EXPECT_EQ(async.checkpoint_events[0].second, 8) << "the event of step 4 went out once it was durable, at step 8";
  EXPECT_LT(async.checkpoint_blocked_s, 0.8 + async.checkpoint_wait_s) << "the main loop did not do the write";
  for (const char* step : {"checkpoint-4", "checkpoint-8"}) {
    const auto a = out / "async" / "r" / step, b = out / "sync" / "r" / step;
    ASSERT_NO_THROW(verify_checkpoint(a.string())) << a;
    for (const char* f : {"model.pt", "optimizer.pt", "rng.pt", "state.json", "manifest.json"})
      EXPECT_TRUE(file_bytes(a / f) == file_bytes(b / f)) << step << "/" << f << " differs from the synchronous save";
  }
  EXPECT_TRUE(leftovers(out / "async" / "r").empty());

  auto cr = ca;
  cr.run_name = "resumed";
  cr.resume_from = (out / "async" / "r" / "checkpoint-4").string();
  TrainResult resumed;
  ASSERT_EQ(run_training(cr, &resumed), kExitOk);
  ASSERT_EQ(resumed.step_losses.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(resumed.step_losses[i], sync.step_losses[4 + i]) << "step " << 5 + i;
  expect_same_archive(out / "sync" / "r" / "checkpoint-8" / "optimizer.pt",
                      out / "async" / "resumed" / "checkpoint-8" / "optimizer.pt");
  remove_tree(out.string());
}

INSTANTIATE_TEST_SUITE_P(AdamWAndQuantized, AsyncCheckpoint, ::testing::Values("adamw", "adamw8bit", "soap4bit"));

// A save slower than --checkpoint_deadline_s is abandoned before it commits: no checkpoint-<step>, no temporary
// directory, a checkpoint_abandoned event and no checkpoint event for it; training finishes and the next save works.
TEST(AsyncCheckpointDeadline, SlowSaveIsAbandonedAndTheNextSaveSucceeds) {
  auto out = temp_dir("async-deadline");
  auto c = tiny_config(out, "adamw", "float32");
  c.save_interval = 4;
  c.checkpoint_deadline_s = 0.3;
  const fs::path events = out / "events.jsonl";
  c.events_fd = open_events(events);
  TrainResult r;
  const auto t0 = std::chrono::steady_clock::now();
  {
    ScopedEnv delay("ABLATE_TEST_CHECKPOINT_WRITE_DELAY_MS", "20000");
    ScopedEnv steps("ABLATE_TEST_CHECKPOINT_WRITE_DELAY_STEPS", "4");
    ASSERT_EQ(run_training(c, &r), kExitOk);
  }
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ::close(c.events_fd);
  EXPECT_LT(took, 10.0) << "the slow save was waited for instead of abandoned";
  EXPECT_EQ(r.step_losses.size(), 8u);
  EXPECT_EQ(r.checkpoints_abandoned, 1);
  EXPECT_FALSE(fs::exists(out / "straight" / "checkpoint-4")) << "an abandoned save was committed";
  EXPECT_TRUE(leftovers(out / "straight").empty()) << "temporary directory left behind";
  EXPECT_NO_THROW(verify_checkpoint((out / "straight" / "checkpoint-8").string())) << "the next save failed";
  int abandoned = 0;
  std::vector<int64_t> committed;
  for (const auto& e : read_events(events)) {
    if (e["event"] == "checkpoint_abandoned") {
      ++abandoned;
      EXPECT_EQ(e["step"], 4);
      EXPECT_NE(e["reason"].get<std::string>().find("checkpoint_deadline_s"), std::string::npos) << e.dump();
    }
    if (e["event"] == "checkpoint") committed.push_back(e["step"].get<int64_t>());
  }
  EXPECT_EQ(abandoned, 1);
  EXPECT_EQ(committed, (std::vector<int64_t>{8}));
  remove_tree(out.string());
}

// A write error in the background (a full disk) fails the run from the main loop as a synchronous save would
// (exit 1, failure class crash, the reason in the message), the partial checkpoint removed.
TEST(AsyncCheckpointErrors, DiskFullInTheBackgroundFailsTheRun) {
  auto out = temp_dir("async-enospc");
  auto c = tiny_config(out, "adamw8bit", "float32");
  c.save_interval = 4;
  const fs::path events = out / "events.jsonl";
  c.events_fd = open_events(events);
  int rc;
  {
    ScopedEnv enospc("ABLATE_TEST_CHECKPOINT_ENOSPC_STEPS", "4");
    rc = run_training(c, nullptr);
  }
  ::close(c.events_fd);
  EXPECT_EQ(rc, kExitCrash);
  EXPECT_FALSE(fs::exists(out / "straight" / "checkpoint-4"));
  EXPECT_FALSE(fs::exists(out / "straight" / "checkpoint-8")) << "training went on past a failed save";
  EXPECT_TRUE(leftovers(out / "straight").empty());
  const auto ev = read_events(events);
  ASSERT_FALSE(ev.empty());
  EXPECT_EQ(ev.back()["event"], "finished");
  EXPECT_EQ(ev.back()["failure_class"], "crash");
  const std::string msg = ev.back()["message"].get<std::string>();
  EXPECT_NE(msg.find("checkpoint at step 4"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::strerror(ENOSPC)), std::string::npos) << msg;
  for (const auto& e : ev) EXPECT_NE(e["event"], "checkpoint") << e.dump();
  remove_tree(out.string());
}

// A snapshot over the host-memory budget is saved synchronously (said in the log), with the same result.
TEST(AsyncCheckpointErrors, OverTheHostBudgetSavesSynchronously) {
  auto out = temp_dir("async-budget");
  auto c = tiny_config(out, "adamw", "float32");
  c.save_interval = 4;
  c.async_checkpoint_host_budget_gb = 1e-9;
  TrainResult r;
  ASSERT_EQ(run_training(c, &r), kExitOk);
  EXPECT_EQ(r.checkpoints_async, 0);
  EXPECT_NO_THROW(verify_checkpoint((out / "straight" / "checkpoint-4").string()));
  EXPECT_NO_THROW(verify_checkpoint((out / "straight" / "checkpoint-8").string()));
  c.run_name = "roomy";
  c.async_checkpoint_host_budget_gb = 1;
  ASSERT_EQ(run_training(c, &r), kExitOk);
  EXPECT_EQ(r.checkpoints_async, 2);
  remove_tree(out.string());
}

// ------------------------------------------------------------------ FLOPs (docs/flops.md)

TEST(Flops, DenseTransformerMatchesTheFormula) {
  const ModelDims m = resolve_model_size("tiny", 257);  // d 64, L 2, H 4, KV 2, hd 16, I 192, V 320
  torch::manual_seed(0);
  Transformer model(m, 500000.0);
  ParamShapes shapes;
  for (const auto& p : model->named_parameters()) shapes.emplace_back(p.key(), p.value().sizes().vec());
  TrainConfig c;
  c.context_length = 64;
  const FlopsSpec s = flops_spec(m, c);
  const double n_matmul = matmul_params_per_token(shapes, s);
  const double per_layer = 64.0 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192;  // q, k, v, o, SwiGLU
  EXPECT_EQ(n_matmul, 2 * per_layer + 320.0 * 64);                             // + LM head, no embedding
  const auto f = training_flops_per_token(s, n_matmul);
  EXPECT_EQ(f.matmul, 6 * n_matmul);
  EXPECT_EQ(f.attention, 2 * 12.0 * 4 * 16 * 64 / 2);  // 12 L H hd T / 2
  EXPECT_EQ(f.ssd + f.delta_rule, 0.0);
  EXPECT_EQ(default_peak_tflops("NVIDIA H100 80GB HBM3"), 989.0);
  EXPECT_EQ(default_peak_tflops("NVIDIA H200"), 989.0);
  EXPECT_EQ(default_peak_tflops("cpu"), 0.0);
}

TEST(Flops, NsaKeysSsdAndDeltaRule) {
  FlopsSpec s;
  s.d = 128;
  s.n_layers = 3;
  s.n_heads = 2;
  s.head_dim = 64;
  s.pattern = "MDA";
  s.attn_type = "nsa";
  s.context_length = 4;
  s.nsa_cmp_block = 2;
  s.nsa_cmp_stride = 1;
  s.nsa_slc_block = 2;
  s.nsa_num_selected = 1;
  s.nsa_window = 2;
  // t=0: cmp 0, slc 1, win 1; t=1: 1, 2, 2; t=2: 2, 1 (own block only: 0*2 + 0 + 1), 2; t=3: 3, 2, 2.
  EXPECT_DOUBLE_EQ(nsa_mean_keys(s), (2 + 5 + 5 + 7) / 4.0);
  s.context_length = 512;
  s.mamba_d_state = 16;
  s.mamba_expand = 2;
  s.mamba_headdim = 64;
  s.mamba_chunk = 256;  // di 256, nh 4, c 256, 2 chunks
  EXPECT_DOUBLE_EQ(ssd_macs_per_token(s), 256.0 * 16 + 4 * 256 * 64 + 2 * 4 * 16 * 64 + 4 * 16 * 64 * 2 / 256.0);
  s.gdn_head_dim = 64;
  s.gdn_expand_v = 2;
  s.gdn_chunk = 64;  // H 2, K 64, V 128
  EXPECT_DOUBLE_EQ(delta_rule_macs_per_token(s),
                   2 * (2 * 64.0 * 64 + 64.0 * (64 + 128) / 2 + 3 * 64.0 * 128 + 64.0 * 128));
  const auto f = training_flops_per_token(s, 1000);
  EXPECT_EQ(s.count('M'), 1);
  EXPECT_DOUBLE_EQ(f.ssd, 6 * ssd_macs_per_token(s));
  EXPECT_DOUBLE_EQ(f.delta_rule, 6 * delta_rule_macs_per_token(s));
  EXPECT_DOUBLE_EQ(f.attention, 12.0 * 2 * 64 * nsa_mean_keys(s));
}
