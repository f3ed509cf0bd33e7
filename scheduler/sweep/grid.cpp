#include "scheduler/sweep/grid.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <regex>
#include <set>

#include "absl/status/status.h"
#include "scheduler/util/sha256.h"

namespace ablate::scheduler::sweep {
namespace {

absl::Status Invalid(const std::string& msg) { return absl::InvalidArgumentError(msg); }

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

std::string Join(const std::vector<std::string>& v, std::string_view sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? std::string(sep) : "") + v[i];
  return out;
}

const std::vector<std::string> kTopLevelKeys = {"name", "grid", "exclude", "train", "resources"};
const std::vector<std::string> kModelPresets = {"tiny", "mini", "small"};
// Canonical names first; the aliases come from docs/contracts.md §1 and are passed through as written.
const std::vector<std::string> kAttention = {"dense", "nsa", "native_sparse_attention", "fsa",
                                             "flash_sparse_attention"};
const std::vector<std::string> kOptimizers = {"adamw", "adamw8bit", "adamw4bit", "soap",
                                              "soap8bit", "soap4bit", "shampoo"};

enum class TrainType { kPositiveInt, kNonNegativeInt, kPositiveFloat, kNonNegativeFloat, kBool, kString };
const std::vector<std::pair<std::string, TrainType>>& TrainKeys() {
  static const std::vector<std::pair<std::string, TrainType>> keys = {
      {"num_train_steps", TrainType::kPositiveInt},
      {"warmup_steps", TrainType::kNonNegativeInt},
      {"batch_size", TrainType::kPositiveInt},
      {"gradient_accumulation_steps", TrainType::kPositiveInt},
      {"learning_rate", TrainType::kPositiveFloat},
      {"min_lr_ratio", TrainType::kNonNegativeFloat},
      {"weight_decay", TrainType::kNonNegativeFloat},
      {"max_grad_norm", TrainType::kNonNegativeFloat},
      {"dtype", TrainType::kString},
      {"log_interval", TrainType::kPositiveInt},
      {"eval_interval", TrainType::kNonNegativeInt},  // 0: no eval
      {"eval_batches", TrainType::kPositiveInt},
      {"save_interval", TrainType::kNonNegativeInt},  // 0: no checkpoints
      {"seed", TrainType::kNonNegativeInt},
      {"dataset", TrainType::kString},
      {"rope_theta", TrainType::kPositiveFloat},
      {"gradient_checkpointing", TrainType::kBool},
      {"device", TrainType::kString},
      {"async_checkpoint", TrainType::kBool},               // checkpoints written in the background (default true)
      {"checkpoint_deadline_s", TrainType::kNonNegativeFloat},  // a background save slower than this is abandoned
      {"parallel", TrainType::kString},  // ddp | zero: how the ranks of a multi-GPU cell or a gang split the work
  };
  return keys;
}

bool ParseInt(const std::string& s, int64_t* out) {
  if (s.empty()) return false;
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end != s.c_str() + s.size()) return false;
  *out = v;
  return true;
}

