#include "core/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <nlohmann/json.hpp>
#include <regex>
#include <stdexcept>

#include "core/config.h"
#include "core/fsutil.h"
#include "core/sha256.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace ablate {
namespace {

[[noreturn]] void sys_fail(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

// The manifest's own digest covers its canonical (sorted-key, compact) dump without the digest field, so a
// flipped byte in manifest.json is reported as such rather than as a mismatch of some other file.
std::string manifest_digest(json m) {
  m.erase("manifest_sha256");
  return sha256_hex(m.dump());
}

int64_t file_size_or(const fs::path& p, int64_t dflt) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return dflt;
  return static_cast<int64_t>(st.st_size);
}

}  // namespace

const std::vector<std::string>& checkpoint_files() {
  static const std::vector<std::string> files = {"model.pt", "optimizer.pt", "rng.pt", "state.json"};
  return files;
}

void write_file_durable(const std::string& path, const std::string& bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) sys_fail("cannot create", path);
  size_t off = 0;
  while (off < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = errno;
      ::close(fd);
      errno = e;
      sys_fail("cannot write", path);
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int e = errno;
    ::close(fd);
    errno = e;
    sys_fail("cannot fsync", path);
  }
  if (::close(fd) != 0) sys_fail("cannot close", path);
}

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) sys_fail("cannot open directory", dir);
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  errno = e;
  if (rc != 0) sys_fail("cannot fsync directory", dir);
}

ManifestEntry manifest_entry(const std::string& dir, const std::string& file) {
  const fs::path p = fs::path(dir) / file;
  const int64_t size = file_size_or(p, -1);
  if (size < 0) throw std::runtime_error("checkpoint file " + p.string() + " was not written");
  return {file, size, sha256_file(p.string())};
}

void write_manifest(const std::string& dir, int64_t step, const std::vector<std::string>& files) {
  std::vector<ManifestEntry> entries;
  for (const auto& f : files) entries.push_back(manifest_entry(dir, f));
  write_manifest(dir, step, entries);
}

void write_manifest(const std::string& dir, int64_t step, const std::vector<ManifestEntry>& entries) {
  json table = json::object();
  for (const auto& e : entries) table[e.file] = {{"bytes", e.bytes}, {"sha256", e.sha256}};
  json m = {{"format", kCheckpointFormat}, {"step", step}, {"files", table}};
  m["manifest_sha256"] = manifest_digest(m);
  const std::string tmp = (fs::path(dir) / "manifest.json.tmp").string();
  const std::string final_path = (fs::path(dir) / "manifest.json").string();
  write_file_durable(tmp, m.dump(2) + "\n");
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) sys_fail("cannot rename to", final_path);
  fsync_dir(dir);
}

