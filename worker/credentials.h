// How ablate-worker authenticates to the scheduler: TLS (server certificate checked against --tls_ca), and either a
// client certificate (mTLS, CN = worker id) or a bearer token (--token_file: a signed short-lived token from
// `ablate token issue --role worker --subject <id>`, or a legacy static one, `ablate certs` writes <id>.token).
// The token file is read at start and again before a call whenever it changed (mtime, size or inode), so an
// external refresher can rotate it; a file that cannot be used keeps the previous token. The token is kept in
// memory only, never logged, and sent as gRPC call credentials (`authorization: Bearer <token>`) on every RPC.
// gRPC itself refuses to attach call credentials to a channel without privacy and integrity, and
// BuildSchedulerChannel refuses a token without TLS unless allow_insecure_token says so (then an interceptor adds
// the same header over plaintext; for a TLS-terminating proxy in front of the scheduler only).
// Certificates (--tls_ca, --tls_cert, --tls_key) are watched by gRPC's file watcher every tls_reload_interval_s:
// new connections use the replaced files (rotation without a restart; F23).
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

namespace ablate::worker {

struct SchedulerConnection {
  std::string target;           // --scheduler (a comma list of replicas becomes ipv4:a,b)
  std::string tls_ca;           // PEM CA (bundle) of the scheduler certificate; empty: plaintext
  std::string tls_cert, tls_key;  // client certificate (mTLS)
  std::string tls_server_name;  // name expected in the scheduler certificate (default: the host of target)
  std::string token_file;       // bearer token
  bool allow_insecure_token = false;
  int tls_reload_interval_s = 60;  // 0: read the certificate files once
};

// The token of a --token_file, re-read when the file changed. Thread-safe.
class TokenSource {
 public:
  TokenSource(std::string path, std::string token);
  std::string Get();  // the current token (the last good one when the file cannot be used now)
  int reloads() const;

 private:
  mutable std::mutex mu_;
  std::string path_, token_, sig_, bad_sig_;
  int reloads_ = 0;
};

// Reads a bearer token (jwt::ReadTokenFile, shared with the CLI: the file's first line without surrounding
// blanks; refuses an empty token, one with blanks or control characters inside, or a file over 4 KiB). *warning is
// set when the file is readable by group or others. Messages name --token_file; they never quote the content.
bool ReadTokenFile(const std::string& path, std::string* token, std::string* warning, std::string* error);

// The channel to the scheduler with the credentials the options ask for. nullptr and *error when they do not fit
// together (a token or client certificate without TLS, unreadable files). *auth describes them for the start-up
// log line ("tls+token", "mtls", "plaintext", ...), never the token.
std::shared_ptr<grpc::Channel> BuildSchedulerChannel(const SchedulerConnection& c, grpc::ChannelArguments args,
                                                     std::string* auth, std::string* error);

}  // namespace ablate::worker
