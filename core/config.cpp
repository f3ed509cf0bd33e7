#include "core/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <regex>
#include <sstream>

namespace ablate {

std::string ModelDims::to_string() const {
  std::ostringstream o;
  o << name << ": d=" << d << " L=" << n_layers << " H=" << n_heads << " KV=" << n_kv_heads << " hd=" << head_dim
    << " I=" << intermediate << " V=" << vocab_size << " (padded " << padded_vocab << ")";
  return o.str();
}

int64_t parse_size_string(const std::string& raw) {
  std::string s = raw;
  s.erase(0, s.find_first_not_of(" \t"));
  s.erase(s.find_last_not_of(" \t") + 1);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  static const std::regex re(R"(^([0-9]*\.?[0-9]+)\s*([BMK]?)$)");
  std::smatch m;
  if (!std::regex_match(s, m, re))
    throw ConfigError("unknown model size '" + raw + "' (expected a preset tiny|mini|small or a size like 100M, 0.6B)");
  const double v = std::strtod(m[1].str().c_str(), nullptr);
  const std::string suf = m[2].str();
  const double mult = suf == "B" ? 1e9 : suf == "M" ? 1e6 : suf == "K" ? 1e3 : 1.0;
  const double n = v * mult;
  if (!(n >= 1.0) || n > 1e13) throw ConfigError("model size '" + raw + "' is out of range");
  return static_cast<int64_t>(n);
}

int64_t count_params(const ModelDims& m) {
  const int64_t d = m.d, hd = m.head_dim;
  const int64_t attn = d * (m.n_heads * hd) + 2 * d * (m.n_kv_heads * hd) + (m.n_heads * hd) * d;
  const int64_t mlp = 3 * d * m.intermediate;
  const int64_t per_layer = attn + mlp + 2 * d;
  return 2 * m.padded_vocab * d + m.n_layers * per_layer + d;
}

namespace {

ModelDims make_dims(std::string name, int64_t d, int64_t L, int64_t H, int64_t KV, int64_t vocab) {
  ModelDims m;
  m.name = std::move(name);
  m.d = d;
  m.n_layers = L;
  m.n_heads = H;
  m.n_kv_heads = KV;
  m.head_dim = d / H;
  m.intermediate = ceil_to(d * 8 / 3, 64);
  m.vocab_size = vocab;
  m.padded_vocab = ceil_to(vocab, 64);
  return m;
}

}  // namespace

ModelDims resolve_model_size(const std::string& size, int64_t vocab_size) {
  if (vocab_size <= 0) throw ConfigError("vocab_size must be positive");
  if (size == "tiny") return make_dims(size, 64, 2, 4, 2, vocab_size);
  if (size == "mini") return make_dims(size, 128, 4, 4, 2, vocab_size);
  if (size == "small") return make_dims(size, 256, 6, 8, 4, vocab_size);
  const int64_t target = parse_size_string(size);
  // Seed search (1.3): power-of-two widths, a layer range by target size, strict improvement keeps the earlier
  // candidate on ties. Fixed: head_dim 64, KV = min(8, H) so query heads never undercount KV heads, and the
  // count compared is that of the model actually built (same I = ceil64(8d/3) as the presets).
  int64_t l_lo = 4, l_hi = 32, l_step = 2;
  if (target >= 5'000'000'000LL) {
    l_lo = 24; l_hi = 129; l_step = 4;
  } else if (target >= 500'000'000LL) {
    l_lo = 12; l_hi = 48; l_step = 2;
  }
  ModelDims best;
  int64_t best_err = -1;
  for (int64_t d : {256, 512, 1024, 2048, 4096, 8192, 16384}) {
    const int64_t H = d / 64;
    for (int64_t L = l_lo; L < l_hi; L += l_step) {
      ModelDims c = make_dims(size, d, L, H, std::min<int64_t>(8, H), vocab_size);
      const int64_t err = std::llabs(count_params(c) - target);
      if (best_err < 0 || err < best_err) {
        best = c;
        best_err = err;
      }
    }
  }
  return best;
}

double lr_at_step(int64_t step, double base_lr, int64_t warmup, int64_t total_steps, double min_lr_ratio) {
  if (warmup > 0 && step <= warmup) return base_lr * double(step) / double(warmup);
  const double span = double(std::max<int64_t>(1, total_steps - warmup));
  const double p = std::clamp(double(step - warmup) / span, 0.0, 1.0);
  const double r = min_lr_ratio;
  return base_lr * (r + 0.5 * (1.0 - r) * (1.0 + std::cos(M_PI * p)));
}

std::string canonical_optimizer_name(const std::string& name) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::vector<std::pair<std::string, std::string>> aliases = {
      {"adamw_8bit", "adamw8bit"}, {"adamw_4bit", "adamw4bit"}, {"soap_8bit", "soap8bit"}, {"soap_4bit", "soap4bit"}};
  for (const auto& [a, c] : aliases)
    if (n == a) return c;
  static const std::vector<std::string> valid = {"adamw", "adamw8bit", "adamw4bit", "soap",
                                                 "soap8bit", "soap4bit", "shampoo"};
  if (std::find(valid.begin(), valid.end(), n) != valid.end()) return n;
  throw ConfigError("--optimizer_type: unknown value '" + name +
                    "' (valid: adamw, adamw8bit, adamw4bit, soap, soap8bit, soap4bit, shampoo; aliases adamw_8bit, "
                    "adamw_4bit, soap_8bit, soap_4bit)");
}

void TrainConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    if (v <= 0) throw ConfigError(std::string("--") + name + " must be a positive integer, got " + std::to_string(v));
  };
  positive("context_length", context_length);
  positive("batch_size", batch_size);
  positive("gradient_accumulation_steps", gradient_accumulation_steps);
  positive("num_train_steps", num_train_steps);
  positive("log_interval", log_interval);
  positive("eval_interval", eval_interval);
  positive("eval_batches", eval_batches);
  positive("save_interval", save_interval);
  if (warmup_steps < 0) throw ConfigError("--warmup_steps must be >= 0");
  if (!(learning_rate > 0) || !std::isfinite(learning_rate)) throw ConfigError("--learning_rate must be > 0");
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1)) throw ConfigError("--min_lr_ratio must be in [0, 1]");
  if (!(weight_decay >= 0)) throw ConfigError("--weight_decay must be >= 0");
  if (!(rope_theta > 0)) throw ConfigError("--rope_theta must be > 0");
  if (dtype != "float32" && dtype != "bfloat16" && dtype != "float16")
    throw ConfigError("--dtype: unknown value '" + dtype + "' (valid: float32, bfloat16, float16)");
  if (device != "auto" && device != "cpu" && device != "cuda")
    throw ConfigError("--device: unknown value '" + device + "' (valid: auto, cpu, cuda)");

  for (char c : block_pattern)
    if (c != 'A' && c != 'M' && c != 'D')
      throw ConfigError(std::string("--block_pattern: invalid letter '") + c +
                        "' (valid: M = Mamba2, D = Gated DeltaNet, A = attention)");
  if (block_pattern.find_first_of("MD") != std::string::npos)
    throw NotImplementedError("--block_pattern '" + block_pattern +
                              "': not implemented yet: Mamba2 (M)/DeltaNet (D) blocks; only attention (A) blocks run");

  if (attn_type != "dense") {
    static const std::vector<std::string> sparse = {"nsa", "native_sparse_attention", "fsa", "flash_sparse_attention"};
    if (std::find(sparse.begin(), sparse.end(), attn_type) != sparse.end())
      throw NotImplementedError("--attn_type '" + attn_type + "': not implemented yet: sparse attention (NSA/FSA)");
    throw ConfigError("--attn_type: unknown value '" + attn_type +
                      "' (valid: dense, nsa, native_sparse_attention, fsa, flash_sparse_attention)");
  }
  canonical_optimizer_name(optimizer_type);  // throws on unknown names
  if (!(beta1 >= 0 && beta1 < 1)) throw ConfigError("--beta1 must be in [0, 1)");
  if (!(beta2 >= 0 && beta2 < 1)) throw ConfigError("--beta2 must be in [0, 1)");
  if (!(adam_eps > 0)) throw ConfigError("--adam_eps must be > 0");
  positive("precondition_frequency", precondition_frequency);
  if (!(shampoo_beta >= 0 && shampoo_beta < 1)) throw ConfigError("--shampoo_beta must be in [0, 1)");
  positive("max_precond_dim", max_precond_dim);
  if (keep_checkpoints < 0) throw ConfigError("--keep_checkpoints must be >= 0 (0 keeps all)");
  if (!std::isfinite(peak_tflops)) throw ConfigError("--peak_tflops must be finite");
  if (model_size != "tiny" && model_size != "mini" && model_size != "small") parse_size_string(model_size);
}

std::string TrainConfig::default_run_name() const {
  const std::string arch = block_pattern.empty() ? "dense" : "hybrid_" + block_pattern;
  return model_size + "_" + arch + "_" + optimizer_type + "_ctx" + std::to_string(context_length);
}

}  // namespace ablate
