#include "cli/client.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <sys/stat.h>

#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/token.h"
#include "scheduler/rpc/jwt.h"

namespace ablate::cli {

std::string ResolveSchedulerAddress(const std::string& flag, const std::string& state_dir, std::string* source) {
  if (!flag.empty()) {
    *source = "--scheduler";
    return flag;
  }
  if (const char* env = std::getenv("ABLATE_SCHEDULER"); env && *env) {
    *source = "ABLATE_SCHEDULER";
    return env;
  }
  const std::string path = state_dir + "/stack.json";
  std::ifstream in(path);
  if (in) {
    auto j = nlohmann::json::parse(in, nullptr, false);
    if (!j.is_discarded() && j.is_object() && j.contains("scheduler") && j["scheduler"].is_string()) {
      *source = path;
      return j["scheduler"].get<std::string>();
    }
  }
  *source = "default";
  return kDefaultScheduler;
}

namespace {
std::string EnvOr(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}
std::string SlurpFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ClientSecurity FromEnvironment() {
  ClientSecurity s;
  s.ca_file = EnvOr("ABLATE_CA");
  s.server_name = EnvOr("ABLATE_TLS_SERVER_NAME");
  s.token = EnvOr("ABLATE_TOKEN");
  if (s.token.empty()) s.token_file = EnvOr("ABLATE_TOKEN_FILE");
  s.source = s.ca_file.empty() ? "none" : "environment";
  return s;
}

// The first line of a token file, trimmed (jwt::ReadTokenFile, shared with the worker); false (and *why) when it
// is missing, empty, too large or has blanks or control characters inside. Never quotes the content.
bool ReadTokenLine(const std::string& path, std::string* token, std::string* why) {
  if (jwt::ReadTokenFile(path, token, nullptr, why)) return true;
  *why = "token file " + *why;
  return false;
}

// The explicit token sources, in order: --token_file, $ABLATE_TOKEN, $ABLATE_TOKEN_FILE. False when none is set.
bool ExplicitToken(const ClientSecurity& env, const std::string& flag_file, ClientSecurity* s) {
  std::string file = flag_file;
  if (file.empty() && !env.token.empty()) {
    s->token = env.token;
    return true;
  }
  if (file.empty()) file = env.token_file;
  if (file.empty()) return false;
  s->token_file = file;
  if (!ReadTokenLine(file, &s->token, &s->warning)) s->token.clear();
  return true;
}

std::mutex g_security_mu;
std::unique_ptr<ClientSecurity> g_security;  // null: the environment's

ClientSecurity Current() {
  std::lock_guard<std::mutex> l(g_security_mu);
  return g_security ? *g_security : FromEnvironment();
}
}  // namespace

ClientSecurity ResolveClientSecurity(const std::string& address, const std::string& state_dir,
                                     const std::string& token_file) {
  const ClientSecurity env = FromEnvironment();
  ClientSecurity plain = env;
  plain.token.clear();
  plain.token_file.clear();
  ExplicitToken(env, token_file, &plain);
  if (env.tls()) return plain;
  const std::string path = state_dir + "/stack.json";
  std::ifstream in(path);
  if (!in) return plain;
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("scheduler", "") != address || !j.contains("tls") ||
      !j["tls"].is_object()) {
    return plain;
  }
  const auto& t = j["tls"];
  ClientSecurity s;
  s.ca_file = t.value("ca", "");
  s.server_name = t.value("server_name", "");
  s.source = path;
  if (ExplicitToken(env, token_file, &s)) return s;
  if (std::string key = t.value("token_signing_key", ""); !key.empty()) {
    // `ablate up`'s signing key: a fresh short-lived token for every call (cli/token.h).
    s.signing_key_file = key;
    std::string probe, err;
    if (!MintLocalToken(key, &probe, &err)) s.warning = "cannot use the local stack's token signing key: " + err;
    return s;
  }
  if (std::string tf = t.value("token_file", ""); !tf.empty()) {
    std::string why;
    if (!ReadTokenLine(tf, &s.token, &why)) {
      s.token.clear();
      s.warning = "cannot read the local stack's token file " + tf + " (named in " + path + ")";
    }
  }
  return s;
}

std::string CallToken(const ClientSecurity& s, std::string* warning) {
  if (!s.signing_key_file.empty()) {
    std::string token, err;
    if (MintLocalToken(s.signing_key_file, &token, &err)) return token;
    if (warning) *warning = "cannot mint a token with " + s.signing_key_file + ": " + err;
    return "";
  }
  if (s.token_file.empty()) return s.token;
  // Re-read when the file changed (mtime, size or inode); a file that cannot be used keeps the last good token.
  static std::mutex mu;
  static std::map<std::string, std::pair<std::string, std::string>> cache;  // path -> (signature, token)
  struct stat st {};
  std::string sig;
  if (::stat(s.token_file.c_str(), &st) == 0) {
    sig = std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + "/" +
          std::to_string(st.st_size) + "/" + std::to_string(st.st_ino);
  }
  std::lock_guard<std::mutex> l(mu);
  auto it = cache.find(s.token_file);
  if (it != cache.end() && !sig.empty() && it->second.first == sig) return it->second.second;
  std::string token, why;
  if (!sig.empty() && ReadTokenLine(s.token_file, &token, &why)) {
    cache[s.token_file] = {sig, token};
    return token;
  }
  if (warning) *warning = why.empty() ? "token file " + s.token_file + ": not a readable file" : why;
  if (it != cache.end()) return it->second.second;
  return s.token;
}

