#include "worker/credentials.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/support/client_interceptor.h>
#include <openssl/crypto.h>

#include "scheduler/rpc/jwt.h"

namespace ablate::worker {
namespace {

bool Slurp(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

std::string FileSignature(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "";
  return std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + "/" +
         std::to_string(st.st_size) + "/" + std::to_string(st.st_ino);
}

// Call credentials: gRPC attaches them only on channels with privacy and integrity (TLS).
class BearerPlugin : public grpc::MetadataCredentialsPlugin {
 public:
  explicit BearerPlugin(std::shared_ptr<TokenSource> source) : source_(std::move(source)) {}
  bool IsBlocking() const override { return true; }  // may stat and read the token file
  const char* GetType() const override { return "ablate-bearer"; }
  grpc::Status GetMetadata(grpc::string_ref, grpc::string_ref, const grpc::AuthContext&,
                           std::multimap<grpc::string, grpc::string>* md) override {
    md->insert({"authorization", "Bearer " + source_->Get()});
    return grpc::Status::OK;
  }
  grpc::string DebugString() override { return "ablate bearer token (redacted)"; }

 private:
  std::shared_ptr<TokenSource> source_;
};

// --allow_insecure_token only: the same header on a plaintext channel (gRPC would drop call credentials there).
class BearerInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit BearerInterceptor(TokenSource* source) : source_(source) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* m) override {
    if (m->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      m->GetSendInitialMetadata()->insert({"authorization", "Bearer " + source_->Get()});
    }
    m->Proceed();
  }

 private:
  TokenSource* source_;
};

class BearerInterceptorFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerInterceptorFactory(std::shared_ptr<TokenSource> source) : source_(std::move(source)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new BearerInterceptor(source_.get());
  }

 private:
  std::shared_ptr<TokenSource> source_;  // lives as long as the channel, which owns this factory
};

}  // namespace

TokenSource::TokenSource(std::string path, std::string token)
    : path_(std::move(path)), token_(std::move(token)), sig_(FileSignature(path_)) {}

int TokenSource::reloads() const {
  std::lock_guard<std::mutex> l(mu_);
  return reloads_;
}

std::string TokenSource::Get() {
  std::lock_guard<std::mutex> l(mu_);
  if (path_.empty()) return token_;
  const std::string sig = FileSignature(path_);
  if (sig == sig_ || sig == bad_sig_) return token_;
  std::string token, warning, error;
  if (sig.empty() || !ReadTokenFile(path_, &token, &warning, &error)) {
    // Keep the last good token; say so once per state of the file.
    bad_sig_ = sig;
    std::fprintf(stderr, "warning: %s; keeping the previous token\n",
                 error.empty() ? ("--token_file " + path_ + ": not a readable file").c_str() : error.c_str());
    return token_;
  }
  sig_ = sig;
  bad_sig_.clear();
  if (token != token_) {
    token_ = std::move(token);
    ++reloads_;
    std::fprintf(stderr, "--token_file %s changed: using the new token from now on\n", path_.c_str());
  }
  return token_;
}

bool ReadTokenFile(const std::string& path, std::string* token, std::string* warning, std::string* error) {
  std::string warn;
  if (!jwt::ReadTokenFile(path, token, &warn, error)) {
    *error = "--token_file " + *error;
    return false;
  }
  if (!warn.empty()) *warning = "--token_file " + warn;
  return true;
}

std::shared_ptr<grpc::Channel> BuildSchedulerChannel(const SchedulerConnection& c, grpc::ChannelArguments args,
                                                     std::string* auth, std::string* error) {
  std::string token;
  if (!c.token_file.empty()) {
    if (c.tls_ca.empty() && !c.allow_insecure_token) {
      *error = "--token_file needs TLS (--tls_ca): a bearer token is never sent over a plaintext connection; "
               "pass --allow_insecure_token only when a TLS-terminating proxy sits between this worker and the "
               "scheduler";
      return nullptr;
    }
    std::string warning;
    if (!ReadTokenFile(c.token_file, &token, &warning, error)) return nullptr;
    if (!warning.empty()) std::fprintf(stderr, "warning: %s\n", warning.c_str());
  }
  if (c.tls_ca.empty() && (!c.tls_cert.empty() || !c.tls_key.empty())) {
    *error = "--tls_cert/--tls_key need --tls_ca";
    return nullptr;
  }
  if (c.tls_cert.empty() != c.tls_key.empty()) {
    *error = "--tls_cert and --tls_key go together";
    return nullptr;
  }
  if (c.tls_reload_interval_s < 0) {
    *error = "--tls_reload_interval_s: must be >= 0";
    return nullptr;
  }
  auto source = token.empty() ? nullptr : std::make_shared<TokenSource>(c.token_file, token);
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (!c.tls_ca.empty()) {
    grpc::SslCredentialsOptions so;
    if (!Slurp(c.tls_ca, &so.pem_root_certs)) {
      *error = "--tls_ca " + c.tls_ca + ": cannot read";
      return nullptr;
    }
    if (!c.tls_cert.empty() && (!Slurp(c.tls_cert, &so.pem_cert_chain) || !Slurp(c.tls_key, &so.pem_private_key))) {
      *error = "--tls_cert/--tls_key: cannot read";
      return nullptr;
    }
    if (c.tls_reload_interval_s > 0) {
      // gRPC's file watcher: the CA bundle and the client certificate are re-read every interval, and new
      // connections (a reconnect after a scheduler restart or a network blip) use what it read last.
      const auto interval = static_cast<unsigned int>(c.tls_reload_interval_s);
      auto provider = c.tls_cert.empty()
                          ? std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(c.tls_ca, interval)
                          : std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
                                c.tls_key, c.tls_cert, c.tls_ca, interval);
      grpc::experimental::TlsChannelCredentialsOptions to;
      to.set_certificate_provider(provider);
      to.watch_root_certs();
      if (!c.tls_cert.empty()) to.watch_identity_key_cert_pairs();
      creds = grpc::experimental::TlsCredentials(to);
      if (!creds) {
        *error = "cannot make the TLS channel credentials";
        return nullptr;
      }
    } else {
      creds = grpc::SslCredentials(so);
    }
    OPENSSL_cleanse(so.pem_private_key.data(), so.pem_private_key.size());
    if (!c.tls_server_name.empty()) args.SetSslTargetNameOverride(c.tls_server_name);
    *auth = c.tls_cert.empty() ? "tls" : "mtls";
    if (source) {
      creds = grpc::CompositeChannelCredentials(
          creds, grpc::MetadataCredentialsFromPlugin(std::make_unique<BearerPlugin>(source)));
      *auth += "+token";
    }
  } else {
    creds = grpc::InsecureChannelCredentials();
    *auth = token.empty() ? "plaintext" : "plaintext+token (--allow_insecure_token)";
  }
  OPENSSL_cleanse(token.data(), token.size());
  if (source && c.tls_ca.empty()) {
    std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> f;
    f.push_back(std::make_unique<BearerInterceptorFactory>(source));
    return grpc::experimental::CreateCustomChannelWithInterceptors(c.target, creds, args, std::move(f));
  }
  return grpc::CreateCustomChannel(c.target, creds, args);
}

}  // namespace ablate::worker
