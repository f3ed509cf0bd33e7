#include "worker/checkpoint.h"

#include <openssl/evp.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

namespace ablate::worker {

std::string Sha256File(const std::string& path, bool* ok) {
  *ok = false;
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) return "";
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) return "";
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f.get())) > 0) EVP_DigestUpdate(ctx.get(), buf, n);
  if (std::ferror(f.get())) return "";
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(hex[md[i] >> 4]);
    out.push_back(hex[md[i] & 15]);
  }
  *ok = true;
  return out;
}

bool VerifyCheckpoint(const std::string& dir, std::string* error) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    *error = dir + ": not a directory";
    return false;
  }
  fs::path mpath = fs::path(dir) / "manifest.json";
  std::ifstream in(mpath);
  if (!in) {
    *error = dir + ": no manifest.json (incomplete checkpoint)";
    return false;
  }
  auto m = nlohmann::json::parse(in, nullptr, false);
  if (m.is_discarded() || !m.is_object() || !m.contains("files") || !m["files"].is_object() || m["files"].empty()) {
    *error = mpath.string() + ": unreadable manifest or no 'files' table";
    return false;
  }
  for (const auto& [name, info] : m["files"].items()) {
    if (name.find('/') != std::string::npos || name == ".." || !info.is_object()) {
      *error = mpath.string() + ": bad entry '" + name + "'";
      return false;
    }
    fs::path p = fs::path(dir) / name;
    auto size = fs::file_size(p, ec);
    if (ec) {
      *error = p.string() + ": missing";
      return false;
    }
    if (!info.contains("bytes") || static_cast<int64_t>(size) != info.value("bytes", int64_t(-1))) {
      *error = p.string() + ": " + std::to_string(size) + " bytes, manifest says " +
               std::to_string(info.value("bytes", int64_t(-1)));
      return false;
    }
    bool ok = false;
    std::string sum = Sha256File(p.string(), &ok);
    if (!ok || sum != info.value("sha256", std::string())) {
      *error = p.string() + ": sha256 does not match the manifest (corrupt)";
      return false;
    }
  }
  return true;
}

}  // namespace ablate::worker
