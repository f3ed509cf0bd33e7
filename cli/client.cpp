#include "cli/client.h"

#include <grpcpp/generic/generic_stub.h>

#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <cctype>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

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
  s.source = s.ca_file.empty() ? "none" : "environment";
  return s;
}

std::mutex g_security_mu;
std::unique_ptr<ClientSecurity> g_security;  // null: the environment's

ClientSecurity Current() {
  std::lock_guard<std::mutex> l(g_security_mu);
  return g_security ? *g_security : FromEnvironment();
}
}  // namespace

ClientSecurity ResolveClientSecurity(const std::string& address, const std::string& state_dir) {
  ClientSecurity env = FromEnvironment();
  if (env.tls()) return env;
  const std::string path = state_dir + "/stack.json";
  std::ifstream in(path);
  if (!in) return env;
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object() || j.value("scheduler", "") != address || !j.contains("tls") ||
      !j["tls"].is_object()) {
    return env;
  }
  const auto& t = j["tls"];
  ClientSecurity s;
  s.ca_file = t.value("ca", "");
  s.server_name = t.value("server_name", "");
  s.source = path;
  if (!env.token.empty()) {
    s.token = env.token;
  } else if (std::string tf = t.value("token_file", ""); !tf.empty()) {
    std::ifstream tin(tf);
    std::getline(tin, s.token);
    while (!s.token.empty() && std::isspace(static_cast<unsigned char>(s.token.back()))) s.token.pop_back();
    if (s.token.empty()) s.warning = "cannot read the local stack's token file " + tf + " (named in " + path + ")";
  }
  return s;
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
    grpc::SslCredentialsOptions o;
    o.pem_root_certs = SlurpFile(sec.ca_file);
    if (!sec.server_name.empty()) args.SetSslTargetNameOverride(sec.server_name);
    return grpc::CreateCustomChannel(address, grpc::SslCredentials(o), args);
  }
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address) { return MakeChannel(address, Current()); }

std::shared_ptr<grpc::Channel> OpenSchedulerChannel(const std::string& flag, const std::string& state_dir,
                                                    std::string* address) {
  std::string source;
  *address = ResolveSchedulerAddress(flag, state_dir, &source);
  ClientSecurity sec = ResolveClientSecurity(*address, state_dir);
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
      std::cerr << "error: " << what << ": request too large for the scheduler (" << status.error_message()
                << "): split the sweep into smaller files\n";
      return 1;
    case grpc::StatusCode::UNAUTHENTICATED:
      std::cerr << "error: " << what << ": not authenticated (" << status.error_message()
                << "): set $ABLATE_TOKEN (and $ABLATE_CA for TLS); for a stack started by `ablate up`, pass its "
                   "--state_dir (the CLI then uses the stack's TLS settings and token)\n";
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
  if (s.tls() && !s.token.empty()) ctx->AddMetadata("authorization", "Bearer " + s.token);
}

std::unique_ptr<grpc::ClientContext> CallContext(std::chrono::milliseconds timeout) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
  AddAuth(ctx.get());
  return ctx;
}

}  // namespace ablate::cli
