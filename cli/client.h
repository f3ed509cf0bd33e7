// How the CLI reaches the scheduler: address resolution, channel, health check, gRPC error -> message + exit code.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>

namespace ablate::cli {

constexpr const char* kDefaultScheduler = "127.0.0.1:50051";

// --scheduler flag, else $ABLATE_SCHEDULER, else "scheduler" of <state_dir>/stack.json, else 127.0.0.1:50051.
// *source says which one won ("--scheduler", "ABLATE_SCHEDULER", "<path>", "default").
std::string ResolveSchedulerAddress(const std::string& flag, const std::string& state_dir, std::string* source);

// How the CLI secures its calls. TLS when ca_file is set; the bearer token is sent only then.
struct ClientSecurity {
  std::string ca_file;      // PEM CA (bundle) of the scheduler certificate; empty: plaintext
  std::string server_name;  // name expected in the scheduler certificate (empty: the host of the address)
  std::string token;        // bearer token (never printed); with token_file: what it held when last read
  std::string token_file;   // re-read before a call when it changed (an external refresher may rotate it)
  std::string signing_key_file;  // the local stack's key: a fresh short-lived token is minted for every call
  std::string source;       // where the settings came from, for messages: "environment", "<path>", "none"
  std::string warning;      // e.g. an unreadable token file
  bool tls() const { return !ca_file.empty(); }
};

// TLS: $ABLATE_CA ($ABLATE_TLS_SERVER_NAME) when set; else, when `address` is the scheduler of the local stack in
// <state_dir>/stack.json and `ablate up` started it with TLS, that stack's CA and server name; else plaintext.
// The token, first found: `token_file` (--token_file), $ABLATE_TOKEN, $ABLATE_TOKEN_FILE; then, for the local
// stack only, a token minted per call from its signing key ("token_signing_key"), else its static token file.
ClientSecurity ResolveClientSecurity(const std::string& address, const std::string& state_dir,
                                     const std::string& token_file = "");
// The bearer token for the next call (see ClientSecurity); empty when there is none. *warning (optional) says why
// a token file or key could not be used (the previous token is kept).
std::string CallToken(const ClientSecurity& s, std::string* warning = nullptr);
// The settings MakeChannel(address) and AddAuth use from now on (default: the environment's).
void UseClientSecurity(const ClientSecurity& s);

// What every command does first: the address (ResolveSchedulerAddress), its security (ResolveClientSecurity,
// made current; a warning goes to stderr), and the channel.
std::shared_ptr<grpc::Channel> OpenSchedulerChannel(const std::string& flag, const std::string& state_dir,
                                                    std::string* address, const std::string& token_file = "");

// TLS channels watch the CA file (gRPC's file watcher, every 60 s): a long `--wait` follows a CA rotation.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address, const ClientSecurity& s);
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address);

enum class Health { kServing, kNotServing, kUnreachable };
// grpc.health.v1.Health/Check for the whole server (service ""), via the generic stub: the health proto's
// generated stubs are not shipped with Debian's gRPC, and the messages are two varints.
Health CheckHealth(const std::shared_ptr<grpc::Channel>& channel, std::chrono::milliseconds timeout,
                   std::string* error);

// Prints a failed call to stderr in words and returns the exit code: 2 for INVALID_ARGUMENT (the scheduler's
// message names the field), 1 otherwise; an unreachable scheduler gets the "is the stack up?" hint.
int ReportRpcError(const std::string& what, const grpc::Status& status, const std::string& address);

// Adds `authorization: Bearer <CallToken>` of the current ClientSecurity when it uses TLS; never over plaintext.
void AddAuth(grpc::ClientContext* ctx);
// A deadline'd context for one unary call (with the bearer token, see AddAuth).
std::unique_ptr<grpc::ClientContext> CallContext(std::chrono::milliseconds timeout = std::chrono::seconds(15));

}  // namespace ablate::cli