void verify_checkpoint(const std::string& dir_str) {
  const fs::path dir(dir_str);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw ConfigError("--resume_from " + dir_str + ": not a directory");
  const fs::path mpath = dir / "manifest.json";
  if (!fs::exists(mpath, ec))
    throw ConfigError("checkpoint " + dir_str + ": missing manifest.json (incomplete or not an ablate checkpoint)");
  json m;
  std::string raw;
  try {
    std::ifstream f(mpath, std::ios::binary);
    raw.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    m = json::parse(raw);
  } catch (const std::exception& e) {
    throw ConfigError("checkpoint file " + mpath.string() + " is corrupted: unreadable JSON (" + e.what() + ")");
  }
  // Written canonically (sorted keys, 2-space indent, final newline), so any changed byte shows, even whitespace.
  if (raw != m.dump(2) + "\n")
    throw ConfigError("checkpoint file " + mpath.string() + " is corrupted: not the manifest as written");
  if (!m.is_object() || !m.contains("files") || !m["files"].is_object())
    throw ConfigError("checkpoint file " + mpath.string() + " is corrupted: no 'files' table");
  if (m.value("format", std::string()) != kCheckpointFormat)
    throw ConfigError("checkpoint " + dir_str + ": format '" + m.value("format", std::string("?")) +
                      "' is not " + kCheckpointFormat +
                      " (made by an older ablate-train without optimizer/RNG/loss-scale state; it cannot resume "
                      "exactly)");
  if (!m.contains("manifest_sha256") || !m["manifest_sha256"].is_string() ||
      m["manifest_sha256"].get<std::string>() != manifest_digest(m))
    throw ConfigError("checkpoint file " + mpath.string() + " is corrupted: its digest does not match its content");
  // A sharded run (--parallel zero) writes optimizer-<r>-of-<N>.pt, one per rank, instead of optimizer.pt.
  bool sharded = false;
  for (const auto& [name, info] : m["files"].items()) sharded = sharded || name.rfind("optimizer-", 0) == 0;
  for (const auto& f : checkpoint_files())
    if (!m["files"].contains(f) && !(sharded && f == "optimizer.pt"))
      throw ConfigError("checkpoint file " + (dir / f).string() + " is not listed in " + mpath.string());
  for (const auto& [name, info] : m["files"].items()) {
    const fs::path p = dir / name;
    const int64_t size = file_size_or(p, -1);
    if (size < 0) throw ConfigError("checkpoint file " + p.string() + " is missing");
    const int64_t want = info.value("bytes", int64_t(-1));
    if (size != want)
      throw ConfigError("checkpoint file " + p.string() + " is corrupted (truncated or extended): " +
                        std::to_string(size) + " bytes, manifest says " + std::to_string(want));
  }
  // The digests, one thread per file (model and optimizer state are each many GB at 4B), checked in manifest order.
  std::vector<std::future<std::string>> digests;
  for (const auto& [name, info] : m["files"].items()) {
    digests.push_back(std::async(std::launch::async, [p = dir / name] { return sha256_file(p.string()); }));
  }
  size_t i = 0;
  for (const auto& [name, info] : m["files"].items()) {
    if (digests[i++].get() != info.value("sha256", std::string()))
      throw ConfigError("checkpoint file " + (dir / name).string() +
                        " is corrupted: sha256 does not match the manifest");
  }
}

std::string publish_checkpoint(const std::string& tmp_dir, const std::string& final_dir) {
  remove_tree(final_dir);  // the end-of-run save may repeat the last periodic step
  if (::rename(tmp_dir.c_str(), final_dir.c_str()) != 0) sys_fail("cannot rename " + tmp_dir + " to", final_dir);
  const fs::path abs = fs::absolute(final_dir).lexically_normal();
  fsync_dir(abs.parent_path().string());
  return abs.string();
}

std::vector<std::string> prune_checkpoints(const std::string& run_dir, int64_t keep, const std::string& just_written) {
  static const std::regex done_re(R"(^checkpoint-([0-9]+)$)");
  static const std::regex tmp_re(R"(^checkpoint-[0-9]+\.tmp-([0-9]+)$)");
  std::vector<std::pair<int64_t, fs::path>> complete;
  std::vector<std::string> removed;
  std::error_code ec;
  const fs::path keep_path = fs::absolute(just_written).lexically_normal();
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    if (!e.is_directory(ec)) continue;
    const std::string name = e.path().filename().string();
    std::smatch m;
    if (std::regex_match(name, m, done_re)) {
      if (fs::exists(e.path() / "manifest.json", ec)) complete.emplace_back(std::stoll(m[1].str()), e.path());
    } else if (std::regex_match(name, m, tmp_re)) {
      const pid_t pid = static_cast<pid_t>(std::stoll(m[1].str()));
      if (pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH) {  // its writer is gone
        remove_tree(e.path().string());
        removed.push_back(e.path().string());
      }
    }
  }
  if (keep <= 0) return removed;
  std::sort(complete.begin(), complete.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  int64_t kept = 0;
  for (const auto& [step, path] : complete) {
    const bool is_new = fs::absolute(path).lexically_normal() == keep_path;
    if (is_new || kept < keep) {
      ++kept;
      continue;
    }
    remove_tree(path.string());
    removed.push_back(path.string());
  }
  return removed;
}

}  // namespace ablate