bool ParseFloat(const std::string& s, double* out) {
  if (s.empty()) return false;
  errno = 0;
  char* end = nullptr;
  double v = std::strtod(s.c_str(), &end);
  if (errno != 0 || end != s.c_str() + s.size() || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

std::string MarkOf(const YAML::Node& n) {
  const YAML::Mark m = n.Mark();
  if (m.is_null()) return "";
  return " (line " + std::to_string(m.line + 1) + ", column " + std::to_string(m.column + 1) + ")";
}

absl::Status CheckModelSize(const std::string& field, const std::string& v) {
  if (std::find(kModelPresets.begin(), kModelPresets.end(), Lower(v)) != kModelPresets.end()) return absl::OkStatus();
  static const std::regex size_re(R"(^[0-9]+(\.[0-9]+)?[KMB]?$)", std::regex::icase);
  if (std::regex_match(v, size_re)) {
    double x = std::strtod(v.c_str(), nullptr);
    if (x > 0) return absl::OkStatus();
  }
  return Invalid(field + ": unknown model size '" + v +
                 "' (expected a preset tiny|mini|small or a size like 100M, 0.6B)");
}

absl::Status CheckAxisValue(const std::string& axis, const std::string& field, const std::string& v) {
  if (axis == "model_size") return CheckModelSize(field, v);
  if (axis == "block_pattern") {
    if (v.empty()) return Invalid(field + ": empty block pattern (expected letters M, D, A)");
    for (size_t i = 0; i < v.size(); ++i) {
      char c = v[i];
      if (c != 'M' && c != 'D' && c != 'A') {
        return Invalid(field + ": invalid letter '" + std::string(1, c) + "' at position " + std::to_string(i) +
                       " in block pattern '" + v + "' (expected M (Mamba2), D (Gated DeltaNet), A (attention))");
      }
    }
    return absl::OkStatus();
  }
  if (axis == "attention") {
    if (std::find(kAttention.begin(), kAttention.end(), v) == kAttention.end()) {
      return Invalid(field + ": unknown attention '" + v + "' (expected one of " + Join(kAttention, ", ") + ")");
    }
    return absl::OkStatus();
  }
  if (axis == "optimizer") {
    if (std::find(kOptimizers.begin(), kOptimizers.end(), v) == kOptimizers.end()) {
      return Invalid(field + ": unknown optimizer '" + v + "' (expected one of " + Join(kOptimizers, ", ") + ")");
    }
    return absl::OkStatus();
  }
  if (axis == "context_length") {
    int64_t n = 0;
    if (!ParseInt(v, &n) || n <= 0) return Invalid(field + ": must be a positive integer, got " + v);
    return absl::OkStatus();
  }
  return Invalid(field + ": unknown grid axis");  // unreachable: axes are checked first
}

absl::Status CheckTrainValue(const std::string& field, TrainType t, const std::string& v) {
  int64_t i = 0;
  double d = 0;
  switch (t) {
    case TrainType::kPositiveInt:
      if (!ParseInt(v, &i) || i <= 0) return Invalid(field + ": must be a positive integer, got '" + v + "'");
      break;
    case TrainType::kNonNegativeInt:
      if (!ParseInt(v, &i) || i < 0) return Invalid(field + ": must be a non-negative integer, got '" + v + "'");
      break;
    case TrainType::kPositiveFloat:
      if (!ParseFloat(v, &d) || d <= 0) return Invalid(field + ": must be a positive number, got '" + v + "'");
      break;
    case TrainType::kNonNegativeFloat:
      if (!ParseFloat(v, &d) || d < 0) return Invalid(field + ": must be a non-negative number, got '" + v + "'");
      break;
    case TrainType::kBool:
      if (v != "true" && v != "false") return Invalid(field + ": must be true or false, got '" + v + "'");
      break;
    case TrainType::kString:
      if (v.empty()) return Invalid(field + ": must not be empty");
      if (field == "train.parallel" && v != "ddp" && v != "zero")
        return Invalid(field + ": must be ddp (replicated optimizer) or zero (sharded optimizer state), got '" + v + "'");
      break;
  }
  return absl::OkStatus();
}

// A scalar's text; anything else is an error naming the field.
absl::StatusOr<std::string> Scalar(const YAML::Node& n, const std::string& field) {
  if (!n.IsScalar()) {
    if (n.IsNull()) return Invalid(field + ": missing value" + MarkOf(n));
    return Invalid(field + ": must be a single value, not a " + (n.IsSequence() ? "list" : "map") + MarkOf(n));
  }
  return Trim(n.Scalar());
}

}  // namespace

const std::vector<std::pair<std::string, std::string>>& GridAxisFlags() {
  static const std::vector<std::pair<std::string, std::string>> axes = {
      {"model_size", "model_size"},   {"block_pattern", "block_pattern"},     {"attention", "attn_type"},
      {"optimizer", "optimizer_type"}, {"context_length", "context_length"},
  };
  return axes;
}

std::string ConfigHash(const std::map<std::string, std::string>& params) {
  std::string canon;
  for (const auto& [k, v] : params) canon += k + "=" + v + "\n";
  return Sha256Hex(canon);
}

absl::StatusOr<SweepSpec> ParseSweepYaml(std::string_view yaml) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception& e) {
    return Invalid("malformed YAML at line " + std::to_string(e.mark.line + 1) + ", column " +
                   std::to_string(e.mark.column + 1) + ": " + e.msg);
  }
  if (!root.IsDefined() || root.IsNull()) return Invalid("sweep file is empty (expected keys name, grid)");
  if (!root.IsMap()) return Invalid("sweep file: top level must be a map with keys name, grid, exclude, train");

  SweepSpec spec;
  try {
    for (const auto& kv : root) {
      std::string key = kv.first.as<std::string>();
      if (std::find(kTopLevelKeys.begin(), kTopLevelKeys.end(), key) == kTopLevelKeys.end()) {
        return Invalid(key + ": unknown top-level key" + MarkOf(kv.first) + " (expected " + Join(kTopLevelKeys, ", ") +
                       ")");
      }
    }

    // name
    const YAML::Node name = root["name"];
    if (!name) return Invalid("name: required");
    auto name_s = Scalar(name, "name");
    if (!name_s.ok()) return name_s.status();
    static const std::regex name_re(R"(^[A-Za-z0-9._-]{1,64}$)");
    if (!std::regex_match(*name_s, name_re)) {
      return Invalid("name: '" + *name_s + "' must match [A-Za-z0-9._-]{1,64}");
    }
    spec.name = *name_s;

    // grid
    const YAML::Node grid = root["grid"];
    if (!grid || grid.IsNull()) return Invalid("grid: required");
    if (!grid.IsMap()) return Invalid("grid: must be a map of axis name to list of values" + MarkOf(grid));
    if (grid.size() == 0) return Invalid("grid: empty");
    std::vector<std::string> axis_names;
    for (const auto& a : GridAxisFlags()) axis_names.push_back(a.first);
    for (const auto& kv : grid) {
      std::string axis = kv.first.as<std::string>();
      std::string field = "grid." + axis;
      if (std::find(axis_names.begin(), axis_names.end(), axis) == axis_names.end()) {
        return Invalid(field + ": unknown grid axis" + MarkOf(kv.first) + " (expected one of " +
                       Join(axis_names, ", ") + ")");
      }
      for (const auto& seen : spec.grid) {
        if (seen.name == axis) return Invalid(field + ": axis given twice");
      }
      if (!kv.second.IsSequence()) {
        return Invalid(field + ": must be a list of values, e.g. [" + (axis == "model_size" ? "tiny" : "...") + "]" +
                       MarkOf(kv.second));
      }
      if (kv.second.size() == 0) return Invalid(field + ": empty list (every grid axis needs at least one value)");
      GridAxis ax{axis, {}};
      std::set<std::string> seen;
      for (size_t i = 0; i < kv.second.size(); ++i) {
        std::string f = field + "[" + std::to_string(i) + "]";
        auto v = Scalar(kv.second[i], f);
        if (!v.ok()) return v.status();
        if (auto st = CheckAxisValue(axis, f, *v); !st.ok()) return st;
        if (!seen.insert(*v).second) return Invalid(f + ": duplicate value '" + *v + "'");
        ax.values.push_back(*v);
      }
      spec.grid.push_back(std::move(ax));
    }

    // resources
    if (const YAML::Node rs = root["resources"]; rs && !rs.IsNull()) {
      if (!rs.IsMap()) return Invalid("resources: must be a map with gpus, memory_gb, ranks" + MarkOf(rs));
      for (const auto& kv : rs) {
        std::string key = kv.first.as<std::string>();
        std::string f = "resources." + key;
        auto v = Scalar(kv.second, f);
        if (!v.ok()) return v.status();
        if (key == "gpus") {
          int64_t n = 0;
          if (!ParseInt(*v, &n) || n < 1 || n > 64) return Invalid(f + ": must be an integer 1..64, got '" + *v + "'");
          spec.gpus = static_cast<int32_t>(n);
        } else if (key == "ranks") {
          int64_t n = 0;
          if (!ParseInt(*v, &n) || n < 1 || n > 64) return Invalid(f + ": must be an integer 1..64, got '" + *v + "'");
          spec.ranks = static_cast<int32_t>(n);
        } else if (key == "memory_gb") {
          char* end = nullptr;
          double gb = std::strtod(v->c_str(), &end);
          if (v->empty() || *end || !std::isfinite(gb) || gb <= 0 || gb > 4096) {
            return Invalid(f + ": must be a number of GiB in (0, 4096], got '" + *v + "'");
          }
          spec.memory_bytes = static_cast<int64_t>(gb * 1024 * 1024 * 1024);
        } else {
          return Invalid(f + ": unknown resource" + MarkOf(kv.first) + " (expected gpus, memory_gb, ranks)");
        }
      }
    }

    // exclude
    if (const YAML::Node ex = root["exclude"]; ex && !ex.IsNull()) {
      if (!ex.IsSequence()) return Invalid("exclude: must be a list of maps" + MarkOf(ex));
      for (size_t i = 0; i < ex.size(); ++i) {
        std::string f = "exclude[" + std::to_string(i) + "]";
        if (!ex[i].IsMap() || ex[i].size() == 0) {
          return Invalid(f + ": must be a non-empty map of grid axis to value" + MarkOf(ex[i]));
        }
        std::map<std::string, std::string> entry;
        for (const auto& kv : ex[i]) {
          std::string axis = kv.first.as<std::string>();
          std::string ff = f + "." + axis;
          auto it = std::find_if(spec.grid.begin(), spec.grid.end(), [&](const GridAxis& g) { return g.name == axis; });
          if (it == spec.grid.end()) return Invalid(ff + ": not a grid axis of this sweep");
          auto v = Scalar(kv.second, ff);
          if (!v.ok()) return v.status();
          // A value absent from the grid is almost always a typo that would silently exclude nothing.
          if (std::find(it->values.begin(), it->values.end(), *v) == it->values.end()) {
            return Invalid(ff + ": value '" + *v + "' is not in grid." + axis);
          }
          entry[axis] = *v;
        }
        spec.exclude.push_back(std::move(entry));
      }
    }

    // train
    if (const YAML::Node tr = root["train"]; tr && !tr.IsNull()) {
      if (!tr.IsMap()) return Invalid("train: must be a map of ablate-train setting to value" + MarkOf(tr));
      std::vector<std::string> known;
      for (const auto& k : TrainKeys()) known.push_back(k.first);
      for (const auto& kv : tr) {
        std::string key = kv.first.as<std::string>();
        std::string f = "train." + key;
        auto it = std::find_if(TrainKeys().begin(), TrainKeys().end(), [&](const auto& k) { return k.first == key; });
        if (it == TrainKeys().end() && ExtraTrainKeys().count(key)) {
          // Operator-allowed pass-through flag (a custom trainer's): a short, shell-safe string.
          auto v = Scalar(kv.second, f);
          if (!v.ok()) return v.status();
          static const std::regex safe(R"(^[A-Za-z0-9@,._:/+-]{0,256}$)");
          if (!std::regex_match(*v, safe)) return Invalid(f + ": must match [A-Za-z0-9@,._:/+-]{0,256}");
          spec.train.emplace_back(key, *v);
          continue;
        }
        if (it == TrainKeys().end()) {
          bool is_axis = std::any_of(GridAxisFlags().begin(), GridAxisFlags().end(),
                                     [&](const auto& a) { return a.first == key || a.second == key; });
          return Invalid(f + ": unknown ablate-train setting" + MarkOf(kv.first) +
                         (is_axis ? " (it is a grid axis: put it under grid)" : " (expected one of " + Join(known, ", ") + ")"));
        }
        auto v = Scalar(kv.second, f);
        if (!v.ok()) return v.status();
        if (auto st = CheckTrainValue(f, it->second, *v); !st.ok()) return st;
        for (const auto& [k, _] : spec.train) {
          if (k == key) return Invalid(f + ": given twice");
        }
        spec.train.emplace_back(key, *v);
      }
    }
  } catch (const YAML::Exception& e) {
    return Invalid("malformed sweep file at line " + std::to_string(e.mark.line + 1) + ", column " +
                   std::to_string(e.mark.column + 1) + ": " + e.msg);
  }
  return spec;
}

