// Short-lived signed bearer tokens: compact JWS (RFC 7515) with HS256 (HMAC-SHA256, libcrypto), JWT claims
// (RFC 7519) sub, tenant, role, iat, nbf, exp, jti. The scheduler verifies them (scheduler/rpc/auth.cpp); the CLI
// issues them (`ablate token issue`, and a fresh one per call for the local stack of `ablate up`). A small library
// of its own (ablate_jwt: libcrypto and nlohmann_json only) so that the CLI does not link the scheduler.
//
// Verification is strict: exactly three base64url parts without padding, a header whose "alg" is "HS256" (never
// "none" or anything else; "crit" is refused), the signature compared in constant time before any claim is read,
// then exp/nbf against the clock with kLeewaySeconds of skew. Error texts never quote the token.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ablate::jwt {

constexpr int kLeewaySeconds = 30;         // clock skew allowed on exp and nbf
constexpr size_t kMaxTokenBytes = 4096;    // longer bearer values are refused before decoding
constexpr size_t kMinKeyBytes = 32;        // a signing key is at least 256 bits
constexpr int64_t kDefaultTtlSeconds = 3600;      // RELIABILITY §4.1: short-lived, <= 1 h
constexpr int64_t kMaxTtlSeconds = 24 * 3600;     // `ablate token issue` refuses more without --allow_long_ttl

struct Claims {
  std::string sub;     // who: a person's name, or the worker id for role worker
  std::string tenant;  // carried and logged; the scheduler has no per-tenant data yet (docs/control-plane.md)
  std::string role;    // user | admin | worker
  std::string jti;     // unique id; --revoked_tokens_file lists revoked ones
  int64_t iat = 0, nbf = 0, exp = 0;  // seconds since the epoch
};

enum class Error {
  kOk,
  kMalformed,     // not three base64url parts, not JSON, wrong claim types, too long
  kAlgorithm,     // alg is not HS256 (none, RS256, HS512, missing), or a "crit" header
  kSignature,     // no configured key produced this signature
  kExpired,       // now >= exp + leeway
  kNotYetValid,   // now + leeway < nbf (or iat)
  kClaims,        // a required claim is missing or unusable (sub, role, tenant, jti, exp)
};

std::string Base64UrlEncode(std::string_view in);
// Strict: the URL-safe alphabet only, no padding, no stray bits. False on anything else.
bool Base64UrlDecode(std::string_view in, std::string* out);

// header.payload.signature, signed with `key`.
std::string Sign(const Claims& c, std::string_view key);

// True when `token` has the shape of a compact JWS (two dots); static tokens never contain one.
bool LooksLikeJws(std::string_view token);

// Verifies `token` against every key in `keys` (rotation: any of them may have signed it), then the times against
// now_s with leeway_s. On kOk *out holds the claims. *why is a short reason for logs and the UNAUTHENTICATED
// message ("token expired", "invalid token signature", ...), never the token.
Error Verify(std::string_view token, const std::vector<std::string>& keys, int64_t now_s, int leeway_s, Claims* out,
             std::string* why);

// 16 random bytes as 32 hex digits (false only when the RNG fails).
bool NewJti(std::string* out);

// A signing-key file: text, one key per line (the first one signs, every one verifies: add the new key on top,
// remove the old one once its tokens have expired), blank lines and lines starting with '#' ignored, surrounding
// blanks trimmed. Each key is used verbatim as the HMAC key and must be at least kMinKeyBytes long and printable
// without blanks. `ablate token keygen` / `ablate up` write 32 random bytes as 64 hex digits.
bool ParseKeyFile(const std::string& content, std::vector<std::string>* keys, std::string* error);
// Reads and parses; *warning is set when the file is readable by group or others. Errors never quote a key.
bool ReadKeyFile(const std::string& path, std::vector<std::string>* keys, std::string* warning, std::string* error);
// A bearer-token file (the CLI's and the worker's --token_file): the token is the first line, surrounding blanks
// trimmed; false when the file is missing, larger than 4 KiB, empty, or the token has blanks or non-printable
// characters inside. Errors are "<path>: ..." (the caller prefixes its flag) and never quote the content; *warning
// (optional) is set when the file is readable by group or others.
bool ReadTokenFile(const std::string& path, std::string* token, std::string* warning, std::string* error);
// "<64 hex digits>\n" from 32 random bytes; empty when the RNG fails.
std::string NewKeyFileContent();

// "90", "90s", "15m", "1h", "2d" (one number, one optional unit) -> seconds > 0.
bool ParseDuration(const std::string& s, int64_t* seconds, std::string* error);

// Seconds since the epoch (wall clock).
int64_t NowSeconds();

}  // namespace ablate::jwt
