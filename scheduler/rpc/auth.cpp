#include "scheduler/rpc/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <sys/stat.h>

#include <fstream>
#include <sstream>
#include <tuple>

#include "absl/status/status.h"
#include "scheduler/rpc/jwt.h"
#include "scheduler/util/log.h"

namespace ablate::scheduler::rpc {

std::string RoleName(Role r) {
  switch (r) {
    case Role::kUser: return "user";
    case Role::kAdmin: return "admin";
    case Role::kWorker: return "worker";
    default: return "none";
  }
}

const std::map<std::string, std::set<Role>>& MethodPolicy() {
  static const std::map<std::string, std::set<Role>> kPolicy = [] {
    const std::set<Role> people = {Role::kUser, Role::kAdmin};
    const std::set<Role> workers = {Role::kWorker};
    std::map<std::string, std::set<Role>> p;
    for (const char* m : {"SubmitSweep", "GetSweep", "ListSweeps", "CancelSweep", "ListJobs", "GetJob", "WatchSweep",
                          "CompareSweep", "GetJobMetrics", "CancelJob", "ExtendSweep", "CreateSchedule",
                          "ListSchedules", "DeleteSchedule"}) {
      p["ablate.v1.SweepService/" + std::string(m)] = people;
    }
    p["ablate.v1.SweepService/QuarantineWorker"] = {Role::kAdmin};
    for (const char* m : {"RegisterWorker", "LeaseJob", "Heartbeat", "ReportMetrics", "ReportCheckpoint",
                          "CompleteJob"}) {
      p["ablate.v1.WorkerService/" + std::string(m)] = workers;
    }
    return p;
  }();
  return kPolicy;
}

std::string TokenDigest(const std::string& token) {
  unsigned char d[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(), d);
  return std::string(reinterpret_cast<const char*>(d), sizeof d);
}

namespace {

bool HexToBytes(const std::string& hex, std::string* out) {
  if (hex.size() != 64) return false;
  out->clear();
  for (size_t i = 0; i < hex.size(); i += 2) {
    auto nib = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    int hi = nib(hex[i]), lo = nib(hex[i + 1]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
  }
  return true;
}

bool RoleFromName(const std::string& s, Role* r) {
  if (s == "user") *r = Role::kUser;
  else if (s == "admin") *r = Role::kAdmin;
  else if (s == "worker") *r = Role::kWorker;
  else return false;
  return true;
}

constexpr int64_t kMaxAuthFileBytes = 16 << 20;

absl::Status ReadSmallFile(const std::string& path, const char* flag, std::string* out) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(std::string(flag) + " " + path + ": not a readable file");
  }
  if (st.st_size > kMaxAuthFileBytes) {
    return absl::InvalidArgumentError(std::string(flag) + " " + path + ": larger than 16 MiB");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(std::string(flag) + " " + path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return absl::OkStatus();
}

}  // namespace

// --tokens_file lines: `<role> <name> <token>` or `<role> <name> sha256:<hex digest of the token>`; # comments.
static absl::Status ParseTokens(const std::string& content, const std::string& path,
                                std::vector<std::tuple<std::string, Role, std::string>>* out) {
  std::stringstream in(content);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (auto h = line.find('#'); h != std::string::npos) line.resize(h);
    std::stringstream ss(line);
    std::string role, name, tok, extra;
    if (!(ss >> role)) continue;
    std::string where = "--tokens_file " + path + " line " + std::to_string(n);
    if (!(ss >> name >> tok) || (ss >> extra)) {
      return absl::InvalidArgumentError(where + ": expected `<role> <name> <token|sha256:hex>`");
    }
    Role r;
    if (!RoleFromName(role, &r)) {
      return absl::InvalidArgumentError(where + ": role must be user, admin or worker, got '" + role + "'");
    }
    std::string digest;
    if (tok.rfind("sha256:", 0) == 0) {
      if (!HexToBytes(tok.substr(7), &digest)) {
        return absl::InvalidArgumentError(where + ": sha256: needs 64 hex digits");
      }
    } else {
      if (tok.size() < 16) return absl::InvalidArgumentError(where + ": token shorter than 16 characters");
      digest = TokenDigest(tok);
    }
    out->emplace_back(std::move(digest), r, std::move(name));
  }
  return absl::OkStatus();
}

// --revoked_tokens_file: one jti per line (printable, no blanks, at most 128 characters); # comments.
static absl::Status ParseRevoked(const std::string& content, const std::string& path,
                                 std::unordered_set<std::string>* out) {
  std::stringstream in(content);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (auto h = line.find('#'); h != std::string::npos) line.resize(h);
    std::stringstream ss(line);
    std::string jti, extra;
    if (!(ss >> jti)) continue;
    if ((ss >> extra) || jti.size() > 128) {
      return absl::InvalidArgumentError("--revoked_tokens_file " + path + " line " + std::to_string(n) +
                                        ": expected one token id (jti) per line");
    }
    out->insert(jti);
  }
  return absl::OkStatus();
}

