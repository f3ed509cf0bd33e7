#include "core/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iomanip>
#include <regex>
#include <sstream>

namespace ablate {

std::string ModelDims::to_string() const {
  std::ostringstream o;
  o << name << " " << family;
  if (family == "hybrid") o << " " << pattern << "x" << repeats();
  if (pattern.find('A') != std::string::npos) o << " attn=" << attn_type;
  o << ": d=" << d << " L=" << n_layers << " H=" << n_heads << " KV=" << n_kv_heads << " hd=" << head_dim
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

int64_t attention_params(const ModelDims& m) {
  const int64_t d = m.d, hd = m.head_dim, H = m.n_heads, KV = m.n_kv_heads;
  int64_t p = d * (H * hd) + 2 * d * (KV * hd) + (H * hd) * d;  // q, k, v, o (no biases)
  if (m.attn_type == "nsa") {
    // core/mixers/nsa.h: position embeddings (l, hd) x2, compression MLPs fc1 (l*hd -> hd) and fc2 (hd -> hd)
    // with biases for keys and values, and the branch gates d -> 3H with bias.
    const int64_t l = m.nsa_cmp_block_size, hidden = hd;
    p += 2 * l * hd + 2 * ((l * hd * hidden + hidden) + (hidden * hd + hd)) + (d * 3 * H + 3 * H);
  }
  return p;
}

int64_t mamba2_mixer_params(const ModelDims& m) {
  // Seed 1.5 recipe (ngroups 1): d(2di + 2N + nh) + (di + 2N)(k + 1) + 3nh + di + di*d.
  const int64_t d = m.d, di = m.mamba_expand * d, N = m.mamba_d_state, k = m.mamba_d_conv;
  const int64_t nh = di / m.mamba_headdim;
  return d * (2 * di + 2 * N + nh) + (di + 2 * N) * (k + 1) + 3 * nh + di + di * d;
}

int64_t deltanet_mixer_params(const ModelDims& m) {
  // Seed 1.5 recipe: 2d*dk + 2d*dv + 2d*h + 2h + W(2dk + dv) + hv + dv*d.
  const int64_t d = m.d, h = d / m.gdn_head_dim, dk = h * m.gdn_head_dim;
  const int64_t hv = m.gdn_head_dim * m.gdn_expand_v, dv = h * hv;
  return 2 * d * dk + 2 * d * dv + 2 * d * h + 2 * h + m.gdn_conv_size * (2 * dk + dv) + hv + dv * d;
}

int64_t mixer_params(const ModelDims& m, char type) {
  switch (type) {
    case 'A': return attention_params(m);
    case 'M': return mamba2_mixer_params(m);
    case 'D': return deltanet_mixer_params(m);
  }
  throw ConfigError(std::string("unknown block type '") + type + "' (valid: M, D, A)");
}

int64_t block_params(const ModelDims& m, char type) { return mixer_params(m, type) + 3 * m.d * m.intermediate + 2 * m.d; }

int64_t count_params(const ModelDims& m) {
  int64_t total = 2 * m.padded_vocab * m.d + m.d;  // embedding, untied head, final norm
  for (int64_t i = 0; i < m.n_layers; ++i) total += block_params(m, m.layer_type(i));
  return total;
}

namespace {

// Canonical attention name: fsa (FSA's loop order for NSA's selected branch) computes the same function as nsa,
// so it is built as nsa.
std::string canonical_attn(const std::string& a) {
  if (a == "dense") return "dense";
  if (a == "nsa" || a == "native_sparse_attention" || a == "fsa" || a == "flash_sparse_attention") return "nsa";
  throw ConfigError("--attn_type: unknown value '" + a +
                    "' (valid: dense, nsa, native_sparse_attention, fsa, flash_sparse_attention)");
}

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

void check_pattern(const std::string& pattern) {
  if (pattern.empty()) throw ConfigError("--block_pattern: empty pattern (use letters M, D, A)");
  for (char c : pattern)
    if (c != 'A' && c != 'M' && c != 'D')
      throw ConfigError(std::string("--block_pattern '") + pattern + "': invalid letter '" + c +
                        "' (valid: M = Mamba2, D = Gated DeltaNet, A = attention)");
}

// Head layout for a searched width d (>= 256): head_dim 64, KV = min(8, H) so query heads never
// undercount KV heads (seed bug 14.2.9: d=256 gave H=4 < KV=8).
void set_width(ModelDims& m, int64_t d) {
  m.d = d;
  m.n_heads = std::max<int64_t>(1, d / 64);
  m.n_kv_heads = std::min<int64_t>(8, m.n_heads);
  m.head_dim = d / m.n_heads;
  // MLP width ceil64(8d/3) for every family (the seed's standalone Mamba2/GDN width and its search formula's;
  // the seed's built Transformer used 2d instead, which made it 5-15% smaller than its name).
  m.intermediate = ceil_to(d * 8 / 3, 64);
}

struct Fixed {
  const char* name;
  int64_t d, L, H, KV, I;
};
// tiny/mini/small: our small presets for tests and CPU runs. SMALL..XLARGE: the seed's legacy table (1.4).
const Fixed kFixed[] = {{"tiny", 64, 2, 4, 2, 0},           {"mini", 128, 4, 4, 2, 0},
                        {"small", 256, 6, 8, 4, 0},         {"SMALL", 1024, 28, 16, 8, 3072},
                        {"MEDIUM", 2560, 36, 32, 8, 9216},  {"LARGE", 4096, 36, 32, 8, 12288},
                        {"XLARGE", 5120, 64, 40, 8, 25600}};

const Fixed* find_fixed(const std::string& size) {
  for (const auto& f : kFixed)
    if (size == f.name) return &f;
  return nullptr;
}

// Layers per block-pattern repeat count for a target: the seed's size bands (1.3), except that the 0.5-5B band
// starts at 8 layers instead of 12: with 12 neither 2048x12 (+15%) nor 1024x46 (-16%) lands near 1B.
std::vector<int64_t> layer_candidates(int64_t target, int64_t pattern_len, bool hybrid) {
  int64_t lo = 4, hi = 32, step = 2;
  if (target >= 5'000'000'000LL) {
    lo = 24; hi = 129; step = 4;
  } else if (target >= 500'000'000LL) {
    lo = 8; hi = 48; step = 2;
  }
  std::vector<int64_t> out;
  if (!hybrid) {
    for (int64_t L = lo; L < hi; L += step) out.push_back(L);
    return out;
  }
  // Hybrids: whole repeats of the pattern whose depth falls in the band (at least one repeat).
  for (int64_t r = 1; r * pattern_len < hi; ++r)
    if (r * pattern_len >= lo) out.push_back(r * pattern_len);
  if (out.empty()) out.push_back(std::max<int64_t>(1, (lo + pattern_len - 1) / pattern_len) * pattern_len);
  return out;
}

void finish_vocab(ModelDims& m, int64_t vocab) {
  m.vocab_size = vocab;
  m.padded_vocab = ceil_to(vocab, 64);
}

// Sizes a model whose family fields (pattern, mixer settings) are already set. fixed_layers > 0 pins the depth.
void size_model(ModelDims& m, const std::string& size, int64_t fixed_layers) {
  const bool hybrid = m.family == "hybrid";
  const int64_t plen = static_cast<int64_t>(m.pattern.size());
  m.name = size;
  if (const Fixed* f = find_fixed(size)) {
    set_width(m, f->d);
    m.n_heads = f->H;
    m.n_kv_heads = f->KV;
    m.head_dim = f->d / f->H;
    if (f->I > 0) m.intermediate = f->I;  // the seed table's own MLP width
    // Seed rule for hybrids with automatic repeats: max(1, L // len(pattern)) repeats.
    m.n_layers = fixed_layers > 0 ? fixed_layers : hybrid ? std::max<int64_t>(1, f->L / plen) * plen : f->L;
    return;
  }
  const int64_t target = parse_size_string(size);
  // Seed search (1.3) with the count replaced by the exact count of the model built for this family: power-of-two
  // widths, layers from the size band, strict improvement so ties keep the earlier (narrower, shallower) candidate.
  const std::vector<int64_t> layers =
      fixed_layers > 0 ? std::vector<int64_t>{fixed_layers} : layer_candidates(target, plen, hybrid);
  ModelDims best;
  int64_t best_err = -1;
  for (int64_t d : {256, 512, 1024, 2048, 4096, 8192, 16384}) {
    ModelDims c = m;
    set_width(c, d);
    for (int64_t L : layers) {
      c.n_layers = L;
      const int64_t err = std::llabs(count_params(c) - target);
      if (best_err < 0 || err < best_err) {
        best = c;
        best_err = err;
      }
    }
  }
  m = best;
}

}  // namespace

ModelDims resolve_model_size(const std::string& size, int64_t vocab_size) {
  if (vocab_size <= 0) throw ConfigError("vocab_size must be positive");
  ModelDims m;
  finish_vocab(m, vocab_size);
  size_model(m, size, 0);
  return m;
}

ModelDims resolve_model(const TrainConfig& cfg, int64_t vocab_size) {
  if (vocab_size <= 0) throw ConfigError("vocab_size must be positive");
  cfg.validate_model();
  ModelDims m;
  finish_vocab(m, vocab_size);
  // Model type (seed 9.1, with our default mamba_type none): a block pattern gives the hybrid; otherwise
  // mamba_type picks pure Mamba2, pure Gated DeltaNet or the Transformer.
  if (!cfg.block_pattern.empty()) {
    m.family = "hybrid";
    m.pattern = upper(cfg.block_pattern);
    m.hybrid_init = true;
  } else if (cfg.mamba_type == "mamba2") {
    m.family = "mamba2";
    m.pattern = "M";
  } else if (cfg.mamba_type == "deltanet") {
    m.family = "deltanet";
    m.pattern = "D";
  } else {
    m.family = "transformer";
    m.pattern = "A";
  }
  m.attn_type = canonical_attn(cfg.attn_type);
  m.mamba_d_state = cfg.mamba_d_state;
  m.mamba_d_conv = cfg.mamba_d_conv;
  m.mamba_expand = cfg.mamba_expand;
  m.mamba_headdim = cfg.mamba_headdim;
  m.nsa_block_size = cfg.nsa_block_size;
  m.nsa_num_selected_blocks = cfg.nsa_num_selected_blocks;
  m.nsa_window_size = cfg.nsa_window_size;
  m.nsa_cmp_block_size = cfg.nsa_cmp_block_size;
  m.nsa_cmp_stride = cfg.nsa_cmp_stride;
  m.fused_kernels = cfg.kernel_type != "baseline";
  m.fused_loss = cfg.ce_kernel_type.empty() ? m.fused_kernels : cfg.ce_kernel_type != "baseline";
  const int64_t fixed_layers =
      m.family == "hybrid" && cfg.block_repeats > 0 ? cfg.block_repeats * static_cast<int64_t>(m.pattern.size()) : 0;
  size_model(m, cfg.model_size, fixed_layers);
  // Width-dependent constraints of the mixers that are present.
  if (m.pattern.find('M') != std::string::npos && (m.mamba_expand * m.d) % m.mamba_headdim != 0)
    throw ConfigError("--mamba_headdim " + std::to_string(m.mamba_headdim) + " must divide d_inner = " +
                      std::to_string(m.mamba_expand * m.d) + " (mamba_expand x d) for model size " + cfg.model_size);
  if (m.pattern.find('D') != std::string::npos && m.d % m.gdn_head_dim != 0)
    throw ConfigError("Gated DeltaNet needs d (" + std::to_string(m.d) + ") to be a multiple of its head dim " +
                      std::to_string(m.gdn_head_dim));
  if (m.pattern.find('A') != std::string::npos && m.head_dim % 2 != 0)
    throw ConfigError("attention head_dim " + std::to_string(m.head_dim) + " must be even for RoPE");
  return m;
}

std::string resolve_data_dir(const TrainConfig& cfg) {
  const std::string dir = cfg.data_dir.empty() ? kDefaultDataDir : cfg.data_dir;
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "meta.json", ec))
    throw ConfigError("dataset directory '" + dir + "' has no meta.json" +
                      (cfg.data_dir.empty() ? " (it is the default; pass --data_dir to use another)" : "") +
                      ". Prepare one with: ablate-train prepare-data --input /usr/share/games/fortunes --output " + dir +
                      " (any text files or directories work; --dataset_name/--dataset_subset are not downloaded)");
  return dir;
}

