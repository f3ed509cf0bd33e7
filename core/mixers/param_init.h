// Parameter initialisation that scales to billions of parameters.
// LibTorch's CPU random fills (the Linear constructor's kaiming_uniform_, normal_) are serial: building a 4B model
// took over a minute before its first step. Two remedies:
// - While a DeferLinearInit guard lives on this thread, make_linear / make_embedding allocate their weights
//   without filling them; whoever holds the guard must initialise every such weight (LanguageModel does, in
//   init_weights). Without a guard (a mixer built on its own) they keep LibTorch's default init.
// - normal_parallel_ fills a tensor from per-chunk generators seeded from (seed, chunk): the same values for a
//   seed whatever the thread count, filled in parallel.
#pragma once
#include <torch/torch.h>

#include <cstdint>

namespace ablate::core {

class DeferLinearInit {
 public:
  DeferLinearInit();
  ~DeferLinearInit();
  DeferLinearInit(const DeferLinearInit&) = delete;
  DeferLinearInit& operator=(const DeferLinearInit&) = delete;

 private:
  bool previous_;
};

// A Linear (in -> out); its weight (and bias) are uninitialised under a DeferLinearInit guard.
torch::nn::Linear make_linear(int64_t in, int64_t out, bool bias = false);
// An Embedding (num x dim); its weight is uninitialised under a DeferLinearInit guard.
torch::nn::Embedding make_embedding(int64_t num, int64_t dim);

// w (contiguous, floating point, CPU) <- N(mean, std^2), chunk c of 2^20 elements from a generator seeded with
// mix(seed, c).
void normal_parallel_(torch::Tensor w, double mean, double std, uint64_t seed);

// A well-mixed 64-bit value of (a, b) (splitmix64 of a combination), for per-tensor and per-chunk seeds.
uint64_t mix_seed(uint64_t a, uint64_t b);

}  // namespace ablate::core
