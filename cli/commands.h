// The ablate subcommands. Each returns the process exit code (0 ok, 1 error/unreachable, 2 rejected input).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cli/format.h"

namespace ablate::cli {

struct Conn {
  std::string scheduler_flag;  // --scheduler
  std::string state_dir = ".ablate";
  std::string token_file;      // --token_file ($ABLATE_TOKEN_FILE): re-read before each call when it changed
};

int CmdSubmit(const Conn& c, const std::string& file, bool wait, const std::string& idempotency_key, bool dry_run);
int CmdStatus(const Conn& c, int64_t sweep_id /* 0: list sweeps */, bool watch);
int CmdCompare(const Conn& c, int64_t sweep_id, CompareFormat format);
int CmdCancel(const Conn& c, int64_t sweep_id);
int CmdCancelJob(const Conn& c, int64_t job_id);
int CmdExtend(const Conn& c, int64_t sweep_id, const std::string& file);
int CmdScheduleAdd(const Conn& c, const std::string& cron, const std::string& name, const std::string& file);
int CmdScheduleList(const Conn& c);
int CmdScheduleRm(const Conn& c, int64_t id);
// Makes what is missing of the local PKI in `out` (cli/pki.h): CA, scheduler certificate, per-worker client
// certificates and tokens, user/admin tokens, the scheduler's tokens file, the token signing key. `renew`
// re-issues those leaves ("scheduler", worker ids); leaf_days is the validity of the leaves issued now.
int CmdCerts(const std::string& out, const std::vector<std::string>& workers,
             const std::vector<std::string>& scheduler_names = {}, const std::vector<std::string>& renew = {},
             int leaf_days = 365);

struct UpOptions {
  std::string state_dir = ".ablate";
  int workers = 1;
  std::string data_root = "data";
  int lease_ttl_s = 15;
  std::string bin_dir;  // where ablate-scheduler/-worker/-train live; default: next to this executable
  bool insecure = false;  // plaintext and no authentication (debugging); default: TLS with a local PKI in <state>/pki
};
int CmdUp(const UpOptions& o);
int CmdDown(const std::string& state_dir);

// Directory of the running executable (/proc/self/exe).
std::string SelfDir();

}  // namespace ablate::cli
