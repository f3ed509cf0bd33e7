// ablate-cp-load: load generator for the control-plane benchmarks O1-O6 (bench/control-plane/run.sh).
// Simulated workers speak the real WorkerService API to a running ablate-scheduler. Prints key=value lines.
//   submit  ADDR YAML                         O1: one SubmitSweep, timed
//   cancel  ADDR SWEEP_ID
//   lease   ADDR WORKERS MAX_CYCLES SECONDS K O2: lease -> heartbeat xK -> complete, per worker, until either limit
//   metrics ADDR STREAMS BATCHES BATCH        O3: one leased job per stream, ReportMetrics batches
//   hb      ADDR WORKERS INTERVAL_MS SECONDS  O4/O5: each worker holds one lease and heartbeats every interval
//   hold    ADDR WORKER                       O6: lease one job, print job=ID, heartbeat every second forever
//   reclaim ADDR WORKER ID,ID,...             O6: lease until every listed job came back; prints job=ID t_ms=...
// With SCHED_PID set, modes that run a while also report the scheduler's CPU seconds and RSS (sampled 1/s).
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <unistd.h>
#include <vector>

#include "ablate/v1/ablate.grpc.pb.h"

using namespace ablate;
using Clock = std::chrono::steady_clock;

namespace {

std::shared_ptr<grpc::Channel> Chan(const std::string& addr, int idx = 0) {
  grpc::ChannelArguments a;
  a.SetMaxSendMessageSize(64 << 20);
  a.SetMaxReceiveMessageSize(512 << 20);
  a.SetInt("bench.channel_idx", idx);  // distinct args: a separate connection per channel index
  return grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), a);
}

double Secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

double Pct(std::vector<double> v, double p) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

// Scheduler CPU (utime+stime, seconds) and RSS (kB) from /proc.
struct ProcSample { double cpu_s = 0; long rss_kb = 0; };
ProcSample Sample(int pid) {
  ProcSample s;
  if (pid <= 0) return s;
  std::ifstream st("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(st, line);
  auto rp = line.rfind(')');
  if (rp != std::string::npos) {
    std::istringstream in(line.substr(rp + 2));
    std::string f;
    std::vector<std::string> fs;
    while (in >> f) fs.push_back(f);
    if (fs.size() > 13) s.cpu_s = (std::stod(fs[11]) + std::stod(fs[12])) / sysconf(_SC_CLK_TCK);
  }
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) s.rss_kb = std::stol(line.substr(6));
  }
  return s;
}

