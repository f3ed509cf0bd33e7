#include "cli/commands.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <vector>
#include <sys/stat.h>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <sstream>
#include <thread>

#include "ablate/v1/ablate.grpc.pb.h"
#include "cli/client.h"
#include "cli/pki.h"

namespace ablate::cli {
namespace {

using namespace std::chrono_literals;

struct Session {
  std::string address;
  std::unique_ptr<v1::SweepService::Stub> stub;
};

Session Open(const Conn& c) {
  Session s;
  s.stub = v1::SweepService::NewStub(OpenSchedulerChannel(c.scheduler_flag, c.state_dir, &s.address, c.token_file));
  return s;
}

// Redraws in place on a terminal; otherwise prints only when something changed (logs stay readable).
class WatchView {
 public:
  explicit WatchView(bool tty) : tty_(tty) {}
  void Show(const v1::SweepEvent& ev) {
    std::vector<v1::Job> jobs(ev.jobs().begin(), ev.jobs().end());
    if (tty_) {
      std::cout << "\x1b[H\x1b[2J" << SweepSummary(ev.sweep()) << "\n\n" << FormatJobs(jobs, true) << std::flush;
      return;
    }
    std::string summary = SweepSummary(ev.sweep());
    if (summary != last_summary_) {
      std::cout << summary << "\n" << std::flush;
      last_summary_ = summary;
    }
  }

 private:
  bool tty_;
  std::string last_summary_;
};

// Follows WatchSweep until the sweep is terminal; reconnects when the stream drops (scheduler restart).
// Returns 0 succeeded, 1 failed/cancelled/error; *final gets the last event.
int Watch(Session& s, int64_t sweep_id, v1::SweepEvent* final) {
  WatchView view(::isatty(STDOUT_FILENO));
  bool ever_connected = false;
  auto give_up_at = std::chrono::steady_clock::now() + 5min;
  for (int attempt = 0;; ++attempt) {
    grpc::ClientContext ctx;
    AddAuth(&ctx);
    // A watch is long-lived; the deadline only bounds one stream, which is then reopened.
    ctx.set_deadline(std::chrono::system_clock::now() + 10min);
    v1::WatchSweepRequest req;
    req.set_sweep_id(sweep_id);
    req.set_poll_interval_ms(1000);
    auto reader = s.stub->WatchSweep(&ctx, req);
    v1::SweepEvent ev;
    while (reader->Read(&ev)) {
      ever_connected = true;
      attempt = 0;
      give_up_at = std::chrono::steady_clock::now() + 5min;
      view.Show(ev);
      *final = ev;
      if (IsTerminal(ev.sweep().state())) {
        ctx.TryCancel();
        reader->Finish();
        std::vector<v1::Job> jobs(ev.jobs().begin(), ev.jobs().end());
        if (!::isatty(STDOUT_FILENO)) std::cout << FormatJobs(jobs, false);
        for (const auto& j : jobs)  // why each failed job failed (e.g. an unschedulable gang)
          if (j.state() == v1::JOB_STATE_FAILED && !j.last_error().empty())
            std::cout << "job " << j.id() << " failed: " << j.last_error() << "\n";
        return ev.sweep().state() == v1::SWEEP_STATE_SUCCEEDED ? 0 : 1;
      }
    }
    grpc::Status st = reader->Finish();
    const bool transient = st.ok() || st.error_code() == grpc::StatusCode::UNAVAILABLE ||
                           st.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!transient || (!ever_connected && !st.ok()) || std::chrono::steady_clock::now() > give_up_at)
      return ReportRpcError("WatchSweep", st, s.address);
    std::cerr << "watch: stream ended (" << (st.ok() ? "closed" : st.error_message()) << "), reconnecting\n";
    std::this_thread::sleep_for(std::min(500ms * (1 << std::min(attempt, 4)), std::chrono::milliseconds(8000)));
  }
}

}  // namespace

std::string SelfDir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  std::string p(buf, static_cast<size_t>(n));
  return p.substr(0, p.rfind('/'));
}

