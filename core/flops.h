// Model FLOPs per trained token, for train/mfu (docs/flops.md states the formula). No LibTorch here.
//
//   flops/token = 6 * N_matmul                                   every weight matrix applied per token, fwd + bwd
//               + sum over A layers of 12 * H * hd * keys        attention scores and values, fwd + bwd
//               + sum over M layers of 6 * SSD MACs/token        Mamba2 chunked scan (see flops.cpp)
//               + sum over D layers of 6 * delta-rule MACs/token Gated DeltaNet chunked WY form (see flops.cpp)
// keys is the mean number of keys a query attends to: T/2 for dense causal attention, the exact mean of
// compressed + selected + window keys for NSA. "Model FLOPs" (PaLM appendix B): recomputation is not counted.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"

namespace ablate {

// The structure the FLOP count needs. Filled from ModelDims + TrainConfig by the training loop.
struct FlopsSpec {
  int64_t d = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  std::string pattern = "A";        // layer i is pattern[i % size]: A attention, M Mamba2, D Gated DeltaNet
  std::string attn_type = "dense";  // dense | nsa
  int64_t context_length = 0;       // T
  // NSA (core/mixers/nsa.h defaults = the paper's).
  int64_t nsa_cmp_block = 32, nsa_cmp_stride = 16, nsa_slc_block = 64, nsa_num_selected = 16, nsa_window = 512;
  // Mamba2 (core/mixers/mamba2.h defaults).
  int64_t mamba_d_state = 128, mamba_expand = 2, mamba_headdim = 64, mamba_ngroups = 1, mamba_chunk = 256;
  // Gated DeltaNet (core/mixers/gated_deltanet.h defaults).
  int64_t gdn_head_dim = 64, gdn_expand_v = 2, gdn_chunk = 64;

  int64_t count(char type) const;  // layers of this type
};

FlopsSpec flops_spec(const ModelDims& dims, const TrainConfig& cfg);

// Parameters applied once per token as a matmul: every >= 2-D parameter except the embedding table (a lookup)
// and NSA's compression position embeddings (added, not multiplied). Depthwise conv weights (C, 1, W) are
// included: they cost C*W MACs per token, exactly numel like a Linear. NSA's compression MLP (cmp_*_fc*) runs
// once per compressed block per KV head, so it counts n_kv_heads / cmp_stride of its numel.
using ParamShapes = std::vector<std::pair<std::string, std::vector<int64_t>>>;
double matmul_params_per_token(const ParamShapes& params, const FlopsSpec& spec);

// Mean keys per query of NSA at context T: compressed blocks complete by t + selected-block keys <= t +
// min(window, t + 1), averaged over t = 0 .. T-1.
double nsa_mean_keys(const FlopsSpec& spec);

// Forward multiply-accumulates per token of one layer's sequence mixing (not its projections).
double ssd_macs_per_token(const FlopsSpec& spec);
double delta_rule_macs_per_token(const FlopsSpec& spec);

struct FlopsBreakdown {
  double matmul = 0, attention = 0, ssd = 0, delta_rule = 0;
  double total() const { return matmul + attention + ssd + delta_rule; }
};
FlopsBreakdown training_flops_per_token(const FlopsSpec& spec, double matmul_params);

// Dense bf16 peak of the device in TFLOP/s from its name: 989 for H100/H200, else 0 (unknown: MFU off).
double default_peak_tflops(const std::string& device_name);

}  // namespace ablate
