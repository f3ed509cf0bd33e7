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

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address);

enum class Health { kServing, kNotServing, kUnreachable };
// grpc.health.v1.Health/Check for the whole server (service ""), via the generic stub: the health proto's
// generated stubs are not shipped with Debian's gRPC, and the messages are two varints.
Health CheckHealth(const std::shared_ptr<grpc::Channel>& channel, std::chrono::milliseconds timeout,
                   std::string* error);

// Prints a failed call to stderr in words and returns the exit code: 2 for INVALID_ARGUMENT (the scheduler's
// message names the field), 1 otherwise; an unreachable scheduler gets the "is the stack up?" hint.
int ReportRpcError(const std::string& what, const grpc::Status& status, const std::string& address);

// Adds `authorization: Bearer $ABLATE_TOKEN` when TLS is on ($ABLATE_CA); never over plaintext.
void AddAuth(grpc::ClientContext* ctx);
// A deadline'd context for one unary call (with the bearer token, see AddAuth).
std::unique_ptr<grpc::ClientContext> CallContext(std::chrono::milliseconds timeout = std::chrono::seconds(15));

}  // namespace ablate::cli
