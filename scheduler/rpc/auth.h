// Authentication and per-RPC authorization (deny by default).
//   - Workers: an mTLS client certificate signed by --tls_client_ca (identity = its common name), or a worker
//     bearer token (a signed token with role worker and sub = the worker id, or a legacy static token).
//   - People: bearer tokens (`authorization: Bearer <token>`), role user or admin:
//       * signed tokens (compact JWS, HS256; scheduler/rpc/jwt.h) verified with the keys of
//         --token_signing_key_file: short-lived (exp), revocable by jti (--revoked_tokens_file);
//       * legacy static tokens from --tokens_file, kept only as SHA-256 digests and compared in constant time.
//     No token ever reaches a log line or an error message.
//   - Hot reload: --tokens_file, --revoked_tokens_file and --token_signing_key_file are looked at (stat) at most
//     once per reload interval (1 s), under a lock, and re-read when their mtime, size or inode changed. A file
//     that cannot be read or parsed keeps its previous contents, and the failure is logged (auth_reload_failed).
//   - Without any of --tokens_file, --token_signing_key_file and --tls_client_ca, authentication is off (local
//     development; logged loudly).
#pragma once
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

#include "absl/status/statusor.h"

namespace ablate::scheduler::rpc {

enum class Role { kNone, kUser, kAdmin, kWorker };
std::string RoleName(Role r);

struct Identity {
  Role role = Role::kNone;
  std::string name;       // token name or subject, or the certificate's common name
  bool via_cert = false;
  std::string tenant;     // a signed token's tenant claim (empty for certificates and static tokens)
  std::string token_id;   // a signed token's jti (for logs: revocation needs it); empty otherwise
};

// Every RPC of ablate.v1 → the roles allowed to call it. A method missing here is denied to everyone (and the
// authorization matrix test fails), so adding an RPC forces a decision.
const std::map<std::string, std::set<Role>>& MethodPolicy();

struct AuthOptions {
  bool enabled = false;
  std::string tokens_file;          // legacy static tokens: `<role> <name> <token|sha256:hex>` per line
  std::string revoked_tokens_file;  // one jti per line; '#' comments
  std::string signing_key_file;     // HS256 keys, one per line (jwt::ParseKeyFile); enables signed tokens
  std::chrono::milliseconds reload_interval{1000};
  int leeway_s = 30;                // clock skew allowed on exp/nbf
  std::function<int64_t()> now_ms;  // tests; default: the wall clock
};

class Authenticator {
 public:
  // Fails when a named file cannot be read or parsed at start.
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(const AuthOptions& options);
  // Legacy form: static tokens only. enabled=false: every caller is an anonymous admin.
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(bool enabled, const std::string& tokens_file);
  bool enabled() const { return opts_.enabled; }
  bool signed_tokens() const { return !opts_.signing_key_file.empty(); }
  // Who is calling (kNone when unauthenticated). *error explains a rejected credential (never echoing it).
  Identity Authenticate(const grpc::ServerContext* ctx, std::string* error) const;
  // The bearer part: `authorization` metadata value ("Bearer <token>"). Exposed for tests.
  Identity AuthenticateBearer(const std::string& authorization, std::string* error) const;
  // Looks at the files now (ignoring the interval); returns how many were re-read. Tests and SIGHUP-like use.
  int ReloadNow() const;

 private:
  struct Token {
    std::string digest;  // 32 raw bytes
    Role role;
    std::string name;
  };
  struct Snapshot {  // immutable once published
    std::vector<Token> tokens;
    std::vector<std::string> keys;
    std::unordered_set<std::string> revoked;
  };
  struct Watched {
    std::string path;
    int64_t mtime_ns = -1, size = -1;
    uint64_t ino = 0;
  };
  int64_t NowMs() const;
  void MaybeReload() const;
  int ReloadLocked() const;  // with reload_mu_ held
  std::shared_ptr<const Snapshot> Current() const;

  AuthOptions opts_;
  mutable std::mutex reload_mu_;         // one reload at a time
  mutable std::atomic<int64_t> next_check_ms_{0};
  mutable Watched tokens_w_, revoked_w_, keys_w_;
  mutable std::mutex snap_mu_;           // guards snap_ (the pointer; the snapshot itself is immutable)
  mutable std::shared_ptr<const Snapshot> snap_;
};

// UNAUTHENTICATED when the caller has no valid credential, PERMISSION_DENIED when its role may not call `method`
// (the short name, e.g. "SubmitSweep").
grpc::Status Authorize(const Authenticator* auth, const grpc::ServerContext* ctx, const std::string& method,
                       Identity* who);

// "Bearer <token>" → digest, exposed for tests.
std::string TokenDigest(const std::string& token);

}  // namespace ablate::scheduler::rpc
