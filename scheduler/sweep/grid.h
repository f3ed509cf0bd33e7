// Sweep file (docs/contracts.md §1) → validated spec → grid cells. Pure functions: no I/O, no store, no proto.
#pragma once
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace ablate::scheduler::sweep {

// Ordered (name, value) pairs: grid order matters for expansion and for `factor_names`.
using KeyValues = std::vector<std::pair<std::string, std::string>>;

struct GridAxis {
  std::string name;                 // grid name, e.g. "attention"
  std::vector<std::string> values;  // as written (trimmed scalars)
};

struct SweepSpec {
  std::string name;
  std::vector<GridAxis> grid;                          // file order
  std::vector<std::map<std::string, std::string>> exclude;
  KeyValues train;                                     // file order
  // resources: (optional) placement needs of every cell. gpus: all on one worker, leased together; > 1 runs one
  // ablate-train rank per GPU (the cells get param nproc = gpus; train.parallel picks ddp or zero).
  int32_t gpus = 1;
  int32_t ranks = 1;  // resources.ranks: processes on as many distinct workers, gang-scheduled
  int64_t memory_bytes = 0;                            // per GPU; 0 = estimate from the config
};

struct Cell {
  int cell_index = 0;                         // position after excludes, 0-based
  KeyValues factors;                          // grid name → value, grid order
  std::map<std::string, std::string> params;  // ablate-train flag → value (train settings + mapped factors)
  std::string config_hash;                    // sha256 of sorted "key=value\n" lines of params
  int64_t total_steps = 0;                    // train.num_train_steps, 0 when not set
  int64_t mem_estimate_bytes = 0;             // per GPU (resources.memory_gb, else EstimateMemoryBytes)
  int32_t gpus = 1;
  int32_t ranks = 1;  // resources.ranks: processes on as many distinct workers, gang-scheduled
};

// Extra `train:` keys accepted verbatim (ablate-scheduler --extra_train_keys; e.g. a custom trainer's flags).
// Set once at start-up, before serving.
std::set<std::string>& ExtraTrainKeys();

// Parameter count of a model size (presets, the legacy table, or "100M"/"0.6B"); 0 when unknown.
int64_t ModelParams(const std::string& model_size);
// Rough per-GPU training memory of a cell from its params: weights, gradients and optimizer state by optimizer
// type (split over `gpus` when params say parallel: zero), plus activations (batch × context × layers × width × 34
// bytes, ÷ layers with gradient_checkpointing), plus 512 MiB of runtime overhead. See docs/control-plane.md.
int64_t EstimateMemoryBytes(const std::map<std::string, std::string>& params, int32_t gpus);

struct Expansion {
  SweepSpec spec;
  std::vector<Cell> cells;
  std::vector<std::string> factor_names;  // axes with >1 value, grid order (all axes when none vary)
  std::string spec_hash;                  // sha256 of the normalized spec: default idempotency key
};

inline constexpr int kDefaultMaxCells = 10000;

// Grid axis name → ablate-train flag. Unknown axes are rejected.
const std::vector<std::pair<std::string, std::string>>& GridAxisFlags();

absl::StatusOr<SweepSpec> ParseSweepYaml(std::string_view yaml);
absl::StatusOr<Expansion> Expand(const SweepSpec& spec, int max_cells = kDefaultMaxCells);
// Parse + Expand: what SubmitSweep runs. Errors are kInvalidArgument and name the field.
absl::StatusOr<Expansion> ParseAndExpand(std::string_view yaml, int max_cells = kDefaultMaxCells);

// sha256 of params as sorted "key=value\n" lines (std::map iterates sorted).
std::string ConfigHash(const std::map<std::string, std::string>& params);

}  // namespace ablate::scheduler::sweep