absl::StatusOr<Expansion> Expand(const SweepSpec& spec, int max_cells) {
  if (spec.grid.empty()) return Invalid("grid: empty");
  int64_t total = 1;
  for (const auto& ax : spec.grid) {
    if (ax.values.empty()) return Invalid("grid." + ax.name + ": empty list");
    total *= static_cast<int64_t>(ax.values.size());
    if (total > max_cells) {
      return Invalid("grid: the cross product has more than " + std::to_string(max_cells) +
                     " cells (the limit); split the sweep");
    }
  }
  std::map<std::string, std::string> flag_of(GridAxisFlags().begin(), GridAxisFlags().end());

  Expansion out;
  out.spec = spec;
  std::map<std::string, std::string> train(spec.train.begin(), spec.train.end());
  int64_t total_steps = 0;
  if (auto it = train.find("num_train_steps"); it != train.end()) ParseInt(it->second, &total_steps);

  // Odometer over the axes; the last axis varies fastest, so cells follow grid order.
  std::vector<size_t> idx(spec.grid.size(), 0);
  for (int64_t n = 0; n < total; ++n) {
    KeyValues factors;
    for (size_t a = 0; a < spec.grid.size(); ++a) factors.emplace_back(spec.grid[a].name, spec.grid[a].values[idx[a]]);
    bool excluded = std::any_of(spec.exclude.begin(), spec.exclude.end(), [&](const auto& ex) {
      return std::all_of(ex.begin(), ex.end(), [&](const auto& kv) {
        for (const auto& f : factors) {
          if (f.first == kv.first) return f.second == kv.second;
        }
        return false;
      });
    });
    if (!excluded) {
      Cell c;
      c.cell_index = static_cast<int>(out.cells.size());
      c.params = train;
      for (const auto& [k, v] : factors) c.params[flag_of.at(k)] = v;
      c.factors = std::move(factors);
      c.config_hash = ConfigHash(c.params);
      c.total_steps = total_steps;
      c.gpus = spec.gpus;
      c.ranks = spec.ranks;
      // Several GPUs on one worker: ablate-train runs one rank per GPU (--nproc, data-parallel over NCCL). The flag
      // is a param, so it is part of the config hash: the global batch is gpus x batch_size, another result. In a
      // gang (ranks > 1) each member is one node of gpus ranks, ranks x gpus in all (worker.cpp: ABLATE_NODE_RANK).
      if (spec.gpus > 1) c.params["nproc"] = std::to_string(spec.gpus);
      // A gang's global batch is ranks x batch_size: another result than one process, so another identity.
      if (spec.ranks > 1) c.config_hash = Sha256Hex(c.config_hash + "\nranks=" + std::to_string(spec.ranks));
      c.mem_estimate_bytes = spec.memory_bytes > 0 ? spec.memory_bytes : EstimateMemoryBytes(c.params, spec.gpus);
      out.cells.push_back(std::move(c));
    }
    for (size_t a = spec.grid.size(); a-- > 0;) {
      if (++idx[a] < spec.grid[a].values.size()) break;
      idx[a] = 0;
    }
  }
  if (out.cells.empty()) return Invalid("exclude: removes every cell of the grid");

  for (const auto& ax : spec.grid) {
    if (ax.values.size() > 1) out.factor_names.push_back(ax.name);
  }
  if (out.factor_names.empty()) {
    for (const auto& ax : spec.grid) out.factor_names.push_back(ax.name);
  }

  // Normalized spec: independent of YAML formatting, comments and key order of train.
  std::string canon = "name=" + spec.name + "\n";
  for (const auto& ax : spec.grid) canon += "grid." + ax.name + "=" + Join(ax.values, ",") + "\n";
  for (const auto& ex : spec.exclude) {
    canon += "exclude=";
    for (const auto& [k, v] : ex) canon += k + ":" + v + ";";
    canon += "\n";
  }
  for (const auto& [k, v] : train) canon += "train." + k + "=" + v + "\n";
  if (spec.gpus != 1 || spec.memory_bytes != 0) {
    canon += "resources=" + std::to_string(spec.gpus) + "," + std::to_string(spec.memory_bytes) + "\n";
  }
  if (spec.ranks != 1) canon += "ranks=" + std::to_string(spec.ranks) + "\n";
  out.spec_hash = Sha256Hex(canon);
  return out;
}