int CmdSubmit(const Conn& c, const std::string& file, bool wait, const std::string& idempotency_key, bool dry_run) {
  std::ifstream in(file);
  if (!in) {
    std::cerr << "error: cannot read " << file << "\n";
    return 1;
  }
  std::stringstream buf;
  buf << in.rdbuf();
  Session s = Open(c);
  v1::SubmitSweepRequest req;
  req.set_spec_yaml(buf.str());
  req.set_idempotency_key(idempotency_key);
  req.set_dry_run(dry_run);
  v1::SubmitSweepResponse resp;
  auto ctx = CallContext(30s);
  grpc::Status st = s.stub->SubmitSweep(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("SubmitSweep", st, s.address);
  std::vector<v1::Job> jobs(resp.jobs().begin(), resp.jobs().end());
  if (dry_run) {
    std::cout << "dry run: sweep '" << resp.sweep().name() << "' is valid, " << jobs.size()
              << " cells (nothing stored)\n";
  } else {
    const auto reused = std::count_if(jobs.begin(), jobs.end(), [](const v1::Job& j) { return j.reused_from_job_id() > 0; });
    std::cout << "sweep " << resp.sweep().id() << " '" << resp.sweep().name() << "' "
              << (resp.created() ? "created" : "already exists (same idempotency key)") << ": " << jobs.size()
              << " jobs";
    if (reused > 0) {
      std::cout << ", " << reused << " of them reused from earlier runs of the same config (not run again)";
    }
    std::cout << "\n";
  }
  std::cout << FormatCells(jobs);
  if (!wait || dry_run) return 0;
  v1::SweepEvent final;
  int rc = Watch(s, resp.sweep().id(), &final);
  if (!final.has_sweep()) return rc;
  int crc = CmdCompare(c, resp.sweep().id(), CompareFormat::kTable);
  return rc != 0 ? rc : crc;
}

int CmdStatus(const Conn& c, int64_t sweep_id, bool watch) {
  Session s = Open(c);
  if (sweep_id <= 0) {
    v1::ListSweepsRequest req;
    req.set_limit(50);
    v1::ListSweepsResponse resp;
    auto ctx = CallContext();
    grpc::Status st = s.stub->ListSweeps(ctx.get(), req, &resp);
    if (!st.ok()) return ReportRpcError("ListSweeps", st, s.address);
    if (resp.sweeps_size() == 0) {
      std::cout << "no sweeps yet: submit one with `ablate submit FILE`\n";
      return 0;
    }
    std::cout << FormatSweeps({resp.sweeps().begin(), resp.sweeps().end()});
    return 0;
  }
  if (watch) {
    v1::SweepEvent final;
    return Watch(s, sweep_id, &final);
  }
  v1::GetSweepRequest greq;
  greq.set_sweep_id(sweep_id);
  v1::Sweep sweep;
  auto ctx = CallContext();
  grpc::Status st = s.stub->GetSweep(ctx.get(), greq, &sweep);
  if (!st.ok()) return ReportRpcError("sweep " + std::to_string(sweep_id), st, s.address);
  v1::ListJobsRequest lreq;
  lreq.set_sweep_id(sweep_id);
  v1::ListJobsResponse jobs;
  auto ctx2 = CallContext();
  st = s.stub->ListJobs(ctx2.get(), lreq, &jobs);
  if (!st.ok()) return ReportRpcError("ListJobs", st, s.address);
  std::cout << SweepSummary(sweep) << "\n\n" << FormatJobs({jobs.jobs().begin(), jobs.jobs().end()}, true);
  for (const auto& j : jobs.jobs())
    if (j.state() == v1::JOB_STATE_FAILED && !j.last_error().empty())
      std::cout << "job " << j.id() << " failed: " << j.last_error() << "\n";
  return 0;
}

int CmdCompare(const Conn& c, int64_t sweep_id, CompareFormat format) {
  Session s = Open(c);
  v1::CompareSweepRequest req;
  req.set_sweep_id(sweep_id);
  v1::CompareSweepResponse resp;
  auto ctx = CallContext(30s);
  grpc::Status st = s.stub->CompareSweep(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("CompareSweep " + std::to_string(sweep_id), st, s.address);
  std::cout << FormatCompare(resp, format);
  return 0;
}

int CmdCancel(const Conn& c, int64_t sweep_id) {
  Session s = Open(c);
  v1::CancelSweepRequest req;
  req.set_sweep_id(sweep_id);
  v1::CancelSweepResponse resp;
  auto ctx = CallContext();
  grpc::Status st = s.stub->CancelSweep(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("CancelSweep " + std::to_string(sweep_id), st, s.address);
  std::cout << "sweep " << sweep_id << ": " << resp.jobs_cancelled()
            << " jobs cancelled (running ones stop at their next heartbeat)\n";
  return 0;
}

namespace {
bool ReadFile(const std::string& file, std::string* out) {
  std::ifstream in(file);
  if (!in) {
    std::cerr << "error: cannot read " << file << "\n";
    return false;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}
}  // namespace

int CmdExtend(const Conn& c, int64_t sweep_id, const std::string& file) {
  std::string spec;
  if (!ReadFile(file, &spec)) return 1;
  Session s = Open(c);
  v1::ExtendSweepRequest req;
  req.set_sweep_id(sweep_id);
  req.set_spec_yaml(spec);
  v1::ExtendSweepResponse resp;
  auto ctx = CallContext(30s);
  auto st = s.stub->ExtendSweep(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("extend", st, s.address);
  std::cout << "sweep " << sweep_id << ": " << resp.added() << " new cell(s) queued, " << resp.reused()
            << " reused from earlier results, " << resp.already_present() << " already in the sweep\n";
  return 0;
}

int CmdCancelJob(const Conn& c, int64_t job_id) {
  Session s = Open(c);
  v1::CancelJobRequest req;
  req.set_job_id(job_id);
  v1::CancelJobResponse resp;
  auto ctx = CallContext();
  auto st = s.stub->CancelJob(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("cancel job", st, s.address);
  std::cout << (resp.cancelled() ? "job " + std::to_string(job_id) + " cancelled (a running child stops at its next "
                                   "heartbeat)\n"
                                 : "job " + std::to_string(job_id) + " was already finished\n");
  return 0;
}

int CmdScheduleAdd(const Conn& c, const std::string& cron, const std::string& name, const std::string& file) {
  std::string spec;
  if (!ReadFile(file, &spec)) return 1;
  Session s = Open(c);
  v1::CreateScheduleRequest req;
  req.set_cron(cron);
  req.set_name(name);
  req.set_spec_yaml(spec);
  v1::Schedule resp;
  auto ctx = CallContext();
  auto st = s.stub->CreateSchedule(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("schedule add", st, s.address);
  std::time_t t = resp.next_due_unix_ms() / 1000;
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", std::gmtime(&t));
  std::cout << "schedule " << resp.id() << " (" << resp.name() << ", cron '" << resp.cron() << "'): next run " << buf
            << "\n";
  return 0;
}

int CmdScheduleList(const Conn& c) {
  Session s = Open(c);
  v1::ListSchedulesRequest req;
  v1::ListSchedulesResponse resp;
  auto ctx = CallContext();
  auto st = s.stub->ListSchedules(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("schedule list", st, s.address);
  std::cout << "ID  NAME  CRON  NEXT_DUE_UTC  FIRED  SKIPPED  LAST_SWEEP\n";
  for (const auto& x : resp.schedules()) {
    std::time_t t = x.next_due_unix_ms() / 1000;
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M", std::gmtime(&t));
    std::cout << x.id() << "  " << x.name() << "  '" << x.cron() << "'  " << buf << "  " << x.fired_count() << "  "
              << x.skipped_count() << "  " << x.last_sweep_id() << "\n";
  }
  return 0;
}

int CmdScheduleRm(const Conn& c, int64_t id) {
  Session s = Open(c);
  v1::DeleteScheduleRequest req;
  req.set_schedule_id(id);
  v1::DeleteScheduleResponse resp;
  auto ctx = CallContext();
  auto st = s.stub->DeleteSchedule(ctx.get(), req, &resp);
  if (!st.ok()) return ReportRpcError("schedule rm", st, s.address);
  std::cout << "schedule " << id << " deleted\n";
  return 0;
}

int CmdCerts(const std::string& out, const std::vector<std::string>& workers,
             const std::vector<std::string>& scheduler_names, const std::vector<std::string>& renew, int leaf_days) {
  PkiOptions o;
  o.workers = workers;
  o.scheduler_names = scheduler_names;
  o.renew = renew;
  o.leaf_days = leaf_days;
  PkiReport rep;
  std::string err;
  if (!EnsurePki(out, o, &rep, &err)) {
    std::cerr << "error: ablate certs: " << err << "\n";
    return 1;
  }
  auto join = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
    return s.empty() ? std::string("nothing") : s;
  };
  std::cout << "ablate certs: " << out << " (files 0600): made " << join(rep.made) << "; kept " << join(rep.kept)
            << "\n"
            << "  scheduler: --tls_cert " << out << "/scheduler.pem --tls_key " << out << "/scheduler-key.pem"
            << " --tls_client_ca " << out << "/ca.pem --token_signing_key_file " << out << "/token-signing.key"
            << " (legacy static tokens: --tokens_file " << out << "/tokens)\n"
            << "  worker W:  --tls_ca " << out << "/ca.pem and either --tls_cert " << out << "/W.pem --tls_key "
            << out << "/W-key.pem or --token_file FILE (ablate token issue --key " << out
            << "/token-signing.key --role worker --subject W --tenant T --out FILE)\n"
            << "  CLI:       ABLATE_CA=" << out << "/ca.pem ablate ... --token_file FILE (ablate token issue --key "
            << out << "/token-signing.key --role user --tenant T --out FILE)\n";
  return 0;
}

}  // namespace ablate::cli
