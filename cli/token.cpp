#include "cli/token.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "cli/pki.h"

namespace ablate::cli {
namespace {

// The signing keys of a key file, cached while the file stays the same (the per-call token reads it often).
bool CachedKeys(const std::string& path, std::vector<std::string>* keys, std::string* error) {
  static std::mutex mu;
  static std::string cached_path;
  static int64_t cached_mtime = -1, cached_size = -1;
  static uint64_t cached_ino = 0;
  static std::vector<std::string> cached;
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    *error = "token signing key " + path + ": not a readable file";
    return false;
  }
  const int64_t mtime = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
  std::lock_guard<std::mutex> l(mu);
  if (path == cached_path && mtime == cached_mtime && st.st_size == cached_size && st.st_ino == cached_ino &&
      !cached.empty()) {
    *keys = cached;
    return true;
  }
  std::string warning;
  if (!jwt::ReadKeyFile(path, keys, &warning, error)) return false;
  if (!warning.empty()) std::cerr << "warning: " << warning << "\n";
  cached_path = path, cached_mtime = mtime, cached_size = st.st_size, cached_ino = st.st_ino, cached = *keys;
  return true;
}

std::string Utc(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm {};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

bool ValidName(const std::string& s) {
  if (s.empty() || s.size() > 128) return false;
  for (unsigned char c : s)
    if (c <= 0x20 || c >= 0x7f) return false;
  return true;
}

}  // namespace

bool MintToken(const TokenRequest& r, std::string* token, jwt::Claims* claims, std::string* error) {
  if (r.role != "user" && r.role != "admin" && r.role != "worker") {
    *error = "role must be user, admin or worker, got '" + r.role + "'";
    return false;
  }
  if (!ValidName(r.subject) || r.subject == "*") {
    *error = "subject '" + r.subject + "': 1 to 128 printable characters without blanks (not '*')";
    return false;
  }
  if (!ValidName(r.tenant)) {
    *error = "tenant '" + r.tenant + "': 1 to 128 printable characters without blanks";
    return false;
  }
  if (r.ttl_s <= 0) {
    *error = "the lifetime must be more than 0 seconds";
    return false;
  }
  std::vector<std::string> keys;
  if (!CachedKeys(r.key_file, &keys, error)) return false;
  jwt::Claims c;
  c.sub = r.subject;
  c.tenant = r.tenant;
  c.role = r.role;
  if (!jwt::NewJti(&c.jti)) {
    *error = "cannot draw random bytes for the token id";
    return false;
  }
  c.iat = c.nbf = jwt::NowSeconds() - r.backdate_s;
  c.exp = c.iat + r.ttl_s;
  *token = jwt::Sign(c, keys.front());
  if (claims) *claims = c;
  return true;
}

bool MintLocalToken(const std::string& key_file, std::string* token, std::string* error) {
  TokenRequest r;
  r.key_file = key_file;
  r.subject = "local-user";
  r.tenant = "default";
  r.role = "user";
  r.ttl_s = 15 * 60;
  return MintToken(r, token, nullptr, error);
}

std::string StackSigningKeyFile(const std::string& state_dir) {
  std::ifstream in(state_dir + "/stack.json");
  if (!in) return "";
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("tls") || !j["tls"].is_object()) return "";
  return j["tls"].value("token_signing_key", "");
}

int CmdTokenIssue(const TokenIssueOptions& o) {
  TokenRequest r;
  r.role = o.role;
  r.tenant = o.tenant;
  r.subject = o.subject;
  std::string err;
  if (r.subject.empty()) {
    if (o.role == "worker") {
      std::cerr << "error: ablate token issue: --subject is required for role worker (the worker id, which must be "
                   "the worker's --worker_id)\n";
      return 2;
    }
    const char* user = std::getenv("USER");
    r.subject = user && *user ? user : "user";
  }
  if (!jwt::ParseDuration(o.ttl, &r.ttl_s, &err)) {
    std::cerr << "error: ablate token issue: --ttl " << err << "\n";
    return 2;
  }
  if (r.ttl_s > jwt::kMaxTtlSeconds && !o.allow_long_ttl) {
    std::cerr << "error: ablate token issue: --ttl " << o.ttl << " is longer than 24h; tokens are meant to be "
              << "short-lived (1h by default) and refreshed; pass --allow_long_ttl to issue it anyway\n";
    return 2;
  }
  if (!o.backdate.empty() && !jwt::ParseDuration(o.backdate, &r.backdate_s, &err)) {
    std::cerr << "error: ablate token issue: --backdate " << err << "\n";
    return 2;
  }
  r.key_file = o.key_file.empty() ? StackSigningKeyFile(o.state_dir) : o.key_file;
  if (r.key_file.empty()) {
    std::cerr << "error: ablate token issue: no signing key: pass --key FILE (the scheduler's "
                 "--token_signing_key_file), or --state_dir of a stack started by `ablate up`\n";
    return 2;
  }
  std::string token;
  jwt::Claims c;
  if (!MintToken(r, &token, &c, &err)) {
    std::cerr << "error: ablate token issue: " << err << "\n";
    return 2;
  }
  if (!o.out.empty()) {
    if (!WritePrivateFile(o.out, token + "\n", &err)) {
      std::cerr << "error: ablate token issue: " << err << "\n";
      return 1;
    }
  } else {
    std::cout << token << "\n";
  }
  // What the token is, never the token itself, on stderr: the jti is what --revoked_tokens_file takes.
  std::cerr << "issued " << c.role << " token for " << c.sub << " (tenant " << c.tenant << "): jti " << c.jti
            << ", valid " << Utc(c.nbf) << " to " << Utc(c.exp) << (o.out.empty() ? "" : ", written to " + o.out)
            << "\n";
  return 0;
}

int CmdTokenKeygen(const std::string& out, bool force) {
  if (out.empty()) {
    std::cerr << "error: ablate token keygen: --out FILE is required\n";
    return 2;
  }
  if (!force && ::access(out.c_str(), F_OK) == 0) {
    std::cerr << "error: ablate token keygen: " << out << " exists (a new key invalidates every token signed with "
              << "the old one; --force to replace it, or add the new key as the first line and keep the old one "
              << "below until its tokens have expired)\n";
    return 1;
  }
  std::string key = jwt::NewKeyFileContent(), err;
  if (key.empty()) {
    std::cerr << "error: ablate token keygen: cannot draw random bytes\n";
    return 1;
  }
  bool ok = WritePrivateFile(out, key, &err);
  std::fill(key.begin(), key.end(), '\0');
  if (!ok) {
    std::cerr << "error: ablate token keygen: " << err << "\n";
    return 1;
  }
  std::cout << "wrote a token signing key to " << out << " (0600): ablate-scheduler --token_signing_key_file "
            << out << "; ablate token issue --key " << out << "\n";
  return 0;
}

}  // namespace ablate::cli
