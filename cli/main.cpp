// ablate: the command line for people. Talks to ablate-scheduler over gRPC; `up`/`down` run a local stack.
#include <CLI/CLI.hpp>
#include <iostream>
#include <sstream>
#include <vector>

#include "cli/commands.h"
#include "cli/report.h"
#include "cli/token.h"

int main(int argc, char** argv) {
  using namespace ablate::cli;
  CLI::App app{"ablate: run LLM ablation sweeps.\n"
               "Scheduler address: --scheduler, else $ABLATE_SCHEDULER, else <state_dir>/stack.json (written by "
               "`ablate up`), else 127.0.0.1:50051.\n"
               "TLS: $ABLATE_CA (CA of the scheduler certificate; $ABLATE_TLS_SERVER_NAME), else, for the scheduler "
               "of <state_dir>/stack.json, that stack's CA; else plaintext (a token is never sent without TLS).\n"
               "Token: --token_file (re-read when it changes), $ABLATE_TOKEN, $ABLATE_TOKEN_FILE; else, for the "
               "local stack, a short-lived token minted for each call from its signing key (`ablate token issue` "
               "makes one by hand)."};
  app.require_subcommand(1);
  Conn conn;
  // Every subcommand takes these, so that `--help` of each one lists them.
  auto add_conn = [&](CLI::App* sub) {
    sub->add_option("--scheduler", conn.scheduler_flag, "Scheduler gRPC address HOST:PORT");
    sub->add_option("--state_dir", conn.state_dir, "Local stack state directory (for stack.json)")
        ->capture_default_str();
    sub->add_option("--token_file", conn.token_file,
                    "File whose first line is the bearer token (signed, from `ablate token issue`, or a legacy "
                    "static one); re-read before each call when it changed")
        ->envname("ABLATE_TOKEN_FILE");
  };
  int rc = 0;

  UpOptions up;
  auto* up_cmd = app.add_subcommand(
      "up",
      "Start a local stack: private PostgreSQL in <state_dir>/pg (unix socket), ablate-scheduler, N ablate-worker "
      "daemons (logs in <state_dir>/logs), with TLS and authentication (certificates and tokens in "
      "<state_dir>/pki; --insecure for plaintext); prepares <data_root>/fortunes if missing; writes "
      "<state_dir>/stack.json, which the other commands read for the address and the TLS settings. "
      "Binaries are taken from the directory of this executable. Does nothing if the stack is already up.");
  up_cmd->add_option("--state_dir", up.state_dir, "State directory")->capture_default_str();
  up_cmd->add_option("--workers", up.workers, "Number of worker daemons")->capture_default_str()->check(
      CLI::Range(0, 64));
  up_cmd->add_option("--data_root", up.data_root, "Directory of prepared datasets")->capture_default_str();
  up_cmd->add_option("--lease_ttl_s", up.lease_ttl_s, "Scheduler lease TTL in seconds")->capture_default_str()->check(
      CLI::PositiveNumber);
  up_cmd->add_option("--bin_dir", up.bin_dir, "Where ablate-scheduler/ablate-worker/ablate-train are (default: "
                                              "the directory of this executable)");
  up_cmd->add_flag("--insecure", up.insecure,
                   "Plaintext gRPC without authentication, for debugging (default: TLS; the first start makes a "
                   "local CA, the scheduler's and the workers' certificates and tokens in <state_dir>/pki, files "
                   "0600; the CLI finds them through <state_dir>/stack.json)");
  up_cmd->callback([&] { rc = CmdUp(up); });

  std::string down_state = ".ablate";
  auto* down_cmd = app.add_subcommand(
      "down", "Stop the local stack: workers and scheduler (SIGTERM, then SIGKILL), then PostgreSQL "
              "(pg_ctl stop -m fast). Data and logs are kept.");
  down_cmd->add_option("--state_dir", down_state, "State directory")->capture_default_str();
  down_cmd->callback([&] { rc = CmdDown(down_state); });

  std::string file, key;
  bool wait = false, dry_run = false;
  auto* submit = app.add_subcommand(
      "submit", "Submit a sweep file (YAML, docs/contracts.md §1); prints the sweep id and its cells. "
                "Exit 2 when the scheduler rejects the file (the message names the field).");
  submit->add_option("FILE", file, "Sweep file")->required()->check(CLI::ExistingFile);
  submit->add_flag("--wait", wait, "Follow progress until the sweep is done, then print the comparison "
                                   "(exit 0 only if every job succeeded)");
  submit->add_option("--idempotency_key", key, "Same key + same spec returns the existing sweep "
                                               "(default: a hash of the normalized spec)");
  submit->add_flag("--dry_run", dry_run, "Validate and expand only; nothing is stored");
  add_conn(submit);
  submit->callback([&] { rc = CmdSubmit(conn, file, wait, key, dry_run); });

  int64_t sweep = 0;
  bool watch = false;
  auto* status = app.add_subcommand(
      "status", "Without SWEEP: list sweeps (id, name, state, job counts). With SWEEP: one row per job (factors, "
                "state, attempt, step/total, latest train loss, eval loss, tokens/s).");
  status->add_option("SWEEP", sweep, "Sweep id");
  status->add_flag("--watch", watch, "With SWEEP: follow live progress until the sweep is terminal "
                                     "(exit 0 only if every job succeeded)");
  add_conn(status);
  status->callback([&] {
    if (watch && sweep <= 0) {
      std::cerr << "error: --watch needs a SWEEP id\n";
      rc = 2;
      return;
    }
    rc = CmdStatus(conn, sweep, watch);
  });

  auto* list = app.add_subcommand("list", "List sweeps (same as `ablate status` without SWEEP)");
  add_conn(list);
  list->callback([&] { rc = CmdStatus(conn, 0, false); });

  int64_t cmp_sweep = 0;
  std::string format = "table";
  auto* compare = app.add_subcommand(
      "compare", "One row per cell: the varying factors, final train loss, eval loss, perplexity, tokens/s, peak "
                 "memory.");
  compare->add_option("SWEEP", cmp_sweep, "Sweep id")->required();
  compare->add_option("--format", format, "Output format")
      ->capture_default_str()
      ->check(CLI::IsMember({"table", "csv", "json"}));
  add_conn(compare);
  compare->callback([&] {
    CompareFormat f = format == "csv" ? CompareFormat::kCsv
                      : format == "json" ? CompareFormat::kJson
                                         : CompareFormat::kTable;
    rc = CmdCompare(conn, cmp_sweep, f);
  });

  int64_t cancel_sweep = 0;
  auto* cancel = app.add_subcommand("cancel", "Cancel a sweep: queued jobs are cancelled, running ones are stopped "
                                              "by their workers");
  cancel->add_option("SWEEP", cancel_sweep, "Sweep id")->required();
  add_conn(cancel);
  cancel->callback([&] { rc = CmdCancel(conn, cancel_sweep); });

  int64_t report_sweep = 0;
  std::string report_out = "report.html";
  auto* report = app.add_subcommand(
      "report", "Write a self-contained HTML report of a sweep: the cells, a table per factor, and the train/eval "
                "loss curves of every run as inline SVG (opens in any browser, no network needed).");
  report->add_option("SWEEP", report_sweep, "Sweep id")->required();
  report->add_option("--out", report_out, "Output file")->capture_default_str();
  add_conn(report);
  report->callback([&] { rc = CmdReport(conn, report_sweep, report_out); });

  int64_t cancel_job = 0;
  auto* cancel_job_cmd = app.add_subcommand("cancel-job", "Cancel one job: queued -> cancelled; a running child is "
                                                          "stopped by its worker within a heartbeat");
  cancel_job_cmd->add_option("JOB", cancel_job, "Job id")->required();
  add_conn(cancel_job_cmd);
  cancel_job_cmd->callback([&] { rc = CmdCancelJob(conn, cancel_job); });

  int64_t ext_sweep = 0;
  std::string ext_file;
  auto* extend = app.add_subcommand(
      "extend", "Add the cells of an extended grid to a sweep: cells already in it are skipped, cells whose config "
                "already succeeded anywhere are reused (not run again); only new cells are queued.");
  extend->add_option("SWEEP", ext_sweep, "Sweep id")->required();
  extend->add_option("FILE", ext_file, "Sweep file with the extended grid")->required()->check(CLI::ExistingFile);
  add_conn(extend);
  extend->callback([&] { rc = CmdExtend(conn, ext_sweep, ext_file); });

  auto* schedule = app.add_subcommand("schedule", "Cron schedules (UTC) that submit a sweep file on every due time");
  schedule->require_subcommand(1);
  std::string cron, sched_name, sched_file;
  auto* sadd = schedule->add_subcommand(
      "add", "Add a schedule: --cron '0 2 * * *' FILE (nightly at 02:00 UTC). Each due time fires exactly once, "
             "across restarts and replicas; when several were missed while the scheduler was down, only the latest "
             "fires and the others are counted as skipped.");
  sadd->add_option("--cron", cron, "5-field cron expression, UTC (or @daily, @weekly, ...)")->required();
  sadd->add_option("--name", sched_name, "Name (default: the sweep's)");
  sadd->add_option("FILE", sched_file, "Sweep file")->required()->check(CLI::ExistingFile);
  add_conn(sadd);
  sadd->callback([&] { rc = CmdScheduleAdd(conn, cron, sched_name, sched_file); });
  auto* slist = schedule->add_subcommand("list", "List schedules");
  add_conn(slist);
  slist->callback([&] { rc = CmdScheduleList(conn); });
  int64_t sched_id = 0;
  auto* srm = schedule->add_subcommand("rm", "Delete a schedule");
  srm->add_option("ID", sched_id, "Schedule id")->required();
  add_conn(srm);
  srm->callback([&] { rc = CmdScheduleRm(conn, sched_id); });

  std::string certs_out = ".ablate/pki", certs_workers, certs_names, certs_renew;
  int certs_leaf_days = 365;
  auto* certs = app.add_subcommand(
      "certs", "Make a local CA, the scheduler's certificate, per-worker client certificates (CN = worker id) and "
               "bearer tokens (<worker>.token, user.token, admin.token), and the scheduler's --tokens_file (digests "
               "only). Files are 0600; what exists and is still valid is kept (delete a file to re-issue it); keys "
               "and tokens are never printed. `ablate up` does this by itself in <state_dir>/pki.");
  certs->add_option("--out", certs_out, "Directory")->capture_default_str();
  certs->add_option("--workers", certs_workers, "Comma list of worker ids");
  certs->add_option("--scheduler_names", certs_names,
                    "Comma list of extra DNS names / IP addresses for the scheduler certificate (always: localhost, "
                    "127.0.0.1, ::1)");
  certs->add_option("--renew", certs_renew,
                    "Comma list of leaves to re-issue now, even if still good: 'scheduler' and/or worker ids (new "
                    "key and serial, same CA; a scheduler and workers running with --tls_reload_interval_s pick the "
                    "replaced files up without a restart)");
  certs->add_option("--leaf_days", certs_leaf_days,
                    "Validity in days of the leaf certificates issued by this run; a negative number issues an "
                    "already expired one (notAfter that many days ago), for testing expiry handling")
      ->capture_default_str();
  certs->callback([&] {
    auto split = [](const std::string& s) {
      std::vector<std::string> v;
      std::stringstream ss(s);
      for (std::string x; std::getline(ss, x, ',');)
        if (!x.empty()) v.push_back(x);
      return v;
    };
    rc = CmdCerts(certs_out, split(certs_workers), split(certs_names), split(certs_renew), certs_leaf_days);
  });

  auto* token = app.add_subcommand(
      "token", "Signed short-lived bearer tokens (JWS HS256): the scheduler accepts them with "
               "--token_signing_key_file, checks their expiry and refuses the ids in --revoked_tokens_file");
  token->require_subcommand(1);
  TokenIssueOptions ti;
  auto* issue = token->add_subcommand(
      "issue", "Print a token (or write it to --out, 0600) for --role user|admin|worker in --tenant, valid --ttl "
               "(default 1h, at most 24h without --allow_long_ttl); its id (jti) and expiry go to stderr");
  issue->add_option("--tenant", ti.tenant, "Tenant claim")->required();
  issue->add_option("--role", ti.role, "user, admin or worker")
      ->required()->check(CLI::IsMember({"user", "admin", "worker"}));
  issue->add_option("--ttl", ti.ttl, "Lifetime: 90s, 15m, 1h, 2d")->capture_default_str();
  issue->add_option("--key", ti.key_file, "Signing key file (the scheduler's --token_signing_key_file; default: the "
                                          "local stack's in <state_dir>/pki)");
  issue->add_option("--state_dir", ti.state_dir, "Local stack state directory (for its signing key)")
      ->capture_default_str();
  issue->add_option("--subject", ti.subject, "Subject: a person's name (default $USER), or for role worker the "
                                             "worker id (required)");
  issue->add_option("--out", ti.out, "Write the token to this file (0600, atomically: a running worker or CLI "
                                     "with --token_file picks the new one up) instead of printing it");
  issue->add_option("--backdate", ti.backdate, "Shift the validity this far into the past (clock-skew and expiry "
                                               "tests; --ttl 1m --backdate 2h is an expired token)");
  issue->add_flag("--allow_long_ttl", ti.allow_long_ttl, "Allow --ttl over 24h");
  issue->callback([&] { rc = CmdTokenIssue(ti); });
  std::string keygen_out;
  bool keygen_force = false;
  auto* keygen = token->add_subcommand(
      "keygen", "Write a new signing key (32 random bytes as 64 hex digits, file 0600) for the scheduler's "
                "--token_signing_key_file");
  keygen->add_option("--out", keygen_out, "Key file")->required();
  keygen->add_flag("--force", keygen_force, "Replace an existing key (every token it signed stops working)");
  keygen->callback([&] { rc = CmdTokenKeygen(keygen_out, keygen_force); });

  CLI11_PARSE(app, argc, argv);
  return rc;
}
