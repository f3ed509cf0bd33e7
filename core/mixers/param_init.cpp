#include "core/mixers/param_init.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace ablate::core {
namespace {
thread_local bool g_deferred = false;
constexpr int64_t kChunk = int64_t(1) << 20;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

DeferLinearInit::DeferLinearInit() : previous_(g_deferred) { g_deferred = true; }
DeferLinearInit::~DeferLinearInit() { g_deferred = previous_; }

uint64_t mix_seed(uint64_t a, uint64_t b) { return splitmix64(splitmix64(a) ^ (b * 0xD1B54A32D192ED03ull)); }

torch::nn::Linear make_linear(int64_t in, int64_t out, bool bias) {
  if (!g_deferred) return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
  // A 1x1 Linear (its default init costs nothing), then the real shapes, left unfilled.
  torch::nn::Linear lin(torch::nn::LinearOptions(1, 1).bias(bias));
  torch::NoGradGuard ng;
  lin->weight.set_data(torch::empty({out, in}));
  if (bias) lin->bias.set_data(torch::empty({out}));
  lin->options.in_features(in).out_features(out);
  return lin;
}

torch::nn::Embedding make_embedding(int64_t num, int64_t dim) {
  if (!g_deferred) return torch::nn::Embedding(num, dim);
  torch::nn::Embedding emb(torch::nn::EmbeddingOptions(1, dim));
  torch::NoGradGuard ng;
  emb->weight.set_data(torch::empty({num, dim}));
  emb->options.num_embeddings(num);
  return emb;
}

void normal_parallel_(torch::Tensor w, double mean, double std, uint64_t seed) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.is_floating_point(),
              "normal_parallel_: expected a contiguous floating-point CPU tensor, got ", w.options());
  torch::NoGradGuard ng;
  auto flat = w.view({-1});
  const int64_t n = flat.numel(), chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(mix_seed(seed, uint64_t(c)));
      flat.slice(0, c * kChunk, std::min(n, (c + 1) * kChunk)).normal_(mean, std, gen);
    }
  });
}

}  // namespace ablate::core
