// Signed short-lived bearer tokens on the CLI side (scheduler/rpc/jwt.h has the format):
//   ablate token keygen --out FILE        a signing key (32 random bytes as 64 hex digits, file 0600)
//   ablate token issue --tenant T --role R [--ttl 1h] [--key FILE] [--subject S] [--out FILE]
// and the per-call token of the local stack: `ablate up` keeps a signing key in <state_dir>/pki and the CLI mints
// a fresh token from it for each call (its "refresh"), instead of sending a static token.
#pragma once

#include <cstdint>
#include <string>

#include "scheduler/rpc/jwt.h"

namespace ablate::cli {

struct TokenRequest {
  std::string key_file;  // signing key file (the first key signs)
  std::string subject, tenant, role;
  int64_t ttl_s = jwt::kDefaultTtlSeconds;
  int64_t backdate_s = 0;  // iat/nbf/exp shifted this far into the past (tests: an already expired token)
};

// Mints a token; *claims (optional) gets what it carries. Errors never quote a key.
bool MintToken(const TokenRequest& r, std::string* token, jwt::Claims* claims, std::string* error);

// The local stack's per-call token: role user, subject "local-user", tenant "default", 15 minutes. The key file's
// contents are cached while its (mtime, size, inode) stays the same.
bool MintLocalToken(const std::string& key_file, std::string* token, std::string* error);

struct TokenIssueOptions {
  std::string key_file;   // --key; default: the local stack's (<state_dir>/stack.json)
  std::string state_dir = ".ablate";
  std::string subject;    // --subject; default $USER (people) — required for role worker (the worker id)
  std::string tenant;
  std::string role;
  std::string ttl = "1h";
  std::string backdate;   // --backdate DURATION
  std::string out;        // --out FILE: write it there (0600, atomically) instead of printing it
  bool allow_long_ttl = false;
};
int CmdTokenIssue(const TokenIssueOptions& o);
int CmdTokenKeygen(const std::string& out, bool force);

// "tls"."token_signing_key" of <state_dir>/stack.json, or "".
std::string StackSigningKeyFile(const std::string& state_dir);

}  // namespace ablate::cli