void UseClientSecurity(const ClientSecurity& s) {
  std::lock_guard<std::mutex> l(g_security_mu);
  g_security = std::make_unique<ClientSecurity>(s);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, const ClientSecurity& sec) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);  // the scheduler decides what is too large, and says so
  if (sec.tls()) {
    if (!sec.server_name.empty()) args.SetSslTargetNameOverride(sec.server_name);
    if (SlurpFile(sec.ca_file).find("-----BEGIN ") != std::string::npos) {
      // The CA bundle is watched: a call made after a CA rotation (e.g. during a long --wait) trusts the new one.
      auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(sec.ca_file, 60);
      grpc::experimental::TlsChannelCredentialsOptions o;
      o.set_certificate_provider(provider);
      o.watch_root_certs();
      if (auto creds = grpc::experimental::TlsCredentials(o)) return grpc::CreateCustomChannel(address, creds, args);
    }
    grpc::SslCredentialsOptions o;  // unreadable CA: the handshake fails and says so
    o.pem_root_certs = SlurpFile(sec.ca_file);
    return grpc::CreateCustomChannel(address, grpc::SslCredentials(o), args);
  }
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address) { return MakeChannel(address, Current()); }

std::shared_ptr<grpc::Channel> OpenSchedulerChannel(const std::string& flag, const std::string& state_dir,
                                                    std::string* address, const std::string& token_file) {
  std::string source;
  *address = ResolveSchedulerAddress(flag, state_dir, &source);
  ClientSecurity sec = ResolveClientSecurity(*address, state_dir, token_file);
  if (!sec.warning.empty()) std::cerr << "warning: " << sec.warning << "\n";
  UseClientSecurity(sec);
  return MakeChannel(*address, sec);
}

Health CheckHealth(const std::shared_ptr<grpc::Channel>& channel, std::chrono::milliseconds timeout,
                   std::string* error) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::ByteBuffer request, response;  // HealthCheckRequest{service: ""} encodes to zero bytes
  grpc::Slice empty;
  request = grpc::ByteBuffer(&empty, 1);
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) {
                   std::lock_guard<std::mutex> lk(mu);
                   status = std::move(s);
                   done = true;
                   cv.notify_all();
                 });
  {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return done; });
  }
  if (!status.ok()) {
    *error = status.error_message();
    return status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                   status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED
               ? Health::kUnreachable
               : Health::kNotServing;
  }
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok())
    for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // HealthCheckResponse{status = 1 (enum)}: tag 0x08, varint; SERVING = 1.
  if (bytes.size() >= 2 && static_cast<unsigned char>(bytes[0]) == 0x08 && bytes[1] == 1) return Health::kServing;
  *error = "health status is not SERVING";
  return Health::kNotServing;
}

int ReportRpcError(const std::string& what, const grpc::Status& status, const std::string& address) {
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
      std::cerr << "error: cannot reach the scheduler at " << address << " (" << status.error_message()
                << "): is the stack up? try `ablate up`";
      if (!Current().tls())
        std::cerr << " (this call used plaintext: a scheduler with TLS, as `ablate up` starts it, needs $ABLATE_CA "
                     "or the stack's --state_dir)";
      std::cerr << "\n";
      return 1;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      std::cerr << "error: " << what << ": the scheduler at " << address
                << " did not answer in time: is the stack up? try `ablate up`\n";
      return 1;
    case grpc::StatusCode::INVALID_ARGUMENT:
      std::cerr << "error: " << status.error_message() << "\n";
      return 2;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      if (status.error_message().rfind("scheduler busy", 0) == 0) {
        std::cerr << "error: " << what << ": " << status.error_message() << "\n";
        return 1;
      }
      std::cerr << "error: " << what << ": request too large for the scheduler (" << status.error_message()
                << "): split the sweep into smaller files\n";
      return 1;
    case grpc::StatusCode::UNAUTHENTICATED:
      std::cerr << "error: " << what << ": not authenticated (" << status.error_message()
                << "): pass --token_file or set $ABLATE_TOKEN (and $ABLATE_CA for TLS); for a stack started by "
                   "`ablate up`, pass its --state_dir (the CLI then uses the stack's TLS settings and mints its own "
                   "token); an expired token needs a new one (`ablate token issue`)\n";
      return 1;
    case grpc::StatusCode::PERMISSION_DENIED:
      std::cerr << "error: " << what << ": permission denied: " << status.error_message() << "\n";
      return 1;
    case grpc::StatusCode::NOT_FOUND:
      std::cerr << "error: " << what << ": not found: " << status.error_message() << "\n";
      return 1;
    default:
      std::cerr << "error: " << what << " failed (" << static_cast<int>(status.error_code()) << "): "
                << status.error_message() << "\n";
      return 1;
  }
}

void AddAuth(grpc::ClientContext* ctx) {
  // A bearer token only ever travels over TLS.
  ClientSecurity s = Current();
  if (!s.tls()) return;
  std::string warning;
  std::string token = CallToken(s, &warning);
  static std::once_flag warned;
  if (!warning.empty()) std::call_once(warned, [&] { std::cerr << "warning: " << warning << "\n"; });
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

std::unique_ptr<grpc::ClientContext> CallContext(std::chrono::milliseconds timeout) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
  AddAuth(ctx.get());
  return ctx;
}

}  // namespace ablate::cli
