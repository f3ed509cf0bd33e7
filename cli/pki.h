// A local PKI for the control plane (`ablate certs`, and `ablate up` on its first start), made with libcrypto in
// this process: no openssl CLI, no shell. Every file is written 0600 (tmp + rename) in a 0700 directory; no key
// or token is ever printed.
//
//   ca.pem, ca-key.pem                 local CA (EC P-256, 10 years)
//   scheduler.pem, scheduler-key.pem   the scheduler's server certificate, CN localhost, SAN localhost, 127.0.0.1,
//                                      ::1 and `scheduler_names` (1 year)
//   <worker>.pem, <worker>-key.pem     a worker's client certificate, CN = worker id, clientAuth (1 year)
//   <worker>.token                     the same worker's bearer token (ablate-worker --token_file)
//   user.token, admin.token            bearer tokens for people (the CLI: $ABLATE_TOKEN, or `ablate up`'s config)
//   tokens                             ablate-scheduler --tokens_file: `<role> <name> sha256:<digest>` for every
//                                      *.token here (digests only: the scheduler never holds a token). These
//                                      static tokens never expire: the legacy path, kept for compatibility.
//   token-signing.key                  ablate-scheduler --token_signing_key_file: signs short-lived tokens
//                                      (`ablate token issue`; the CLI of `ablate up` mints one per call)
//
// Idempotent: what exists and is still good is kept (a leaf that the CA signed, whose key matches, with more than
// a day to live); what is missing, broken or about to expire is made again. A new CA re-issues every leaf.
// Rotation: `renew` re-issues the named leaves (new key and serial, same CA) even when they are good; the
// scheduler and workers pick up replaced files without a restart (--tls_reload_interval_s).
#pragma once

#include <string>
#include <vector>

namespace ablate::cli {

struct PkiOptions {
  std::vector<std::string> workers;          // worker ids: a certificate and a token each
  std::vector<std::string> scheduler_names;  // extra DNS names / IP addresses in the scheduler certificate
  std::vector<std::string> renew;            // "scheduler" and/or worker ids: re-issue these leaves now
  int leaf_days = 365;                       // validity of the leaves issued by this run; < 0: already expired
                                             // (notAfter that many days ago; for tests of expiry handling)
};

struct PkiReport {
  std::vector<std::string> made, kept;  // file names (not paths)
};

// A worker id usable as a certificate CN and a file name: [A-Za-z0-9][A-Za-z0-9._-]*, at most 128 characters,
// and none of the reserved names (ca, scheduler, user, admin, tokens). *why explains a refusal.
bool ValidPkiWorkerId(const std::string& id, std::string* why);

bool EnsurePki(const std::string& dir, const PkiOptions& opts, PkiReport* report, std::string* error);

// Writes `data` to `path` created 0600 whatever the umask: tmp + fsync + rename (never follows a link).
bool WritePrivateFile(const std::string& path, const std::string& data, std::string* error);

}  // namespace ablate::cli