std::string describe_model(const ModelDims& m) {
  std::ostringstream o;
  auto fmt = [](int64_t n) {
    std::ostringstream s;
    s << n << " (" << std::fixed << std::setprecision(n >= 1'000'000'000 ? 3 : 2)
      << (n >= 1'000'000'000 ? double(n) / 1e9 : double(n) / 1e6) << (n >= 1'000'000'000 ? "B" : "M") << ")";
    return s.str();
  };
  o << "model: " << m.name << "\n";
  o << "family: " << m.family << "\n";
  o << "pattern: " << m.pattern << " x " << m.repeats() << " = " << m.n_layers << " layers\n";
  o << "d_model: " << m.d << "\nn_layers: " << m.n_layers << "\n";
  o << "n_heads: " << m.n_heads << "\nn_kv_heads: " << m.n_kv_heads << "\nhead_dim: " << m.head_dim << "\n";
  o << "intermediate: " << m.intermediate << "\n";
  o << "vocab: " << m.vocab_size << " (padded " << m.padded_vocab << ")\n";
  o << "init: " << (m.hybrid_init ? "hybrid (seed 6.4: o_proj/down_proj 0.02/sqrt(2n), head 0.02/sqrt(n))"
                                  : "N(0, 0.02) (seed 2.7)")
    << "\n";
  if (m.pattern.find('A') != std::string::npos) {
    o << "attention: " << m.attn_type;
    if (m.attn_type == "nsa")
      o << " (selection block " << m.nsa_block_size << ", selected blocks " << m.nsa_num_selected_blocks
        << ", window " << m.nsa_window_size << ", compression block " << m.nsa_cmp_block_size << " stride "
        << m.nsa_cmp_stride << ")";
    o << "\n";
  }
  if (m.pattern.find('M') != std::string::npos)
    o << "mamba2: d_state " << m.mamba_d_state << ", d_conv " << m.mamba_d_conv << ", expand " << m.mamba_expand
      << ", headdim " << m.mamba_headdim << ", heads " << m.mamba_expand * m.d / m.mamba_headdim << "\n";
  if (m.pattern.find('D') != std::string::npos)
    o << "deltanet: heads " << m.d / m.gdn_head_dim << ", head_dim " << m.gdn_head_dim << ", expand_v "
      << m.gdn_expand_v << ", conv " << m.gdn_conv_size << "\n";
  o << "params:\n";
  o << "  embedding: " << fmt(m.padded_vocab * m.d) << "\n  lm_head: " << fmt(m.padded_vocab * m.d) << "\n";
  for (char t : std::string("AMD")) {
    int64_t n = 0;
    for (int64_t i = 0; i < m.n_layers; ++i) n += m.layer_type(i) == t;
    if (n == 0) continue;
    const char* what = t == 'A' ? (m.attn_type == "nsa" ? "nsa attention" : "attention")
                       : t == 'M' ? "mamba2 mixer" : "deltanet mixer";
    o << "  " << what << " (" << t << "): " << n << " x " << mixer_params(m, t) << " = " << fmt(n * mixer_params(m, t))
      << "\n";
  }
  o << "  mlp: " << m.n_layers << " x " << 3 * m.d * m.intermediate << " = " << fmt(m.n_layers * 3 * m.d * m.intermediate)
    << "\n";
  o << "  norms: " << fmt(m.n_layers * 2 * m.d + m.d) << "\n";
  o << "  total: " << fmt(count_params(m)) << "\n";
  return o.str();
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

  validate_model();
  canonical_optimizer_name(optimizer_type);  // throws on unknown names
  if (!(beta1 >= 0 && beta1 < 1)) throw ConfigError("--beta1 must be in [0, 1)");
  if (!(beta2 >= 0 && beta2 < 1)) throw ConfigError("--beta2 must be in [0, 1)");
  if (!(adam_eps > 0)) throw ConfigError("--adam_eps must be > 0");
  positive("precondition_frequency", precondition_frequency);
  if (!(shampoo_beta >= 0 && shampoo_beta < 1)) throw ConfigError("--shampoo_beta must be in [0, 1)");
  positive("max_precond_dim", max_precond_dim);
  if (keep_checkpoints < 0) throw ConfigError("--keep_checkpoints must be >= 0 (0 keeps all)");
  if (!(checkpoint_deadline_s >= 0) || !std::isfinite(checkpoint_deadline_s))
    throw ConfigError("--checkpoint_deadline_s must be >= 0 seconds (0 = no deadline)");
  if (!(async_checkpoint_host_budget_gb >= 0) || !std::isfinite(async_checkpoint_host_budget_gb))
    throw ConfigError("--async_checkpoint_host_budget_gb must be >= 0 (0 = half of MemAvailable)");
  if (!std::isfinite(peak_tflops)) throw ConfigError("--peak_tflops must be finite");
  if (profile_steps < 0) throw ConfigError("--profile_steps must be >= 0 (0 = off), got " + std::to_string(profile_steps));
  if (profile_start < 0) throw ConfigError("--profile_start must be >= 0 (0 = after warm-up), got " + std::to_string(profile_start));
  positive("nproc", nproc);
  if (parallel != "ddp" && parallel != "zero")
    throw ConfigError("--parallel: unknown value '" + parallel + "' (valid: ddp, zero)");
  if (dist_backend != "auto" && dist_backend != "cpu" && dist_backend != "nccl")
    throw ConfigError("--dist_backend: unknown value '" + dist_backend + "' (valid: auto, cpu, nccl)");
  if (!(dist_timeout > 0) || !std::isfinite(dist_timeout)) throw ConfigError("--dist_timeout must be > 0 seconds");
  if (!(ddp_bucket_mb > 0) || !std::isfinite(ddp_bucket_mb)) throw ConfigError("--ddp_bucket_mb must be > 0");
}

void TrainConfig::validate_model() const {
  if (!block_pattern.empty()) check_pattern(upper(block_pattern));
  canonical_attn(attn_type);  // throws listing the valid names
  if (mamba_type != "none" && mamba_type != "mamba2" && mamba_type != "deltanet")
    throw ConfigError("--mamba_type: unknown value '" + mamba_type + "' (valid: none, mamba2, deltanet)");
  auto positive = [](const char* name, int64_t v) {
    if (v <= 0) throw ConfigError(std::string("--") + name + " must be a positive integer, got " + std::to_string(v));
  };
  if (block_repeats == 0 || block_repeats < -1)
    throw ConfigError("--block_repeats must be a positive integer or -1 (automatic), got " + std::to_string(block_repeats));
  positive("mamba_d_state", mamba_d_state);
  positive("mamba_d_conv", mamba_d_conv);
  positive("mamba_expand", mamba_expand);
  positive("mamba_headdim", mamba_headdim);
  positive("nsa_block_size", nsa_block_size);
  positive("nsa_num_selected_blocks", nsa_num_selected_blocks);
  positive("nsa_window_size", nsa_window_size);
  positive("nsa_cmp_block_size", nsa_cmp_block_size);
  positive("nsa_cmp_stride", nsa_cmp_stride);
  // NSA's own rules (core/mixers/nsa.h), checked here so a bad flag is a config error, not a crash.
  if (nsa_cmp_block_size % nsa_cmp_stride != 0)
    throw ConfigError("--nsa_cmp_block_size (" + std::to_string(nsa_cmp_block_size) +
                      ") must be a multiple of --nsa_cmp_stride (" + std::to_string(nsa_cmp_stride) + ")");
  if (nsa_block_size % nsa_cmp_stride != 0)
    throw ConfigError("--nsa_block_size (" + std::to_string(nsa_block_size) + ") must be a multiple of --nsa_cmp_stride (" +
                      std::to_string(nsa_cmp_stride) + ")");
  if (nsa_num_selected_blocks < 3)
    throw ConfigError("--nsa_num_selected_blocks must be >= 3 (the initial block and two local blocks are always "
                      "selected), got " + std::to_string(nsa_num_selected_blocks));
  if (kernel_type != "liger" && kernel_type != "triton" && kernel_type != "baseline")
    throw ConfigError("--kernel_type: unknown value '" + kernel_type + "' (valid: baseline, triton, liger)");
  if (!ce_kernel_type.empty() && ce_kernel_type != "baseline" && ce_kernel_type != "liger")
    throw ConfigError("--ce_kernel_type: unknown value '" + ce_kernel_type + "' (valid: baseline, liger)");
  if (!find_fixed(model_size)) {
    try {
      parse_size_string(model_size);
    } catch (const ConfigError&) {
      throw ConfigError("--model_size: unknown value '" + model_size +
                        "' (valid: tiny, mini, small, the seed table SMALL, MEDIUM, LARGE, XLARGE, or a size like "
                        "100M, 0.6B, 1B, 8B)");
    }
  }
}

std::string TrainConfig::default_run_name() const {
  // Seed names (9.1) without its "x-1" for automatic repeats; sparse attention shows in hybrid names too.
  std::string attn = attn_type == "native_sparse_attention" ? "nsa" : attn_type == "flash_sparse_attention" ? "fsa" : attn_type;
  std::string arch;
  if (!block_pattern.empty()) {
    arch = "hybrid_" + upper(block_pattern) + (block_repeats > 0 ? "x" + std::to_string(block_repeats) : "");
    if (attn != "dense" && upper(block_pattern).find('A') != std::string::npos) arch += "_" + attn;
  } else if (mamba_type == "mamba2" || mamba_type == "deltanet") {
    arch = mamba_type;
  } else {
    arch = attn;
  }
  return model_size + "_" + arch + "_" + optimizer_type + "_ctx" + std::to_string(context_length);
}

}  // namespace ablate