struct Monitor {
  int pid = 0;
  std::atomic<bool> stop{false};
  std::thread th;
  ProcSample start, end;
  long rss_max = 0;
  std::vector<long> rss;
  Clock::time_point t0, t1;
  void Start() {
    const char* p = getenv("SCHED_PID");
    pid = p ? atoi(p) : 0;
    t0 = Clock::now();
    start = Sample(pid);
    th = std::thread([this] {
      while (!stop) {
        auto s = Sample(pid);
        rss.push_back(s.rss_kb);
        rss_max = std::max(rss_max, s.rss_kb);
        for (int i = 0; i < 10 && !stop; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }
  void Stop() {
    stop = true;
    th.join();
    t1 = Clock::now();
    end = Sample(pid);
    if (pid <= 0) return;
    double wall = Secs(t0, t1);
    printf("sched_cpu_cores=%.3f\nsched_rss_start_mb=%.1f\nsched_rss_end_mb=%.1f\nsched_rss_max_mb=%.1f\n",
           (end.cpu_s - start.cpu_s) / wall, start.rss_kb / 1024.0, end.rss_kb / 1024.0, rss_max / 1024.0);
  }
};

struct Worker {
  std::unique_ptr<v1::WorkerService::Stub> stub;
  std::string id;
  v1::Lease lease;
  int64_t job = 0;
  explicit Worker(std::shared_ptr<grpc::Channel> ch, std::string wid) : stub(v1::WorkerService::NewStub(ch)), id(wid) {}
  bool Register() {
    grpc::ClientContext c;
    v1::RegisterWorkerRequest r;
    r.set_worker_id(id);
    r.set_hostname("bench");
    r.set_version("bench");
    v1::RegisterWorkerResponse resp;
    auto s = stub->RegisterWorker(&c, r, &resp);
    if (!s.ok()) fprintf(stderr, "register %s: %s\n", id.c_str(), s.error_message().c_str());
    return s.ok();
  }
  // 1: leased, 0: nothing, -1: error
  int Lease() {
    grpc::ClientContext c;
    v1::LeaseJobRequest r;
    r.set_worker_id(id);
    v1::LeaseJobResponse resp;
    auto s = stub->LeaseJob(&c, r, &resp);
    if (!s.ok()) { fprintf(stderr, "lease %s: %s\n", id.c_str(), s.error_message().c_str()); return -1; }
    if (!resp.job_available()) return 0;
    lease = resp.lease();
    job = resp.job().id();
    return 1;
  }
  bool Heartbeat(int64_t step) {
    grpc::ClientContext c;
    v1::HeartbeatRequest r;
    r.set_worker_id(id);
    *r.mutable_lease() = lease;
    r.set_step(step);
    v1::HeartbeatResponse resp;
    auto s = stub->Heartbeat(&c, r, &resp);
    if (!s.ok()) fprintf(stderr, "heartbeat %s: %s\n", id.c_str(), s.error_message().c_str());
    return s.ok();
  }
  bool Complete() {
    grpc::ClientContext c;
    v1::CompleteJobRequest r;
    r.set_worker_id(id);
    *r.mutable_lease() = lease;
    r.set_outcome(v1::OUTCOME_SUCCEEDED);
    v1::CompleteJobResponse resp;
    auto s = stub->CompleteJob(&c, r, &resp);
    if (!s.ok()) fprintf(stderr, "complete %s: %s\n", id.c_str(), s.error_message().c_str());
    return s.ok();
  }
};

int Submit(const std::string& addr, const std::string& yaml_path) {
  std::ifstream in(yaml_path);
  std::stringstream ss;
  ss << in.rdbuf();
  auto stub = v1::SweepService::NewStub(Chan(addr));
  grpc::ClientContext c;
  c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  v1::SubmitSweepRequest r;
  r.set_spec_yaml(ss.str());
  r.set_idempotency_key("bench-" + std::to_string(UnixMs()) + "-" + std::to_string(getpid()));
  v1::SubmitSweepResponse resp;
  auto t0 = Clock::now();
  auto s = stub->SubmitSweep(&c, r, &resp);
  auto t1 = Clock::now();
  if (!s.ok()) { fprintf(stderr, "submit: %d %s\n", s.error_code(), s.error_message().c_str()); return 1; }
  printf("submit_s=%.4f\njobs=%d\nsweep_id=%lld\n", Secs(t0, t1), resp.jobs_size(),
         static_cast<long long>(resp.sweep().id()));
  return 0;
}

int Cancel(const std::string& addr, int64_t sweep) {
  auto stub = v1::SweepService::NewStub(Chan(addr));
  grpc::ClientContext c;
  v1::CancelSweepRequest r;
  r.set_sweep_id(sweep);
  v1::CancelSweepResponse resp;
  auto s = stub->CancelSweep(&c, r, &resp);
  if (!s.ok()) { fprintf(stderr, "cancel: %s\n", s.error_message().c_str()); return 1; }
  printf("cancelled=%d\n", resp.jobs_cancelled());
  return 0;
}

int LeaseBench(const std::string& addr, int workers, int max_cycles, double seconds, int k) {
  int nch = std::min(workers, 8);
  std::vector<std::shared_ptr<grpc::Channel>> chans;
  for (int i = 0; i < nch; ++i) chans.push_back(Chan(addr, i));
  std::atomic<int> claimed{0}, done{0}, errors{0}, empty{0};
  std::mutex mu;
  std::vector<double> lat_ms;
  Monitor mon;
  mon.Start();
  auto t0 = Clock::now();
  std::vector<std::thread> ths;
  for (int w = 0; w < workers; ++w) {
    ths.emplace_back([&, w] {
      Worker wk(chans[w % nch], "bench-lease-" + std::to_string(w));
      if (!wk.Register()) { ++errors; return; }
      std::vector<double> mine;
      while (Secs(t0, Clock::now()) < seconds) {
        if (claimed.fetch_add(1) >= max_cycles) break;
        auto a = Clock::now();
        int got = wk.Lease();
        mine.push_back(Secs(a, Clock::now()) * 1e3);
        if (got < 0) { ++errors; continue; }
        if (got == 0) { ++empty; break; }
        bool ok = true;
        for (int i = 0; i < k && ok; ++i) ok = wk.Heartbeat(i);
        ok = ok && wk.Complete();
        if (ok) ++done; else ++errors;
      }
      std::lock_guard<std::mutex> l(mu);
      lat_ms.insert(lat_ms.end(), mine.begin(), mine.end());
    });
  }
  for (auto& t : ths) t.join();
  double wall = Secs(t0, Clock::now());
  mon.Stop();
  printf("cycles=%d\nerrors=%d\nempty=%d\nwall_s=%.3f\nrate=%.1f\nlease_p50_ms=%.2f\nlease_p99_ms=%.2f\n", done.load(),
         errors.load(), empty.load(), wall, done / wall, Pct(lat_ms, 0.5), Pct(lat_ms, 0.99));
  return errors ? 1 : 0;
}

int MetricsBench(const std::string& addr, int streams, int batches, int batch) {
  std::atomic<long> accepted{0};
  std::atomic<int> errors{0};
  std::vector<std::unique_ptr<Worker>> ws;
  for (int i = 0; i < streams; ++i) {
    ws.push_back(std::make_unique<Worker>(Chan(addr, i), "bench-metrics-" + std::to_string(i)));
    if (!ws.back()->Register() || ws.back()->Lease() != 1) { fprintf(stderr, "metrics: no lease\n"); return 1; }
  }
  // Batches are built before the clock starts: the benchmark is the scheduler's ingest, not the client's protobuf.
  std::vector<std::vector<v1::MetricBatch>> pre(streams);
  int64_t now = UnixMs();
  for (int i = 0; i < streams; ++i) {
    for (int b = 0; b < batches; ++b) {
      v1::MetricBatch mb;
      mb.set_worker_id(ws[i]->id);
      *mb.mutable_lease() = ws[i]->lease;
      for (int p = 0; p < batch; ++p) {
        int64_t idx = static_cast<int64_t>(b) * batch + p;
        auto* pt = mb.add_points();
        pt->set_step(idx / 10);
        pt->set_name("train/m" + std::to_string(idx % 10));
        pt->set_value(1.0 / (1 + idx));
        pt->set_time_unix_ms(now);
      }
      pre[i].push_back(std::move(mb));
    }
  }
  Monitor mon;
  mon.Start();
  auto t0 = Clock::now();
  std::vector<std::thread> ths;
  for (int i = 0; i < streams; ++i) {
    ths.emplace_back([&, i] {
      grpc::ClientContext c;
      v1::ReportMetricsResponse resp;
      auto w = ws[i]->stub->ReportMetrics(&c, &resp);
      for (auto& mb : pre[i]) if (!w->Write(mb)) break;
      w->WritesDone();
      auto s = w->Finish();
      if (!s.ok()) { ++errors; fprintf(stderr, "metrics: %s\n", s.error_message().c_str()); }
      accepted += resp.points_accepted();
    });
  }
  for (auto& t : ths) t.join();
  double wall = Secs(t0, Clock::now());
  mon.Stop();
  for (auto& w : ws) w->Complete();
  printf("points=%ld\nerrors=%d\nwall_s=%.3f\nrate=%.1f\n", accepted.load(), errors.load(), wall, accepted / wall);
  return errors ? 1 : 0;
}

int HeartbeatBench(const std::string& addr, int workers, int interval_ms, double seconds) {
  int nthreads = std::min(workers, 64);
  int nch = std::min(workers, 8);
  std::vector<std::shared_ptr<grpc::Channel>> chans;
  for (int i = 0; i < nch; ++i) chans.push_back(Chan(addr, i));
  std::vector<std::unique_ptr<Worker>> ws;
  for (int i = 0; i < workers; ++i)
    ws.push_back(std::make_unique<Worker>(chans[i % nch], "bench-hb-" + std::to_string(i)));
  // Register and lease (not timed), in parallel.
  std::atomic<int> errors{0};
  {
    std::vector<std::thread> ths;
    for (int t = 0; t < nthreads; ++t)
      ths.emplace_back([&, t] {
        for (int i = t; i < workers; i += nthreads)
          if (!ws[i]->Register() || ws[i]->Lease() != 1) ++errors;
      });
    for (auto& t : ths) t.join();
  }
  if (errors) { fprintf(stderr, "hb: %d workers got no lease\n", errors.load()); return 1; }
  std::mutex mu;
  std::vector<double> lat_ms;
  std::atomic<long> late{0};
  Monitor mon;
  mon.Start();
  auto t0 = Clock::now();
  std::vector<std::thread> ths;
  for (int t = 0; t < nthreads; ++t) {
    ths.emplace_back([&, t] {
      std::vector<double> mine;
      // Worker i's beats are due at t0 + offset_i + n*interval, offsets spread evenly over one interval.
      std::vector<int> mineidx;
      for (int i = t; i < workers; i += nthreads) mineidx.push_back(i);
      for (int64_t n = 0;; ++n) {
        bool any = false;
        for (int i : mineidx) {
          auto due = t0 + std::chrono::microseconds(static_cast<int64_t>(interval_ms) * 1000 * i / workers) +
                     std::chrono::milliseconds(interval_ms * n);
          if (Secs(t0, due) >= seconds) continue;
          any = true;
          auto now = Clock::now();
          if (now < due) std::this_thread::sleep_until(due);
          else if (Secs(due, now) > 0.01) ++late;
          auto a = Clock::now();
          if (!ws[i]->Heartbeat(n)) ++errors;
          mine.push_back(Secs(a, Clock::now()) * 1e3);
        }
        if (!any) break;
      }
      std::lock_guard<std::mutex> l(mu);
      lat_ms.insert(lat_ms.end(), mine.begin(), mine.end());
    });
  }
  for (auto& t : ths) t.join();
  double wall = Secs(t0, Clock::now());
  mon.Stop();
  printf("heartbeats=%zu\nerrors=%d\nlate_sends=%ld\nwall_s=%.3f\nrate=%.1f\nhb_p50_ms=%.2f\nhb_p99_ms=%.2f\n",
         lat_ms.size(), errors.load(), late.load(), wall, lat_ms.size() / wall, Pct(lat_ms, 0.5), Pct(lat_ms, 0.99));
  return errors ? 1 : 0;
}

int Hold(const std::string& addr, const std::string& id) {
  Worker w(Chan(addr), id);
  if (!w.Register() || w.Lease() != 1) return 1;
  printf("job=%lld\n", static_cast<long long>(w.job));
  fflush(stdout);
  for (int64_t n = 0;; ++n) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    w.Heartbeat(n);
  }
}

int Reclaim(const std::string& addr, const std::string& id, const std::string& list) {
  std::set<int64_t> want;
  std::stringstream ss(list);
  std::string tok;
  while (std::getline(ss, tok, ',')) if (!tok.empty()) want.insert(std::stoll(tok));
  Worker w(Chan(addr), id);
  if (!w.Register()) return 1;
  auto t0 = Clock::now();
  while (!want.empty() && Secs(t0, Clock::now()) < 120) {
    int got = w.Lease();
    if (got == 1) {
      int64_t t = UnixMs();
      if (want.erase(w.job)) printf("job=%lld t_ms=%lld\n", static_cast<long long>(w.job), static_cast<long long>(t));
      fflush(stdout);
      w.Complete();
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return want.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 3) { fprintf(stderr, "usage: see the header of load.cpp\n"); return 2; }
  std::string mode = argv[1], addr = argv[2];
  auto arg = [&](int i) { if (i >= argc) { fprintf(stderr, "missing argument %d\n", i); exit(2); } return std::string(argv[i]); };
  if (mode == "submit") return Submit(addr, arg(3));
  if (mode == "cancel") return Cancel(addr, std::stoll(arg(3)));
  if (mode == "lease") return LeaseBench(addr, std::stoi(arg(3)), std::stoi(arg(4)), std::stod(arg(5)), std::stoi(arg(6)));
  if (mode == "metrics") return MetricsBench(addr, std::stoi(arg(3)), std::stoi(arg(4)), std::stoi(arg(5)));
  if (mode == "hb") return HeartbeatBench(addr, std::stoi(arg(3)), std::stoi(arg(4)), std::stod(arg(5)));
  if (mode == "hold") return Hold(addr, arg(3));
  if (mode == "reclaim") return Reclaim(addr, arg(3), arg(4));
  fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
