#include "worker/argv.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

namespace ablate::worker {
namespace {

bool IsFlagName(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')) return false;
  }
  return true;
}

bool IsDatasetName(const std::string& s) {
  if (s.empty() || s == "." || s == "..") return false;
  for (char c : s) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
          c == '.'))
      return false;
  }
  return true;
}

// First 8 hex digits of SHA-256(text): names a lease grant without revealing its nonce.
std::string ShortDigest(const std::string& text) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(text.data(), text.size(), md, &len, EVP_sha256(), nullptr) != 1 || len < 4) return "";
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (int i = 0; i < 4; ++i) {
    out += kHex[md[i] >> 4];
    out += kHex[md[i] & 15];
  }
  return out;
}

std::string ReadSmall(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// Makes `dir` and records `owner` in dir/.lease unless someone did first: written to a temporary file, then
// hard-linked into place, so a reader never sees a half-written marker. Returns the owner on record, "" on error.
std::string ClaimDir(const std::string& dir, const std::string& owner, std::string* error) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    *error = "cannot create " + dir + ": " + ec.message();
    return "";
  }
  const std::string marker = dir + "/.lease";
  std::random_device rd;
  const std::string tmp = marker + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(rd());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << owner << "\n";
    if (!out.flush()) {
      *error = "cannot write " + tmp;
      return "";
    }
  }
  const int rc = ::link(tmp.c_str(), marker.c_str());
  const int err = errno;
  ::unlink(tmp.c_str());
  if (rc == 0) return owner;
  if (err != EEXIST) {
    *error = "cannot create " + marker + ": " + std::strerror(err);
    return "";
  }
  std::string on_record = ReadSmall(marker);
  if (on_record.empty()) *error = marker + " is empty";
  return on_record;
}

}  // namespace

std::string ClaimRunName(const std::string& output_dir, int32_t attempt, const std::string& lease_nonce,
                         std::string* error) {
  const std::string owner = ShortDigest(lease_nonce);
  if (owner.empty()) {
    *error = "cannot hash the lease nonce";
    return "";
  }
  const std::string name = "attempt-" + std::to_string(attempt);
  std::string got = ClaimDir(output_dir + "/" + name, owner, error);
  if (got.empty()) return "";
  if (got == owner) return name;
  // The number was reissued (another grant owns attempt-<n>): a directory of this grant's own.
  const std::string mine = name + "-" + owner;
  got = ClaimDir(output_dir + "/" + mine, owner, error);
  if (got.empty()) return "";
  if (got != owner) {
    *error = output_dir + "/" + mine + " belongs to another lease";
    return "";
  }
  return mine;
}

bool BuildTrainCommand(const TrainCommandInput& in, TrainCommand* out, std::string* error) {
  // Flags the worker owns: a job may not point the child at other paths or descriptors.
  static const std::set<std::string> kReserved = {"data_dir",    "output_dir",  "run_name",
                                                   "events_fd",   "resume_from", "lease_file"};
  std::string dataset = "fortunes";
  TrainCommand cmd;
  cmd.argv.push_back(in.train_bin);
  for (const auto& [key, value] : in.params) {  // std::map: a stable, sorted order
    if (!IsFlagName(key)) {
      *error = "param name '" + key + "' is not a valid flag name ([A-Za-z0-9_]+)";
      return false;
    }
    if (key == "dataset") {
      dataset = value;
      continue;
    }
    if (kReserved.count(key)) {
      *error = "param '" + key + "' is set by the worker and may not appear in a job's params";
      return false;
    }
    cmd.argv.push_back("--" + key);
    cmd.argv.push_back(value);
  }
  if (!IsDatasetName(dataset)) {
    *error = "dataset '" + dataset + "' is not a plain name ([A-Za-z0-9._-]+)";
    return false;
  }
  cmd.output_dir = in.work_dir + "/job-" + std::to_string(in.job_id);
  const std::string run_name = in.run_name.empty() ? "attempt-" + std::to_string(in.attempt) : in.run_name;
  cmd.log_path = cmd.output_dir + "/" + run_name + ".log";
  cmd.argv.insert(cmd.argv.end(), {"--data_dir", in.data_root + "/" + dataset, "--output_dir", cmd.output_dir,
                                   "--run_name", run_name, "--events_fd",
                                   std::to_string(in.events_fd)});
  if (!in.resume_checkpoint.empty()) {
    cmd.argv.push_back("--resume_from");
    cmd.argv.push_back(in.resume_checkpoint);
  }
  *out = std::move(cmd);
  return true;
}

}  // namespace ablate::worker
