#include "scheduler/rpc/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <fstream>
#include <sstream>

#include "absl/status/status.h"

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
}  // namespace

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(bool enabled, const std::string& tokens_file) {
  auto a = std::make_unique<Authenticator>();
  a->enabled_ = enabled;
  if (tokens_file.empty()) return a;
  std::ifstream in(tokens_file);
  if (!in) return absl::InvalidArgumentError("--tokens_file " + tokens_file + ": cannot open");
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (auto h = line.find('#'); h != std::string::npos) line.resize(h);
    std::stringstream ss(line);
    std::string role, name, tok, extra;
    if (!(ss >> role)) continue;
    std::string where = "--tokens_file " + tokens_file + " line " + std::to_string(n);
    if (!(ss >> name >> tok) || (ss >> extra)) {
      return absl::InvalidArgumentError(where + ": expected `<role> <name> <token|sha256:hex>`");
    }
    Token t;
    t.name = name;
    if (role == "user") t.role = Role::kUser;
    else if (role == "admin") t.role = Role::kAdmin;
    else if (role == "worker") t.role = Role::kWorker;
    else return absl::InvalidArgumentError(where + ": role must be user, admin or worker, got '" + role + "'");
    if (tok.rfind("sha256:", 0) == 0) {
      if (!HexToBytes(tok.substr(7), &t.digest)) {
        return absl::InvalidArgumentError(where + ": sha256: needs 64 hex digits");
      }
    } else {
      if (tok.size() < 16) return absl::InvalidArgumentError(where + ": token shorter than 16 characters");
      t.digest = TokenDigest(tok);
    }
    a->tokens_.push_back(std::move(t));
  }
  return a;
}

Identity Authenticator::Authenticate(const grpc::ServerContext* ctx, std::string* error) const {
  Identity id;
  if (!enabled_) {
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
    *error = "no credentials: send `authorization: Bearer <token>` (ablate --token / $ABLATE_TOKEN) or a client "
             "certificate";
    return id;
  }
  std::string v(it->second.data(), it->second.size());
  if (v.size() < 8 || v.compare(0, 7, "Bearer ") != 0) {
    *error = "authorization metadata must be `Bearer <token>`";
    return id;
  }
  std::string digest = TokenDigest(v.substr(7));
  for (const auto& t : tokens_) {
    if (CRYPTO_memcmp(t.digest.data(), digest.data(), digest.size()) == 0) {
      id.role = t.role;
      id.name = t.name;
      return id;
    }
  }
  *error = "invalid bearer token";
  return id;
}

grpc::Status Authorize(const Authenticator* auth, const grpc::ServerContext* ctx, const std::string& method,
                       Identity* who) {
  const auto& policy = MethodPolicy();
  auto it = policy.find(method);
  std::string err;
  *who = auth ? auth->Authenticate(ctx, &err) : Identity{Role::kAdmin, "anonymous", false};
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