int64_t Authenticator::NowMs() const {
  if (opts_.now_ms) return opts_.now_ms();
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch()).count();
}

std::shared_ptr<const Authenticator::Snapshot> Authenticator::Current() const {
  std::lock_guard<std::mutex> l(snap_mu_);
  return snap_;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(bool enabled, const std::string& tokens_file) {
  AuthOptions o;
  o.enabled = enabled;
  o.tokens_file = tokens_file;
  return Create(o);
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(const AuthOptions& options) {
  auto a = std::unique_ptr<Authenticator>(new Authenticator());
  a->opts_ = options;
  a->tokens_w_.path = options.tokens_file;
  a->revoked_w_.path = options.revoked_tokens_file;
  a->keys_w_.path = options.signing_key_file;
  a->snap_ = std::make_shared<Snapshot>();
  // The first load must succeed for every named file; later failures keep what was loaded.
  auto snap = std::make_shared<Snapshot>();
  for (Watched* w : {&a->tokens_w_, &a->revoked_w_, &a->keys_w_}) {
    if (w->path.empty()) continue;
    struct stat st {};
    if (::stat(w->path.c_str(), &st) == 0) {
      w->mtime_ns = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
      w->size = st.st_size;
      w->ino = st.st_ino;
    }
  }
  if (!options.tokens_file.empty()) {
    std::string content;
    if (auto st = ReadSmallFile(options.tokens_file, "--tokens_file", &content); !st.ok()) return st;
    std::vector<std::tuple<std::string, Role, std::string>> parsed;
    if (auto st = ParseTokens(content, options.tokens_file, &parsed); !st.ok()) return st;
    for (auto& [d, r, n] : parsed) snap->tokens.push_back({d, r, n});
  }
  if (!options.revoked_tokens_file.empty()) {
    std::string content;
    if (auto st = ReadSmallFile(options.revoked_tokens_file, "--revoked_tokens_file", &content); !st.ok()) return st;
    if (auto st = ParseRevoked(content, options.revoked_tokens_file, &snap->revoked); !st.ok()) return st;
  }
  if (!options.signing_key_file.empty()) {
    std::string warning, error;
    if (!jwt::ReadKeyFile(options.signing_key_file, &snap->keys, &warning, &error)) {
      return absl::InvalidArgumentError("--token_signing_key_file " + error);
    }
    if (!warning.empty()) LogWarn("token_signing_key_file_permissions", {{"warning", warning}});
  }
  a->snap_ = std::move(snap);
  a->next_check_ms_.store(a->NowMs() + options.reload_interval.count());
  return a;
}

void Authenticator::MaybeReload() const {
  if (tokens_w_.path.empty() && revoked_w_.path.empty() && keys_w_.path.empty()) return;
  const int64_t now = NowMs();
  if (now < next_check_ms_.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> l(reload_mu_);
  if (now < next_check_ms_.load(std::memory_order_relaxed)) return;  // another call just looked
  next_check_ms_.store(now + opts_.reload_interval.count(), std::memory_order_relaxed);
  ReloadLocked();
}

int Authenticator::ReloadNow() const {
  std::lock_guard<std::mutex> l(reload_mu_);
  next_check_ms_.store(NowMs() + opts_.reload_interval.count(), std::memory_order_relaxed);
  return ReloadLocked();
}

// Re-reads each named file whose (mtime, size, inode) changed since it was last looked at. A file that cannot be
// read or parsed keeps the previous contents; the failure is logged once per change of the file.
int Authenticator::ReloadLocked() const {
  std::shared_ptr<const Snapshot> cur = Current();
  std::shared_ptr<Snapshot> next;
  int reloaded = 0;
  auto changed = [](Watched* w) {
    struct stat st {};
    if (::stat(w->path.c_str(), &st) != 0) {
      bool was_there = w->size >= 0;
      w->mtime_ns = -1, w->size = -1, w->ino = 0;
      if (was_there) {
        LogError("auth_reload_failed", {{"file", w->path}, {"error", "cannot stat (removed?); keeping the "
                                                                       "previous contents"}});
      }
      return false;
    }
    int64_t m = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
    if (m == w->mtime_ns && st.st_size == w->size && st.st_ino == w->ino) return false;
    w->mtime_ns = m, w->size = st.st_size, w->ino = st.st_ino;
    return true;
  };
  auto fail = [](const Watched& w, const std::string& why) {
    LogError("auth_reload_failed", {{"file", w.path}, {"error", why + "; keeping the previous contents"}});
  };
  if (!tokens_w_.path.empty() && changed(&tokens_w_)) {
    std::string content;
    std::vector<std::tuple<std::string, Role, std::string>> parsed;
    absl::Status st = ReadSmallFile(tokens_w_.path, "--tokens_file", &content);
    if (st.ok()) st = ParseTokens(content, tokens_w_.path, &parsed);
    if (!st.ok()) {
      fail(tokens_w_, std::string(st.message()));
    } else {
      if (!next) next = std::make_shared<Snapshot>(*cur);
      next->tokens.clear();
      for (auto& [d, r, n] : parsed) next->tokens.push_back({d, r, n});
      ++reloaded;
      LogInfo("auth_reloaded", {{"file", tokens_w_.path}, {"static_tokens", std::to_string(parsed.size())}});
    }
  }
  if (!revoked_w_.path.empty() && changed(&revoked_w_)) {
    std::string content;
    std::unordered_set<std::string> revoked;
    absl::Status st = ReadSmallFile(revoked_w_.path, "--revoked_tokens_file", &content);
    if (st.ok()) st = ParseRevoked(content, revoked_w_.path, &revoked);
    if (!st.ok()) {
      fail(revoked_w_, std::string(st.message()));
    } else {
      if (!next) next = std::make_shared<Snapshot>(*cur);
      next->revoked = std::move(revoked);
      ++reloaded;
      LogInfo("auth_reloaded", {{"file", revoked_w_.path}, {"revoked_tokens", std::to_string(next->revoked.size())}});
    }
  }
  if (!keys_w_.path.empty() && changed(&keys_w_)) {
    std::vector<std::string> keys;
    std::string warning, error;
    if (!jwt::ReadKeyFile(keys_w_.path, &keys, &warning, &error)) {
      fail(keys_w_, "--token_signing_key_file " + error);
    } else {
      if (!warning.empty()) LogWarn("token_signing_key_file_permissions", {{"warning", warning}});
      if (!next) next = std::make_shared<Snapshot>(*cur);
      next->keys = std::move(keys);
      ++reloaded;
      LogInfo("auth_reloaded", {{"file", keys_w_.path}, {"signing_keys", std::to_string(next->keys.size())}});
    }
  }
  if (next) {
    std::lock_guard<std::mutex> l(snap_mu_);
    snap_ = std::move(next);
  }
  return reloaded;
}

Identity Authenticator::AuthenticateBearer(const std::string& v, std::string* error) const {
  Identity id;
  if (v.size() < 8 || v.compare(0, 7, "Bearer ") != 0) {
    *error = "authorization metadata must be `Bearer <token>`";
    return id;
  }
  MaybeReload();
  std::shared_ptr<const Snapshot> snap = Current();
  const std::string token = v.substr(7);
  // Legacy static tokens: every digest is compared (constant time each), whatever matches first.
  if (!snap->tokens.empty()) {
    const std::string digest = TokenDigest(token);
    const Token* hit = nullptr;
    for (const auto& t : snap->tokens) {
      if (CRYPTO_memcmp(t.digest.data(), digest.data(), digest.size()) == 0 && !hit) hit = &t;
    }
    if (hit) {
      id.role = hit->role;
      id.name = hit->name;
      return id;
    }
  }
  if (!jwt::LooksLikeJws(token)) {
    *error = "invalid bearer token";
    return id;
  }
  if (snap->keys.empty()) {
    *error = "invalid bearer token (this scheduler accepts no signed tokens: no --token_signing_key_file)";
    return id;
  }
  jwt::Claims c;
  std::string why;
  if (jwt::Verify(token, snap->keys, NowMs() / 1000, opts_.leeway_s, &c, &why) != jwt::Error::kOk) {
    *error = why;
    return id;
  }
  if (snap->revoked.count(c.jti)) {
    *error = "token revoked";
    return id;
  }
  Role r;
  if (!RoleFromName(c.role, &r) || c.sub == "*") {
    *error = "token claims: unusable role or subject";
    return id;
  }
  id.role = r;
  id.name = c.sub;
  id.tenant = c.tenant;
  id.token_id = c.jti;
  return id;
}

Identity Authenticator::Authenticate(const grpc::ServerContext* ctx, std::string* error) const {
  Identity id;
  if (!opts_.enabled) {
    id.role = Role::kAdmin;
    id.name = "anonymous";
    return id;
  }
  // mTLS: a verified client certificate is a worker; its common name is the worker identity.
  if (auto ac = ctx->auth_context(); ac && ac->IsPeerAuthenticated()) {
    auto cn = ac->FindPropertyValues("x509_common_name");
    if (!cn.empty()) {
      id.role = Role::kWorker;
      id.name = std::string(cn[0].data(), cn[0].size());
      id.via_cert = true;
      return id;
    }
  }
  const auto& md = ctx->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    *error = "no credentials: send `authorization: Bearer <token>` (ablate --token_file / $ABLATE_TOKEN) or a "
             "client certificate";
    return id;
  }
  return AuthenticateBearer(std::string(it->second.data(), it->second.size()), error);
}

grpc::Status Authorize(const Authenticator* auth, const grpc::ServerContext* ctx, const std::string& method,
                       Identity* who) {
  const auto& policy = MethodPolicy();
  auto it = policy.find(method);
  std::string err;
  *who = auth ? auth->Authenticate(ctx, &err) : Identity{Role::kAdmin, "anonymous", false, "", ""};
  if (it == policy.end()) {
    return grpc::Status(grpc::PERMISSION_DENIED, "method " + method + " has no authorization policy (denied)");
  }
  if (who->role == Role::kNone) return grpc::Status(grpc::UNAUTHENTICATED, err);
  if (auth && !auth->enabled()) return grpc::Status::OK;
  if (!it->second.count(who->role)) {
    return grpc::Status(grpc::PERMISSION_DENIED, "role " + RoleName(who->role) + " (" + who->name +
                                                     ") may not call " + method);
  }
  return grpc::Status::OK;
}

}  // namespace ablate::scheduler::rpc
