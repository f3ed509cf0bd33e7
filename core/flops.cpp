#include "core/flops.h"

#include <algorithm>
#include <cmath>

namespace ablate {

int64_t FlopsSpec::count(char type) const {
  if (pattern.empty()) return 0;
  int64_t n = 0;
  for (int64_t i = 0; i < n_layers; ++i)
    if (pattern[static_cast<size_t>(i) % pattern.size()] == type) ++n;
  return n;
}

FlopsSpec flops_spec(const ModelDims& dims, const TrainConfig& cfg) {
  FlopsSpec s;
  s.d = dims.d;
  s.n_layers = dims.n_layers;
  s.n_heads = dims.n_heads;
  s.n_kv_heads = dims.n_kv_heads;
  s.head_dim = dims.head_dim;
  s.context_length = cfg.context_length;
  s.pattern = dims.pattern.empty() ? "A" : dims.pattern;
  s.attn_type = dims.attn_type == "dense" ? "dense" : "nsa";  // fsa computes the same function as nsa
  // A --block_pattern given while ModelDims still says "A" (a caller that resolved a plain Transformer size).
  if (s.pattern == "A" && !cfg.block_pattern.empty()) s.pattern = cfg.block_pattern;
  s.nsa_cmp_block = dims.nsa_cmp_block_size;
  s.nsa_cmp_stride = dims.nsa_cmp_stride;
  s.nsa_slc_block = dims.nsa_block_size;
  s.nsa_num_selected = dims.nsa_num_selected_blocks;
  s.nsa_window = dims.nsa_window_size;
  s.mamba_d_state = dims.mamba_d_state;
  s.mamba_expand = dims.mamba_expand;
  s.mamba_headdim = dims.mamba_headdim;
  s.gdn_head_dim = dims.gdn_head_dim;
  s.gdn_expand_v = dims.gdn_expand_v;
  // Chunk sizes and Mamba2 ngroups are not model settings (ModelDims has none): the mixers' defaults apply.
  return s;
}

double matmul_params_per_token(const ParamShapes& params, const FlopsSpec& spec) {
  double n = 0;
  for (const auto& [name, shape] : params) {
    if (shape.size() < 2) continue;  // norms, biases, per-head scalars: elementwise
    if (name.find("embed") != std::string::npos) continue;            // a lookup, no matmul
    if (name.find("_pe") != std::string::npos && name.find("cmp_") != std::string::npos) continue;  // added
    double numel = 1;
    for (int64_t s : shape) numel *= double(s);
    if (name.find("cmp_k_fc") != std::string::npos || name.find("cmp_v_fc") != std::string::npos)
      numel *= double(spec.n_kv_heads) / double(std::max<int64_t>(1, spec.nsa_cmp_stride));
    n += numel;
  }
  return n;
}

double nsa_mean_keys(const FlopsSpec& s) {
  const int64_t T = s.context_length, l = s.nsa_cmp_block, st = s.nsa_cmp_stride, ls = s.nsa_slc_block,
                n = s.nsa_num_selected, w = s.nsa_window;
  if (T <= 0) return 0;
  double sum = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t cmp = t >= l - 1 ? (t - l + 1) / st + 1 : 0;  // compressed blocks that end at or before t
    const int64_t blocks = t / ls + 1;                          // selection blocks with a key <= t
    // All visible blocks when there are at most n, else n of them: the query's own (partial) block + n-1 full.
    const int64_t slc = blocks <= n ? t + 1 : (n - 1) * ls + (t % ls) + 1;
    const int64_t win = std::min(w, t + 1);
    sum += double(cmp + slc + win);
  }
  return sum / double(T);
}

double ssd_macs_per_token(const FlopsSpec& s) {
  // Chunked SSD (core/mixers/ssd.cpp), chunk c = min(chunk, T) (padding is not model work), per token:
  //   C B^T inside the chunk (one per group)        G * c * N
  //   (L o CB) x                                    nh * c * P
  //   chunk states  B^T (decay * x)                 nh * N * P
  //   outputs from the entering states  C S         nh * N * P
  //   state passing between chunks                  nh * N * P * ceil(T/c) / c   (all-pairs over chunks)
  const double di = double(s.mamba_expand * s.d), P = double(s.mamba_headdim), N = double(s.mamba_d_state);
  const double nh = di / P, G = double(s.mamba_ngroups);
  const double c = double(std::max<int64_t>(1, std::min(s.mamba_chunk, s.context_length)));
  const double nc = std::ceil(double(s.context_length) / c);
  return G * c * N + nh * c * P + 2 * nh * N * P + nh * N * P * nc / c;
}

double delta_rule_macs_per_token(const FlopsSpec& s) {
  // Chunked gated delta rule (core/mixers/delta_rule.cpp, WY/UT form), chunk c = min(chunk, T), per head and token:
  //   A = (beta k) k^T                   c * K
  //   (I + A)^{-1} [K | V] (tri. solve)  c * (K + V) / 2
  //   q k^T                              c * K
  //   W S, (decayed q) S, k^T U          3 * K * V
  //   (q k^T o M) U                      c * V
  const double K = double(s.gdn_head_dim), V = double(s.gdn_head_dim * s.gdn_expand_v);
  const double H = double(s.d / std::max<int64_t>(1, s.gdn_head_dim));
  const double c = double(std::max<int64_t>(1, std::min(s.gdn_chunk, s.context_length)));
  return H * (2 * c * K + c * (K + V) / 2 + 3 * K * V + c * V);
}

FlopsBreakdown training_flops_per_token(const FlopsSpec& s, double matmul_params) {
  FlopsBreakdown f;
  f.matmul = 6.0 * matmul_params;  // 2 per MAC forward, twice that backward (activations + weights)
  const double keys = s.attn_type == "nsa" ? nsa_mean_keys(s) : double(s.context_length) / 2.0;  // causal: T/2
  // QK^T and PV: 2 * H * hd * keys MACs forward = 4 * H * hd * keys FLOPs, x3 for fwd + bwd.
  f.attention = double(s.count('A')) * 12.0 * double(s.n_heads * s.head_dim) * keys;
  f.ssd = double(s.count('M')) * 6.0 * ssd_macs_per_token(s);
  f.delta_rule = double(s.count('D')) * 6.0 * delta_rule_macs_per_token(s);
  return f;
}

double default_peak_tflops(const std::string& name) {
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) return 989.0;
  return 0.0;
}

}  // namespace ablate
