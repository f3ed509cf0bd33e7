// Authentication and per-RPC authorization (deny by default).
//   - Workers: an mTLS client certificate signed by --tls_client_ca (identity = its common name), or a worker token.
//   - People: bearer tokens (`authorization: Bearer <token>`) from --tokens_file, role user or admin. Tokens are
//     kept only as SHA-256 digests and compared in constant time; they never reach a log line.
//   - Without --tokens_file and --tls_client_ca, authentication is off (local development; logged loudly).
#pragma once
#include <grpcpp/grpcpp.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ablate::scheduler::rpc {

enum class Role { kNone, kUser, kAdmin, kWorker };
std::string RoleName(Role r);

struct Identity {
  Role role = Role::kNone;
  std::string name;       // token name, or the certificate's common name
  bool via_cert = false;
};

// Every RPC of ablate.v1 → the roles allowed to call it. A method missing here is denied to everyone (and the
// authorization matrix test fails), so adding an RPC forces a decision.
const std::map<std::string, std::set<Role>>& MethodPolicy();

class Authenticator {
 public:
  // tokens_file lines: `<role> <name> <token>` or `<role> <name> sha256:<hex digest of the token>`; # comments.
  // enabled=false: every caller is an anonymous admin.
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(bool enabled, const std::string& tokens_file);
  bool enabled() const { return enabled_; }
  // Who is calling (kNone when unauthenticated). *error explains a rejected credential (never echoing it).
  Identity Authenticate(const grpc::ServerContext* ctx, std::string* error) const;

 private:
  struct Token {
    std::string digest;  // 32 raw bytes
    Role role;
    std::string name;
  };
  bool enabled_ = false;
  std::vector<Token> tokens_;
};

// UNAUTHENTICATED when the caller has no valid credential, PERMISSION_DENIED when its role may not call `method`
// (the short name, e.g. "SubmitSweep").
grpc::Status Authorize(const Authenticator* auth, const grpc::ServerContext* ctx, const std::string& method,
                       Identity* who);

// "Bearer <token>" → digest, exposed for tests.
std::string TokenDigest(const std::string& token);

}  // namespace ablate::scheduler::rpc
