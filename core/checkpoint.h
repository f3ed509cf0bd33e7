// Checkpoint directories on disk: durable writes, the sha256 manifest, verification and retention.
// No LibTorch here (core/train.cpp serializes the tensors).
//
// Layout of <run_dir>/checkpoint-<step>/: model.pt, optimizer.pt, rng.pt, state.json and manifest.json; a sharded
// run (--parallel zero, docs/distributed.md) has optimizer-<r>-of-<N>.pt (rank r's parameters) instead of
// optimizer.pt, and state.json's optimizer_shards says which parameters each optimizer file holds.
// A checkpoint is assembled in <run_dir>/checkpoint-<step>.tmp-<pid>/: every file is written and fsynced, then
// manifest.json (size + sha256 of each file, and a digest of the manifest itself) is written last through a
// temporary file + fsync + rename, the directory is fsynced, renamed to its final name and the run dir fsynced.
// So a checkpoint under its final name always has a manifest, and a manifest is only there once every file is.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ablate {

// Files every checkpoint holds besides manifest.json, in the order they are written.
const std::vector<std::string>& checkpoint_files();
constexpr const char* kCheckpointFormat = "ablate-checkpoint-v2";

// Writes bytes to path (created or truncated) and fsyncs it. Throws std::runtime_error naming the path.
void write_file_durable(const std::string& path, const std::string& bytes);
// fsync of a directory, so renames and new entries inside it survive a power loss.
void fsync_dir(const std::string& dir);

// Writes dir/manifest.json for `files` (all inside dir) via manifest.json.tmp + fsync + rename + fsync(dir).
void write_manifest(const std::string& dir, int64_t step, const std::vector<std::string>& files);

// One manifest row: size and sha256 of dir/file, measured now (reads the file back).
struct ManifestEntry {
  std::string file;
  int64_t bytes = 0;
  std::string sha256;
};
ManifestEntry manifest_entry(const std::string& dir, const std::string& file);
// The same, from rows measured earlier (an asynchronous save hashes its files before it commits, so that the
// commit itself is short: core/train.cpp).
void write_manifest(const std::string& dir, int64_t step, const std::vector<ManifestEntry>& entries);

// Checks dir/manifest.json (format, its own digest) and every file it lists (present, size, sha256) before
// anything is loaded. Throws ConfigError naming the bad file.
void verify_checkpoint(const std::string& dir);

// Renames a finished temporary checkpoint directory to final_dir (replacing an older one of the same step)
// and fsyncs the parent. Returns the absolute path.
std::string publish_checkpoint(const std::string& tmp_dir, const std::string& final_dir);

// Keeps the `keep` newest complete checkpoints (checkpoint-<n> with a manifest) of run_dir and removes older
// ones; `keep` <= 0 keeps all. `just_written` is never removed, so the newest valid checkpoint always stays.
// Also removes checkpoint-*.tmp-<pid> leftovers of processes that no longer run. Returns the removed paths.
std::vector<std::string> prune_checkpoints(const std::string& run_dir, int64_t keep, const std::string& just_written);

}  // namespace ablate
