// The training loop on CUDA (label gpu): every optimizer trains in bf16 and fp16 autocast with fp32 master weights,
// checkpoints and resumes onto the device. GPU kernels (cuBLAS split-K, SDPA backward) need not be bitwise
// deterministic, so the resumed losses are compared with a tolerance here; the bitwise acceptance runs on CPU
// (train_resume_test.cpp).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/data.h"
#include "core/fsutil.h"
#include "core/train.h"
#include "tests/require_cuda.h"

namespace fs = std::filesystem;
using namespace ablate;

TEST(TrainGpu, EveryOptimizerResumesOnCuda) {
  ABLATE_REQUIRE_CUDA();
  const auto root = fs::temp_directory_path() / ("ablate-train-gpu-" + std::to_string(::getpid()));
  remove_tree(root.string());
  fs::create_directories(root);
  {
    std::ofstream f(root / "corpus.txt");
    for (int i = 0; i < 2000; ++i) f << "document " << i << " says " << (i * 7919) % 1000 << " things\n%\n";
  }
  prepare_data({(root / "corpus.txt").string()}, (root / "data").string(), 0.1);
  for (const std::string opt : {"adamw", "adamw8bit", "adamw4bit", "soap", "soap8bit", "soap4bit", "shampoo"}) {
    for (const std::string dtype : {"bfloat16", "float16"}) {
      TrainConfig c;
      c.model_size = "mini";
      c.device = "cuda";
      c.data_dir = (root / "data").string();
      c.output_dir = (root / "out").string();
      c.run_name = opt + "-" + dtype;
      c.optimizer_type = opt;
      c.dtype = dtype;
      c.context_length = 64;
      c.batch_size = 8;
      c.num_train_steps = 8;
      c.warmup_steps = 2;
      c.precondition_frequency = 2;
      c.save_interval = 4;
      c.eval_interval = 1000;
      c.eval_batches = 1;
      c.log_interval = 4;
      TrainResult straight;
      ASSERT_EQ(run_training(c, &straight), kExitOk) << opt << " " << dtype;
      auto c2 = c;
      c2.run_name += "-resumed";
      c2.resume_from = (root / "out" / c.run_name / "checkpoint-4").string();
      TrainResult resumed;
      ASSERT_EQ(run_training(c2, &resumed), kExitOk) << opt << " " << dtype;
      ASSERT_EQ(resumed.step_losses.size(), 4u);
      for (size_t i = 0; i < 4; ++i) {
        EXPECT_TRUE(std::isfinite(resumed.step_losses[i]));
        EXPECT_NEAR(resumed.step_losses[i], straight.step_losses[4 + i], 2e-2) << opt << " " << dtype << " step " << 5 + i;
      }
    }
  }
  remove_tree(root.string());
}