absl::StatusOr<Expansion> ParseAndExpand(std::string_view yaml, int max_cells) {
  auto spec = ParseSweepYaml(yaml);
  if (!spec.ok()) return spec.status();
  return Expand(*spec, max_cells);
}

std::set<std::string>& ExtraTrainKeys() {
  static std::set<std::string> keys;
  return keys;
}

int64_t ModelParams(const std::string& size) {
  static const std::map<std::string, int64_t> kPresets = {
      {"tiny", 140000},          {"mini", 1000000},         {"small", 5500000},
      {"SMALL", 150000000},      {"MEDIUM", 350000000},     {"LARGE", 760000000}, {"XLARGE", 1300000000}};
  if (auto it = kPresets.find(size); it != kPresets.end()) return it->second;
  if (size.size() < 2) return 0;
  char unit = static_cast<char>(std::toupper(static_cast<unsigned char>(size.back())));
  double mult = unit == 'K' ? 1e3 : unit == 'M' ? 1e6 : unit == 'B' ? 1e9 : unit == 'T' ? 1e12 : 0;
  if (mult == 0) return 0;
  char* end = nullptr;
  std::string num = size.substr(0, size.size() - 1);
  double v = std::strtod(num.c_str(), &end);
  if (num.empty() || *end || !std::isfinite(v) || v <= 0) return 0;
  return static_cast<int64_t>(v * mult);
}

int64_t EstimateMemoryBytes(const std::map<std::string, std::string>& params, int32_t gpus) {
  auto get = [&](const char* k, const std::string& dflt) {
    auto it = params.find(k);
    return it == params.end() ? dflt : it->second;
  };
  int64_t n = ModelParams(get("model_size", ""));
  if (n <= 0) return 0;
  std::string opt = get("optimizer_type", "adamw");
  // fp32 weights + fp32 grads on every GPU; optimizer state bytes per parameter, split over the GPUs only when
  // the ranks shard it (parallel: zero; ddp replicates it).
  const double state = opt == "adamw" ? 8 : opt == "adamw8bit" ? 2 : opt == "adamw4bit" ? 1
                       : opt == "soap" || opt == "shampoo" ? 16 : opt == "soap8bit" ? 8 : opt == "soap4bit" ? 6 : 8;
  const double per_param = 8 + state / (get("parallel", "ddp") == "zero" ? std::max(1, gpus) : 1);
  // Width and depth from the count: params ≈ 12·L·d², with L ≈ d/64.
  double d = std::cbrt(static_cast<double>(n) * 64.0 / 12.0);
  double layers = std::max(1.0, d / 64.0);
  auto num = [&](const char* k, double dflt) {
    std::string v = get(k, "");
    char* end = nullptr;
    double x = std::strtod(v.c_str(), &end);
    return (v.empty() || *end || !std::isfinite(x) || x <= 0) ? dflt : x;
  };
  double batch = num("batch_size", 8), ctx = num("context_length", 1024);
  double act = batch * ctx * layers * d * 34.0;
  std::string ckpt = get("gradient_checkpointing", "false");
  if (ckpt == "true" || ckpt == "1") act /= layers;
  double total = per_param * static_cast<double>(n) + act + 512.0 * 1024 * 1024;
  return static_cast<int64_t>(total);
}

}  // namespace ablate::scheduler::sweep
