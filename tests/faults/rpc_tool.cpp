// ablate-fault-rpc: the fault suite's gRPC client for the API-abuse scenarios (F19 stale writes, F30 malformed
// bytes, F31 oversized messages, F32 invalid specs, F34 duplicate submission, F35 authorization matrix and worker
// tokens, F36 deadlines and per-method caps), the heartbeat/readiness probe of F17/F18, the ListJobs flood of F13
// and F38's simulated workers. Exit 0 when every expectation holds; prints what it saw.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <condition_variable>
#include <cstdlib>
#include <iomanip>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "ablate/v1/ablate.grpc.pb.h"

using namespace ablate;
using namespace std::chrono_literals;

namespace {

std::string Slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::shared_ptr<grpc::Channel> Insecure(const std::string& addr) {
  grpc::ChannelArguments a;
  a.SetMaxSendMessageSize(64 << 20);
  return grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), a);
}

grpc::Status GenericUnary(const std::shared_ptr<grpc::Channel>& ch, const std::string& method, const std::string& bytes,
                          const std::string& token = "", std::chrono::milliseconds timeout = 5000ms) {
  grpc::GenericStub stub(ch);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  grpc::Slice slice(bytes);
  grpc::ByteBuffer req(&slice, 1), resp;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status st;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &req, &resp, [&](grpc::Status s) {
    std::lock_guard<std::mutex> l(mu);
    st = std::move(s);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> l(mu);
  cv.wait(l, [&] { return done; });
  return st;
}

// One unary call of `method` with `bytes` as the request: no deadline at all when timeout is 0. Returns the status
// and (in *resp) the answer's bytes.
grpc::Status GenericCall(const std::shared_ptr<grpc::Channel>& ch, const std::string& method, const std::string& bytes,
                         std::chrono::milliseconds timeout, std::string* resp_bytes = nullptr) {
  grpc::GenericStub stub(ch);
  grpc::ClientContext ctx;
  if (timeout.count() > 0) ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::Slice slice(bytes);
  grpc::ByteBuffer req(&slice, 1), resp;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status st;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &req, &resp, [&](grpc::Status s) {
    std::lock_guard<std::mutex> l(mu);
    st = std::move(s);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> l(mu);
  cv.wait(l, [&] { return done; });
  if (resp_bytes && st.ok()) {
    std::vector<grpc::Slice> slices;
    resp_bytes->clear();
    if (resp.Dump(&slices).ok()) {
      for (const auto& sl : slices) resp_bytes->append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    }
  }
  return st;
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::vector<const google::protobuf::MethodDescriptor*> AllMethods() {
  std::vector<const google::protobuf::MethodDescriptor*> out;
  const auto* pool = google::protobuf::DescriptorPool::generated_pool();
  for (const auto* svc : {pool->FindServiceByName("ablate.v1.SweepService"),
                          pool->FindServiceByName("ablate.v1.WorkerService")}) {
    for (int i = 0; i < svc->method_count(); ++i) out.push_back(svc->method(i));
  }
  return out;
}

std::string Path(const google::protobuf::MethodDescriptor* m) { return "/" + m->service()->full_name() + "/" + m->name(); }

int StaleWrite(const std::string& addr, const std::string& worker, int64_t job, int attempt, int64_t epoch,
               const std::string& nonce) {
  auto stub = v1::WorkerService::NewStub(Insecure(addr));
  v1::Lease lease;
  lease.set_job_id(job);
  lease.set_attempt(attempt);
  lease.set_lease_epoch(epoch);
  lease.set_lease_nonce(nonce);
  int rejected = 0, total = 0;
  auto expect = [&](const char* what, const grpc::Status& s) {
    ++total;
    if (s.error_code() == grpc::FAILED_PRECONDITION) ++rejected;
    else std::cout << what << ": expected FAILED_PRECONDITION, got " << s.error_code() << " " << s.error_message() << "\n";
  };
  {
    grpc::ClientContext c;
    v1::HeartbeatRequest r;
    r.set_worker_id(worker);
    *r.mutable_lease() = lease;
    v1::HeartbeatResponse resp;
    expect("Heartbeat", stub->Heartbeat(&c, r, &resp));
  }
  {
    grpc::ClientContext c;
    v1::ReportCheckpointRequest r;
    r.set_worker_id(worker);
    *r.mutable_lease() = lease;
    r.set_step(999);
    r.set_path("/zombie");
    v1::ReportCheckpointResponse resp;
    expect("ReportCheckpoint", stub->ReportCheckpoint(&c, r, &resp));
  }
  {
    grpc::ClientContext c;
    v1::ReportMetricsResponse resp;
    auto w = stub->ReportMetrics(&c, &resp);
    v1::MetricBatch b;
    b.set_worker_id(worker);
    *b.mutable_lease() = lease;
    auto* p = b.add_points();
    p->set_step(1);
    p->set_name("train/loss");
    p->set_value(123);
    w->Write(b);
    w->WritesDone();
    expect("ReportMetrics", w->Finish());
  }
  {
    grpc::ClientContext c;
    v1::CompleteJobRequest r;
    r.set_worker_id(worker);
    *r.mutable_lease() = lease;
    r.set_outcome(v1::OUTCOME_SUCCEEDED);
    v1::CompleteJobResponse resp;
    expect("CompleteJob", stub->CompleteJob(&c, r, &resp));
  }
  std::cout << rejected << "/" << total << " stale writes rejected with FAILED_PRECONDITION\n";
  return rejected == total ? 0 : 1;
}

int Malformed(const std::string& addr) {
  auto ch = Insecure(addr);
  std::mt19937 rng(30);
  std::map<int, int> codes;
  int calls = 0;
  std::vector<std::string> shapes = {std::string("\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11),  // overlong varint
                                     std::string("\x0a\xff\xff\xff\x0f", 5),   // length beyond the buffer
                                     std::string("\x0f", 1),                    // bad wire type
                                     std::string("\x12\x03\xc3\x28\x41", 5)};   // invalid UTF-8 in a string
  std::string nest;
  for (int i = 0; i < 200; ++i) nest = "\x12" + std::string(1, static_cast<char>(nest.size() & 0x7f)) + nest;
  shapes.push_back(nest);
  for (const auto* m : AllMethods()) {
    if (m->client_streaming() || m->server_streaming()) continue;
    std::vector<std::string> inputs = shapes;
    for (int i = 0; i < 150; ++i) {
      std::string b(rng() % 256, '\0');
      for (auto& ch2 : b) ch2 = static_cast<char>(rng());
      inputs.push_back(b);
    }
    for (const auto& in : inputs) {
      auto s = GenericUnary(ch, Path(m), in);
      ++codes[s.error_code()];
      ++calls;
    }
  }
  // Still alive and answering?
  auto s = GenericUnary(ch, "/ablate.v1.SweepService/ListSweeps", "");
  std::cout << calls << " malformed calls; codes:";
  for (auto& [c, n] : codes) std::cout << " " << c << "x" << n;
  std::cout << "\nafter: ListSweeps " << (s.ok() ? "OK" : s.error_message()) << "\n";
  std::cout << calls << " malformed requests, 0 crashes\n";
  return s.ok() ? 0 : 1;
}

int Oversize(const std::string& addr) {
  auto ch = Insecure(addr);
  int bad = 0;
  for (int i = 0; i < 10; ++i) {
    auto stub = v1::SweepService::NewStub(ch);
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + 10s);
    v1::SubmitSweepRequest r;
    r.set_spec_yaml("name: big\n#" + std::string(5 << 20, 'x'));
    v1::SubmitSweepResponse resp;
    auto s = stub->SubmitSweep(&c, r, &resp);
    if (s.error_code() != grpc::RESOURCE_EXHAUSTED) {
      ++bad;
      std::cout << "5 MiB submit: " << s.error_code() << " " << s.error_message() << "\n";
    }
  }
  {
    auto stub = v1::WorkerService::NewStub(ch);
    grpc::ClientContext c;
    v1::ReportMetricsResponse resp;
    auto w = stub->ReportMetrics(&c, &resp);
    v1::MetricBatch b;
    b.set_worker_id("w");
    b.mutable_lease()->set_job_id(1);
    for (int i = 0; i < 9000; ++i) {
      auto* p = b.add_points();
      p->set_step(i);
      p->set_name("train/a_rather_long_metric_name");
    }
    w->Write(b);
    w->WritesDone();
    auto s = w->Finish();
    if (s.error_code() != grpc::RESOURCE_EXHAUSTED) {
      ++bad;
      std::cout << "300 KiB metric batch: " << s.error_code() << " " << s.error_message() << "\n";
    }
  }
  std::cout << (bad ? "oversized messages accepted: " + std::to_string(bad) : "11/11 oversized messages rejected with RESOURCE_EXHAUSTED") << "\n";
  return bad ? 1 : 0;
}

int InvalidSpecs(const std::string& addr) {
  auto stub = v1::SweepService::NewStub(Insecure(addr));
  auto base = [](const std::string& grid, const std::string& train) {
    return "name: bad\ngrid:\n" + grid + (train.empty() ? "" : "train:\n" + train);
  };
  std::vector<std::string> specs;
  for (std::string sz : {"huge", "7.5X", "xl", "12Q", "tinyy", "0.6Bb", "B", "1..5B", "-", "ten"})
    for (std::string ctx : {"64", "128"}) specs.push_back(base("  model_size: [" + sz + "]\n  context_length: [" + ctx + "]\n", ""));
  for (std::string ctx : {"-5", "0", "abc", "1.5", "-1", "0x10", "''", "1e3x"})
    for (std::string sz : {"tiny", "mini", "small"}) specs.push_back(base("  model_size: [" + sz + "]\n  context_length: [" + ctx + "]\n", ""));
  for (std::string pat : {"AXB", "ZZ", "a1", "A B", "Q", "MDX", "12"})
    for (std::string sz : {"tiny", "mini"}) specs.push_back(base("  model_size: [" + sz + "]\n  block_pattern: [\"" + pat + "\"]\n", ""));
  for (std::string at : {"flash3", "x", "sparse9"}) specs.push_back(base("  model_size: [tiny]\n  attention: [" + at + "]\n", ""));
  for (std::string op : {"sgd", "adam9", "lion", "x"}) specs.push_back(base("  model_size: [tiny]\n  optimizer: [" + op + "]\n", ""));
  for (std::string lr : {".nan", ".inf", "-.inf", "abc", "nan"})
    for (std::string sz : {"tiny", "mini"}) specs.push_back(base("  model_size: [" + sz + "]\n", "  learning_rate: " + lr + "\n"));
  for (std::string k : {"num_train_steps: -3", "batch_size: 0", "batch_size: abc", "no_such_flag: 1", "model_size: tiny"})
    specs.push_back(base("  model_size: [tiny]\n", "  " + k + "\n"));
  specs.push_back("name: bad\ngrid: {}\n");
  specs.push_back("name: bad\ngrid:\n  model_size: []\n");
  specs.push_back("name: bad\ngrid:\n  model_size: [tiny]\n  model_size: [mini]\n");
  specs.push_back("name: bad\ngrid:\n  model_size: [tiny, tiny]\n");
  specs.push_back("name: bad\n");
  specs.push_back("grid:\n  model_size: [tiny]\n");
  specs.push_back("name: 'bad name!'\ngrid:\n  model_size: [tiny]\n");
  specs.push_back("name: bad\ngrid:\n  model_size: [tiny]\nexclude:\n  - {model_size: tiny}\n");
  specs.push_back("name: bad\ngrid:\n  model_size: [tiny]\nwhat: 1\n");
  specs.push_back("name: bad\ngrid:\n  model_size: [tiny]\nresources: {gpus: 0}\n");
  specs.push_back("name: bad\ngrid:\n  model_size: [tiny]\nresources: {memory_gb: -1}\n");
  specs.push_back("{{{");
  specs.push_back("");
  {  // a product over the 10,000-cell cap
    std::string ctx;
    for (int i = 1; i <= 150; ++i) ctx += (i > 1 ? ", " : "") + std::to_string(i * 8);
    std::string sz;
    for (int i = 1; i <= 70; ++i) sz += (i > 1 ? ", " : "") + std::to_string(i) + "M";
    specs.push_back(base("  model_size: [" + sz + "]\n  context_length: [" + ctx + "]\n", ""));
  }
  for (int n = 0; n < 110; ++n) {  // one per negative context length
    specs.push_back("name: bad" + std::to_string(n) + "\ngrid:\n  model_size: [tiny]\n  context_length: [" +
                    std::to_string(-n - 1) + "]\n");
  }
  int accepted = 0;
  std::map<int, int> codes;
  for (const auto& spec : specs) {
    grpc::ClientContext c;
    v1::SubmitSweepRequest r;
    r.set_spec_yaml(spec);
    v1::SubmitSweepResponse resp;
    auto s = stub->SubmitSweep(&c, r, &resp);
    ++codes[s.error_code()];
    if (s.error_code() != grpc::INVALID_ARGUMENT) {
      ++accepted;
      std::cout << "NOT rejected (" << s.error_code() << "): " << spec.substr(0, 200) << "\n";
    }
  }
  // Property: a valid spec expands to the product of its axis lengths (dry run, nothing stored).
  int prop_bad = 0;
  for (int a = 1; a <= 4; ++a) {
    for (int b = 1; b <= 4; ++b) {
      std::string sz, ctx;
      for (int i = 0; i < a; ++i) sz += (i ? ", " : "") + std::to_string(i + 1) + "M";
      for (int i = 0; i < b; ++i) ctx += (i ? ", " : "") + std::to_string((i + 1) * 64);
      grpc::ClientContext c;
      v1::SubmitSweepRequest r;
      r.set_spec_yaml("name: ok\ngrid:\n  model_size: [" + sz + "]\n  context_length: [" + ctx + "]\n");
      r.set_dry_run(true);
      v1::SubmitSweepResponse resp;
      auto s = stub->SubmitSweep(&c, r, &resp);
      if (!s.ok() || resp.jobs_size() != a * b) ++prop_bad;
    }
  }
  std::cout << specs.size() - accepted << "/" << specs.size() << " invalid specs rejected with INVALID_ARGUMENT; "
            << (16 - prop_bad) << "/16 valid grids expand to the product of their axes\n";
  return accepted == 0 && prop_bad == 0 && specs.size() >= 200 ? 0 : 1;
}

int DupSubmit(const std::string& addr) {
  auto ch = Insecure(addr);
  std::atomic<int> created{0}, ok{0};
  std::mutex mu;
  std::set<int64_t> ids;
  std::vector<std::thread> ts;
  for (int i = 0; i < 50; ++i) {
    ts.emplace_back([&] {
      auto stub = v1::SweepService::NewStub(ch);
      grpc::ClientContext c;
      v1::SubmitSweepRequest r;
      r.set_spec_yaml("name: dup\ngrid:\n  model_size: [tiny, mini]\n  context_length: [64, 128]\n");
      r.set_idempotency_key("dup-key-1");
      v1::SubmitSweepResponse resp;
      auto s = stub->SubmitSweep(&c, r, &resp);
      if (s.ok()) {
        ++ok;
        if (resp.created()) ++created;
        std::lock_guard<std::mutex> l(mu);
        ids.insert(resp.sweep().id());
      } else {
        std::lock_guard<std::mutex> l(mu);
        std::cout << "submit failed: " << s.error_code() << " " << s.error_message() << "\n";
      }
    });
  }
  for (auto& t : ts) t.join();
  auto stub = v1::SweepService::NewStub(ch);
  grpc::ClientContext c;
  v1::SubmitSweepRequest r;
  r.set_spec_yaml("name: dup\ngrid:\n  model_size: [small]\n");
  r.set_idempotency_key("dup-key-1");
  v1::SubmitSweepResponse resp;
  auto s = stub->SubmitSweep(&c, r, &resp);
  {  // leave nothing queued behind (the suite checks that no accepted job is lost)
    grpc::ClientContext cc;
    v1::CancelSweepRequest cr;
    cr.set_sweep_id(*ids.begin());
    v1::CancelSweepResponse cresp;
    stub->CancelSweep(&cc, cr, &cresp);
  }
  std::cout << "50 concurrent identical submits: " << ok << " ok, " << created << " created, " << ids.size()
            << " distinct sweep id(s); same key + other spec: " << s.error_code() << "\n";
  return ok == 50 && created == 1 && ids.size() == 1 && s.error_code() == grpc::ALREADY_EXISTS ? 0 : 1;
}

int Deadlines(const std::string& addr) {
  auto stub = v1::SweepService::NewStub(Insecure(addr));
  v1::SubmitSweepResponse sub;
  {
    grpc::ClientContext c;
    v1::SubmitSweepRequest r;
    r.set_spec_yaml("name: idle\ngrid:\n  model_size: [tiny]\n");
    if (!stub->SubmitSweep(&c, r, &sub).ok()) return 1;
  }
  auto t0 = std::chrono::steady_clock::now();
  grpc::ClientContext c;  // no deadline at all
  v1::WatchSweepRequest r;
  r.set_sweep_id(sub.sweep().id());
  r.set_poll_interval_ms(100);
  auto reader = stub->WatchSweep(&c, r);
  v1::SweepEvent ev;
  int n = 0;
  while (reader->Read(&ev)) ++n;
  auto s = reader->Finish();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  {
    grpc::ClientContext cc;
    v1::CancelSweepRequest cr;
    cr.set_sweep_id(sub.sweep().id());
    v1::CancelSweepResponse cresp;
    stub->CancelSweep(&cc, cr, &cresp);
  }
  std::cout << "WatchSweep without a deadline ended after " << secs << " s (" << n << " events, status "
            << s.error_code() << "); server cap 2 s\n";
  return secs <= 4.0 ? 0 : 1;
}

// F17/F18: heartbeats at a steady rate for `seconds`, one thread per client deadline in `deadlines_ms` (comma list,
// 0: no deadline at all), and gRPC health checks (1 s deadline) in another. One line per call:
//   HB <deadline_ms> <start_unix_ms> <latency_ms> <grpc code>
//   HEALTH <unix_ms> <SERVING|NOT_SERVING|UNKNOWN|ERR:<code>>
// A call still running 15 s after the end is printed as "HUNG <deadline_ms> <start_unix_ms>" and the tool exits 3
// at once (a handler that never answers).
int HbProbe(const std::string& addr, double seconds, int interval_ms, const std::string& worker, int64_t job,
            int attempt, int64_t epoch, const std::string& nonce, const std::string& deadlines) {
  auto ch = Insecure(addr);
  std::mutex out_mu;
  auto emit = [&](const std::string& line) {
    std::lock_guard<std::mutex> l(out_mu);
    std::cout << line << std::endl;
  };
  std::vector<int> modes;
  {
    std::stringstream ss(deadlines);
    for (std::string x; std::getline(ss, x, ',');)
      if (!x.empty()) modes.push_back(std::stoi(x));
  }
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  std::vector<std::unique_ptr<std::atomic<int64_t>>> in_flight;  // start of the call in flight (unix ms), 0: none
  std::atomic<int> finished{0};
  std::vector<std::thread> ts;
  for (int m : modes) {
    in_flight.push_back(std::make_unique<std::atomic<int64_t>>(0));
    std::atomic<int64_t>* slot = in_flight.back().get();
    ts.emplace_back([&, m, slot] {
      auto stub = v1::WorkerService::NewStub(ch);
      while (std::chrono::steady_clock::now() < end) {
        auto next = std::chrono::steady_clock::now() + std::chrono::milliseconds(interval_ms);
        grpc::ClientContext c;
        if (m > 0) c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(m));
        v1::HeartbeatRequest r;
        r.set_worker_id(worker);
        r.mutable_lease()->set_job_id(job);
        r.mutable_lease()->set_attempt(attempt);
        r.mutable_lease()->set_lease_epoch(epoch);
        r.mutable_lease()->set_lease_nonce(nonce);
        r.set_step(-1);
        v1::HeartbeatResponse resp;
        const int64_t t0 = UnixMs();
        slot->store(t0);
        const auto s0 = std::chrono::steady_clock::now();
        auto st = stub->Heartbeat(&c, r, &resp);
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count();
        slot->store(0);
        std::ostringstream line;
        line << "HB " << m << " " << t0 << " " << std::fixed << std::setprecision(1) << ms << " " << st.error_code();
        emit(line.str());
        std::this_thread::sleep_until(next);
      }
      ++finished;
    });
  }
  ts.emplace_back([&] {
    while (std::chrono::steady_clock::now() < end) {
      auto next = std::chrono::steady_clock::now() + std::chrono::milliseconds(interval_ms);
      std::string resp;
      const int64_t t0 = UnixMs();
      auto st = GenericCall(ch, "/grpc.health.v1.Health/Check", "", std::chrono::milliseconds(1000), &resp);
      std::string what = "UNKNOWN";
      if (!st.ok()) what = "ERR:" + std::to_string(st.error_code());
      else if (resp == std::string("\x08\x01", 2)) what = "SERVING";
      else if (resp == std::string("\x08\x02", 2)) what = "NOT_SERVING";
      emit("HEALTH " + std::to_string(t0) + " " + what);
      std::this_thread::sleep_until(next);
    }
    ++finished;
  });
  const auto give_up = end + std::chrono::seconds(15);
  while (finished.load() < static_cast<int>(ts.size())) {
    if (std::chrono::steady_clock::now() > give_up) {
      for (size_t i = 0; i < modes.size(); ++i) {
        if (int64_t t = in_flight[i]->load(); t != 0) emit("HUNG " + std::to_string(modes[i]) + " " + std::to_string(t));
      }
      std::cout.flush();
      std::_Exit(3);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (auto& t : ts) t.join();
  emit("DONE");
  return 0;
}

// F36: every unary RPC of the proto, called with no deadline and with a 1-hour one while the test holds the
// tables locked: each must come back (UNAVAILABLE: the database did not answer in time) within the server's cap
// plus `slack_ms`, never hang. A unary method without a request below fails the test, so a new RPC is covered or
// noticed.
int DeadlineCap(const std::string& addr, int cap_ms, int slack_ms) {
  const std::string spec = "name: f36\ngrid:\n  model_size: [tiny]\n";
  v1::Lease lease;
  lease.set_job_id(1);
  lease.set_attempt(1);
  lease.set_lease_epoch(1);
  lease.set_lease_nonce("f36");
  std::map<std::string, std::string> reqs;  // method -> a request that gets as far as the database
  {
    v1::SubmitSweepRequest r;
    r.set_spec_yaml(spec);
    reqs["SubmitSweep"] = r.SerializeAsString();
  }
  {
    v1::GetSweepRequest r;
    r.set_sweep_id(1);
    reqs["GetSweep"] = r.SerializeAsString();
  }
  {
    v1::ListSweepsRequest r;
    r.set_limit(10);
    reqs["ListSweeps"] = r.SerializeAsString();
  }
  {
    v1::CancelSweepRequest r;
    r.set_sweep_id(1);
    reqs["CancelSweep"] = r.SerializeAsString();
  }
  {
    v1::ListJobsRequest r;
    r.set_sweep_id(1);
    reqs["ListJobs"] = r.SerializeAsString();
  }
  {
    v1::GetJobRequest r;
    r.set_job_id(1);
    reqs["GetJob"] = r.SerializeAsString();
  }
  {
    v1::CompareSweepRequest r;
    r.set_sweep_id(1);
    reqs["CompareSweep"] = r.SerializeAsString();
  }
  {
    v1::GetJobMetricsRequest r;
    r.set_job_id(1);
    reqs["GetJobMetrics"] = r.SerializeAsString();
  }
  {
    v1::CancelJobRequest r;
    r.set_job_id(1);
    reqs["CancelJob"] = r.SerializeAsString();
  }
  {
    v1::ExtendSweepRequest r;
    r.set_sweep_id(1);
    r.set_spec_yaml(spec);
    reqs["ExtendSweep"] = r.SerializeAsString();
  }
  {
    v1::CreateScheduleRequest r;
    r.set_name("f36");
    r.set_cron("0 2 * * *");
    r.set_spec_yaml(spec);
    reqs["CreateSchedule"] = r.SerializeAsString();
  }
  reqs["ListSchedules"] = v1::ListSchedulesRequest().SerializeAsString();
  {
    v1::DeleteScheduleRequest r;
    r.set_schedule_id(1);
    reqs["DeleteSchedule"] = r.SerializeAsString();
  }
  {
    v1::QuarantineWorkerRequest r;
    r.set_worker_id("w-f36");
    r.set_quarantine(true);
    r.set_reason("f36");
    r.set_duration_s(60);
    reqs["QuarantineWorker"] = r.SerializeAsString();
  }
  {
    v1::RegisterWorkerRequest r;
    r.set_worker_id("w-f36");
    reqs["RegisterWorker"] = r.SerializeAsString();
  }
  {
    v1::LeaseJobRequest r;
    r.set_worker_id("w-f36");
    reqs["LeaseJob"] = r.SerializeAsString();
  }
  {
    v1::HeartbeatRequest r;
    r.set_worker_id("w-f36");
    *r.mutable_lease() = lease;
    reqs["Heartbeat"] = r.SerializeAsString();
  }
  {
    v1::ReportCheckpointRequest r;
    r.set_worker_id("w-f36");
    *r.mutable_lease() = lease;
    r.set_step(1);
    r.set_path("/f36");
    reqs["ReportCheckpoint"] = r.SerializeAsString();
  }
  {
    v1::CompleteJobRequest r;
    r.set_worker_id("w-f36");
    *r.mutable_lease() = lease;
    r.set_outcome(v1::OUTCOME_SUCCEEDED);
    reqs["CompleteJob"] = r.SerializeAsString();
  }
  auto ch = Insecure(addr);
  struct Call {
    const google::protobuf::MethodDescriptor* method;
    int64_t deadline_ms;
    double ms = -1;
    int code = -1;
  };
  std::vector<Call> calls;
  int missing = 0;
  for (const auto* m : AllMethods()) {
    if (m->client_streaming() || m->server_streaming()) continue;
    if (!reqs.count(m->name())) {
      std::cout << "unary method " << m->full_name() << " has no request in the deadline-cap test\n";
      ++missing;
      continue;
    }
    for (int64_t d : {int64_t{0}, int64_t{3600} * 1000}) calls.push_back({m, d});
  }
  std::atomic<int> done{0};
  std::vector<std::thread> ts;
  for (auto& c : calls) {
    ts.emplace_back([&, cp = &c] {
      const auto t0 = std::chrono::steady_clock::now();
      auto st = GenericCall(ch, Path(cp->method), reqs.at(cp->method->name()),
                            std::chrono::milliseconds(cp->deadline_ms));
      cp->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      cp->code = st.error_code();
      ++done;
    });
  }
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(cap_ms) + std::chrono::seconds(20);
  while (done.load() < static_cast<int>(calls.size())) {
    if (std::chrono::steady_clock::now() > give_up) {
      for (const auto& c : calls)
        if (c.ms < 0) std::cout << "HUNG " << c.method->name() << " deadline=" << (c.deadline_ms ? "1h" : "none") << "\n";
      std::cout << "calls still running " << cap_ms + 20000 << " ms after they started: handlers are not capped\n";
      std::cout.flush();
      std::_Exit(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (auto& t : ts) t.join();
  double worst = 0;
  std::string worst_what;
  int over = 0, not_unavailable = 0;
  for (const auto& c : calls) {
    std::string what = c.method->name() + (c.deadline_ms ? " (1 h deadline)" : " (no deadline)");
    if (c.ms > worst) {
      worst = c.ms;
      worst_what = what;
    }
    if (c.ms > cap_ms + slack_ms) {
      ++over;
      std::cout << what << ": " << c.ms << " ms, over the cap of " << cap_ms << " ms\n";
    }
    if (c.code != grpc::UNAVAILABLE) {
      ++not_unavailable;
      std::cout << what << ": code " << c.code << " after " << c.ms << " ms (expected UNAVAILABLE: the tables are "
                << "locked, so the call must have given up on the database)\n";
    }
  }
  std::cout << calls.size() / 2 << " unary RPCs x {no deadline, 1 h}: slowest " << std::fixed << std::setprecision(0)
            << worst << " ms (" << worst_what << "), cap " << cap_ms << " ms; " << calls.size() - not_unavailable
            << "/" << calls.size() << " UNAVAILABLE, " << over << " over the cap, " << missing
            << " unary methods without a request\n";
  return over == 0 && not_unavailable == 0 && missing == 0 ? 0 : 1;
}

// F35: every RPC × {no credentials, bad token, worker certificate, user token, worker token, and the extra
// credentials given as NAME:ROLE:TOKEN[:MESSAGE] (signed tokens: valid ones, expired, signed with a wrong key,
// revoked, alg none)}. ROLE none must be refused with UNAUTHENTICATED (and MESSAGE in the error, when given). The
// expectation table is this test's own: a method of the proto that is missing from it fails the test.
struct ExtraCred {
  std::string name, role, token, message;
};

int AuthzMatrix(const std::string& addr, const std::string& ca, const std::string& user_token,
                const std::string& wcert, const std::string& wkey, const std::string& worker_token,
                const std::vector<ExtraCred>& extra) {
  const std::set<std::string> people = {"user", "admin"};
  const std::map<std::string, std::set<std::string>> allowed = {
      {"SubmitSweep", people}, {"GetSweep", people}, {"ListSweeps", people}, {"CancelSweep", people},
      {"ListJobs", people}, {"GetJob", people}, {"WatchSweep", people}, {"CompareSweep", people},
      {"GetJobMetrics", people}, {"CancelJob", people}, {"ExtendSweep", people}, {"CreateSchedule", people},
      {"ListSchedules", people}, {"DeleteSchedule", people}, {"QuarantineWorker", {"admin"}},
      {"RegisterWorker", {"worker"}}, {"LeaseJob", {"worker"}}, {"Heartbeat", {"worker"}},
      {"ReportMetrics", {"worker"}}, {"ReportCheckpoint", {"worker"}}, {"CompleteJob", {"worker"}}};
  grpc::SslCredentialsOptions plain;
  plain.pem_root_certs = Slurp(ca);
  grpc::SslCredentialsOptions mtls = plain;
  mtls.pem_cert_chain = Slurp(wcert);
  mtls.pem_private_key = Slurp(wkey);
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  auto tls = grpc::CreateCustomChannel(addr, grpc::SslCredentials(plain), args);
  auto wtls = grpc::CreateCustomChannel(addr, grpc::SslCredentials(mtls), args);
  struct Cred {
    std::string name;
    std::shared_ptr<grpc::Channel> ch;
    std::string token;
    std::string role;
    std::string message;  // expected in the error of a refused call (role none)
  };
  // A worker authenticates with its client certificate (mTLS) or with its bearer token over TLS: same role.
  std::vector<Cred> creds = {{"none", tls, "", "none", ""},
                             {"bad_token", tls, "not-a-valid-token-0123456789", "none", ""},
                             {"worker_cert", wtls, "", "worker", ""},
                             {"user", tls, user_token, "user", ""}};
  if (!worker_token.empty()) creds.push_back({"worker_token", tls, worker_token, "worker", ""});
  for (const auto& e : extra) creds.push_back({e.name, tls, e.token, e.role, e.message});
  int unexpected_ok = 0, unexpected_deny = 0, cells = 0, missing = 0, wrong_code = 0;
  std::map<std::string, int> refused_by_cred;
  for (const auto* m : AllMethods()) {
    auto it = allowed.find(m->name());
    if (it == allowed.end()) {
      std::cout << "method " << m->full_name() << " has no entry in the authorization matrix\n";
      ++missing;
      continue;
    }
    for (const auto& cr : creds) {
      grpc::Status s;
      if (m->name() == "WatchSweep") {
        auto stub = v1::SweepService::NewStub(cr.ch);
        grpc::ClientContext c;
        c.set_deadline(std::chrono::system_clock::now() + 5s);
        if (!cr.token.empty()) c.AddMetadata("authorization", "Bearer " + cr.token);
        v1::WatchSweepRequest r;  // sweep 0: INVALID_ARGUMENT once authorized
        auto rd = stub->WatchSweep(&c, r);
        v1::SweepEvent ev;
        while (rd->Read(&ev)) {
        }
        s = rd->Finish();
      } else if (m->name() == "ReportMetrics") {
        auto stub = v1::WorkerService::NewStub(cr.ch);
        grpc::ClientContext c;
        c.set_deadline(std::chrono::system_clock::now() + 5s);
        if (!cr.token.empty()) c.AddMetadata("authorization", "Bearer " + cr.token);
        v1::ReportMetricsResponse resp;
        auto w = stub->ReportMetrics(&c, &resp);
        w->WritesDone();
        s = w->Finish();
      } else if (m->client_streaming() || m->server_streaming()) {
        std::cout << "streaming method " << m->name() << " has no caller in this test\n";
        ++missing;
        continue;
      } else {
        s = GenericUnary(cr.ch, Path(m), "", cr.token);
      }
      ++cells;
      bool denied = s.error_code() == grpc::UNAUTHENTICATED || s.error_code() == grpc::PERMISSION_DENIED;
      bool should = it->second.count(cr.role) > 0;
      if (!should && !denied) {
        ++unexpected_ok;
        std::cout << "UNEXPECTED SUCCESS " << m->name() << " as " << cr.name << ": " << s.error_code() << "\n";
      }
      if (should && denied) {
        ++unexpected_deny;
        std::cout << "unexpected denial " << m->name() << " as " << cr.name << ": " << s.error_message() << "\n";
      }
      // No valid credential: exactly UNAUTHENTICATED, with the reason when one is expected (e.g. "token expired").
      if (cr.role == "none" && (s.error_code() != grpc::UNAUTHENTICATED ||
                                (!cr.message.empty() && s.error_message().find(cr.message) == std::string::npos))) {
        ++wrong_code;
        std::cout << "wrong refusal " << m->name() << " as " << cr.name << ": code " << s.error_code() << " \""
                  << s.error_message() << "\" (expected UNAUTHENTICATED"
                  << (cr.message.empty() ? "" : " \"" + cr.message + "\"") << ")\n";
      }
      if (denied) ++refused_by_cred[cr.name];
    }
  }
  std::string names;
  for (const auto& cr : creds) {
    names += (names.empty() ? "" : ", ") + cr.name + (cr.role == "none" ? " (refused " : " (") +
             std::to_string(cr.role == "none" ? refused_by_cred[cr.name] : cells / static_cast<int>(creds.size())) +
             ")";
  }
  std::cout << "credentials: " << names << "\n";
  std::cout << "authorization matrix: " << AllMethods().size() << " RPCs x " << creds.size()
            << " credentials = " << cells
            << " calls, " << unexpected_ok << " unexpected successes, " << unexpected_deny
            << " unexpected denials, " << wrong_code << " wrong refusal codes, " << missing
            << " methods without a policy\n";
  return unexpected_ok == 0 && unexpected_deny == 0 && wrong_code == 0 && missing == 0 ? 0 : 1;
}

// F35, worker bearer tokens: worker B leases a job with its token; worker A's (valid) token must not act for
// B's lease, neither under B's worker id nor under its own; no token / a wrong token is UNAUTHENTICATED. B keeps
// its lease throughout, and once B completed the job A's writes are fenced (stale lease), not refused.
int TokenLease(const std::string& addr, const std::string& ca, const std::string& user_token,
               const std::string& token_a, const std::string& id_a, const std::string& token_b,
               const std::string& id_b) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = Slurp(ca);
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");
  auto ch = grpc::CreateCustomChannel(addr, grpc::SslCredentials(o), args);
  auto sweeps = v1::SweepService::NewStub(ch);
  auto workers = v1::WorkerService::NewStub(ch);
  auto ctx = [](const std::string& token) {
    auto c = std::make_unique<grpc::ClientContext>();
    c->set_deadline(std::chrono::system_clock::now() + 10s);
    if (!token.empty()) c->AddMetadata("authorization", "Bearer " + token);
    return c;
  };
  int bad = 0, checks = 0;
  auto expect = [&](const std::string& what, const grpc::Status& s, grpc::StatusCode want) {
    ++checks;
    if (s.error_code() != want) {
      ++bad;
      std::cout << what << ": expected code " << want << ", got " << s.error_code() << " " << s.error_message()
                << "\n";
    }
  };
  {
    v1::SubmitSweepRequest r;
    r.set_spec_yaml("name: token-lease\ngrid:\n  model_size: [tiny]\n  context_length: [64]\n");
    v1::SubmitSweepResponse resp;
    auto s = sweeps->SubmitSweep(ctx(user_token).get(), r, &resp);
    if (!s.ok()) {
      std::cout << "submit as user: " << s.error_code() << " " << s.error_message() << "\n";
      return 1;
    }
  }
  for (const auto& [id, tok] : {std::pair{id_a, token_a}, std::pair{id_b, token_b}}) {
    v1::RegisterWorkerRequest r;
    r.set_worker_id(id);
    v1::RegisterWorkerResponse resp;
    expect("RegisterWorker " + id + " with its own token", workers->RegisterWorker(ctx(tok).get(), r, &resp),
           grpc::OK);
  }
  v1::Lease lease;
  {
    v1::LeaseJobRequest r;
    r.set_worker_id(id_a);
    v1::LeaseJobResponse resp;
    expect("LeaseJob as " + id_a + " with " + id_b + "'s token", workers->LeaseJob(ctx(token_b).get(), r, &resp),
           grpc::PERMISSION_DENIED);
    r.set_worker_id(id_b);
    auto s = workers->LeaseJob(ctx(token_b).get(), r, &resp);
    if (!s.ok() || !resp.job_available()) {
      std::cout << "LeaseJob as " << id_b << ": " << s.error_code() << " " << s.error_message() << " available="
                << resp.job_available() << "\n";
      return 1;
    }
    lease = resp.lease();
  }
  auto heartbeat = [&](const std::string& token, const std::string& id) {
    v1::HeartbeatRequest r;
    r.set_worker_id(id);
    *r.mutable_lease() = lease;
    r.set_step(1);
    v1::HeartbeatResponse resp;
    return workers->Heartbeat(ctx(token).get(), r, &resp);
  };
  auto checkpoint = [&](const std::string& token, const std::string& id) {
    v1::ReportCheckpointRequest r;
    r.set_worker_id(id);
    *r.mutable_lease() = lease;
    r.set_step(1);
    r.set_path("/stolen");
    v1::ReportCheckpointResponse resp;
    return workers->ReportCheckpoint(ctx(token).get(), r, &resp);
  };
  auto metrics = [&](const std::string& token, const std::string& id) {
    auto c = ctx(token);
    v1::ReportMetricsResponse resp;
    auto w = workers->ReportMetrics(c.get(), &resp);
    v1::MetricBatch b;
    b.set_worker_id(id);
    *b.mutable_lease() = lease;
    auto* p = b.add_points();
    p->set_step(1);
    p->set_name("train/loss");
    p->set_value(id == id_b ? 1.0 : 666.0);
    w->Write(b);
    w->WritesDone();
    return w->Finish();
  };
  auto complete = [&](const std::string& token, const std::string& id) {
    v1::CompleteJobRequest r;
    r.set_worker_id(id);
    *r.mutable_lease() = lease;
    r.set_outcome(v1::OUTCOME_SUCCEEDED);
    v1::CompleteJobResponse resp;
    return workers->CompleteJob(ctx(token).get(), r, &resp);
  };
  // A's valid token, B's lease: under B's id (impersonation) and under A's own id (a leaked lease).
  for (const auto& as : {id_b, id_a}) {
    const std::string who = id_a + "'s token as " + as + " on " + id_b + "'s lease: ";
    expect(who + "Heartbeat", heartbeat(token_a, as), grpc::PERMISSION_DENIED);
    expect(who + "ReportMetrics", metrics(token_a, as), grpc::PERMISSION_DENIED);
    expect(who + "ReportCheckpoint", checkpoint(token_a, as), grpc::PERMISSION_DENIED);
    expect(who + "CompleteJob", complete(token_a, as), grpc::PERMISSION_DENIED);
  }
  for (const auto& [name, tok] : {std::pair<std::string, std::string>{"no token", ""},
                                  std::pair<std::string, std::string>{"a wrong token", "0123456789abcdef-wrong-token"}}) {
    expect(name + ": Heartbeat of " + id_b + "'s lease", heartbeat(tok, id_b), grpc::UNAUTHENTICATED);
    expect(name + ": CompleteJob of " + id_b + "'s lease", complete(tok, id_b), grpc::UNAUTHENTICATED);
    v1::RegisterWorkerRequest r;
    r.set_worker_id(id_b);
    v1::RegisterWorkerResponse resp;
    expect(name + ": RegisterWorker", workers->RegisterWorker(ctx(tok).get(), r, &resp), grpc::UNAUTHENTICATED);
  }
  // B still holds its lease and finishes the job; afterwards A's writes meet the fence.
  expect(id_b + ": Heartbeat of its own lease", heartbeat(token_b, id_b), grpc::OK);
  expect(id_b + ": ReportMetrics of its own lease", metrics(token_b, id_b), grpc::OK);
  expect(id_b + ": CompleteJob of its own lease", complete(token_b, id_b), grpc::OK);
  expect(id_a + "'s token on the ended lease: Heartbeat", heartbeat(token_a, id_a), grpc::FAILED_PRECONDITION);
  std::cout << "worker tokens: " << checks - bad << "/" << checks << " expectations held (another worker's token "
            << "refused on a lease, no/wrong token UNAUTHENTICATED, the holder unaffected)\n";
  return bad == 0 ? 0 : 1;
}

}  // namespace

// F13: THREADS client threads call ListJobs(SWEEP) back to back for SECONDS (10 s deadline each, a fresh channel per
// thread so they do not share one HTTP/2 connection). Prints "flood: calls N ok A busy B other C" (busy: the
// scheduler's RESOURCE_EXHAUSTED "scheduler busy"); exit 0 unless a call failed otherwise.
int Flood(const std::string& addr, int threads, double seconds, int64_t sweep_id) {
  std::atomic<int64_t> ok{0}, busy{0}, other{0};
  std::mutex mu;
  std::string first_other;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      grpc::ChannelArguments a;
      a.SetInt("flood.thread", t);  // distinct arguments: a channel (and connection) of its own
      auto stub = v1::SweepService::NewStub(grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), a));
      while (std::chrono::steady_clock::now() < until) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
        // A connection attempt that fails while the scheduler's core is starved (seen once in CI-like runs: 74,944
        // calls failed fast in 8 s after one failed connect) waits for the reconnection within the deadline
        // instead of failing at once: what F13 judges is the scheduler's answer (ok or busy), not connect races.
        ctx.set_wait_for_ready(true);
        v1::ListJobsRequest req;
        req.set_sweep_id(sweep_id);
        v1::ListJobsResponse resp;
        const grpc::Status st = stub->ListJobs(&ctx, req, &resp);
        if (st.ok()) {
          ++ok;
        } else if (st.error_code() == grpc::RESOURCE_EXHAUSTED &&
                   st.error_message().rfind("scheduler busy", 0) == 0) {
          ++busy;
        } else {
          ++other;
          std::lock_guard<std::mutex> lk(mu);
          if (first_other.empty()) first_other = std::to_string(st.error_code()) + " " + st.error_message();
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  std::cout << "flood: calls " << ok + busy + other << " ok " << ok << " busy " << busy << " other " << other;
  if (!first_other.empty()) std::cout << " (first: " << first_other << ")";
  std::cout << std::endl;
  return other == 0 ? 0 : 1;
}

// F38: WORKERS simulated workers speak the real WorkerService API until SIGTERM (or SECONDS): each leases a job
// (asks again after 200 ms when there is none), holds it HOLD_MS (uniform in [HOLD_MS/2, 3 HOLD_MS/2]) with a
// heartbeat every HB_MS and one train/loss point per beat (steps 1, 2, ...: a one-batch ReportMetrics stream), then
// completes it as succeeded. As the real worker does, a write answered FAILED_PRECONDITION drops the lease
// (fenced), no renewal within TTL_MS of the last renewed send on the monotonic clock drops it too (self-fence), and
// nothing more is written for a dropped lease; other errors are retried on the next beat (another replica of ADDRS,
// a comma list, on UNAVAILABLE). On SIGTERM a held job is completed, then the worker stops.
// Writes "HB <start_unix_ms> <latency_ms> <grpc code>" per heartbeat to HB_FILE, and at the end
// "sim: cycles N fenced F self_fenced S errors E beats B" on stdout.
std::atomic<bool> g_sim_stop{false};

int SimWorkers(const std::string& addrs_csv, int workers, int hb_ms, int hold_ms, int ttl_ms, double seconds,
               const std::string& hb_file) {
  std::vector<std::string> addrs;
  std::stringstream as(addrs_csv);
  for (std::string x; std::getline(as, x, ',');)
    if (!x.empty()) addrs.push_back(x);
  if (addrs.empty()) return 2;
  std::signal(SIGTERM, [](int) { g_sim_stop = true; });
  // A few connections per replica, shared by the workers (as many processes' workers would share a network).
  std::vector<std::vector<std::shared_ptr<grpc::Channel>>> chans(addrs.size());
  for (size_t r = 0; r < addrs.size(); ++r) {
    for (int c = 0; c < 8; ++c) {
      grpc::ChannelArguments a;
      a.SetInt("sim.channel", c);
      chans[r].push_back(grpc::CreateCustomChannel(addrs[r], grpc::InsecureChannelCredentials(), a));
    }
  }
  std::ofstream hbf(hb_file);
  std::mutex hb_mu;
  std::atomic<int64_t> cycles{0}, fenced{0}, self_fenced{0}, errors{0}, beats{0};
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  auto now_ms = [] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  };
  auto deadline = [](grpc::ClientContext& c, int ms) {
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(ms));
  };
  std::vector<std::thread> ts;
  for (int w = 0; w < workers; ++w) {
    ts.emplace_back([&, w] {
      std::mt19937 rng(1000 + w);
      const std::string id = "sim-" + std::to_string(w);
      size_t replica = w % addrs.size();
      auto stub = [&] { return v1::WorkerService::NewStub(chans[replica][w % 8]); };
      auto next_replica = [&](const grpc::Status& s) {
        if (s.error_code() == grpc::UNAVAILABLE || s.error_code() == grpc::DEADLINE_EXCEEDED)
          replica = (replica + 1) % addrs.size();
      };
      bool registered = false;
      auto sleep_ms = [](int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); };
      while (!g_sim_stop && std::chrono::steady_clock::now() < until) {
        if (!registered) {
          grpc::ClientContext c;
          deadline(c, 2000);
          v1::RegisterWorkerRequest r;
          r.set_worker_id(id);
          r.set_hostname("sim");
          r.set_version("sim");
          v1::RegisterWorkerResponse resp;
          const auto s = stub()->RegisterWorker(&c, r, &resp);
          if (!s.ok()) {
            next_replica(s);
            sleep_ms(300);
            continue;
          }
          registered = true;
        }
        grpc::ClientContext lc;
        deadline(lc, 2000);
        v1::LeaseJobRequest lr;
        lr.set_worker_id(id);
        v1::LeaseJobResponse lresp;
        const auto lease_sent = std::chrono::steady_clock::now();
        const auto ls = stub()->LeaseJob(&lc, lr, &lresp);
        if (!ls.ok()) {
          if (ls.error_code() == grpc::FAILED_PRECONDITION || ls.error_code() == grpc::UNAUTHENTICATED) registered = false;
          next_replica(ls);
          ++errors;
          sleep_ms(300);
          continue;
        }
        if (!lresp.job_available()) {
          sleep_ms(200);
          continue;
        }
        v1::Lease lease = lresp.lease();
        auto renewed = lease_sent;
        const int hold = hold_ms / 2 + static_cast<int>(rng() % std::max(1, hold_ms));
        const auto hold_until = std::chrono::steady_clock::now() + std::chrono::milliseconds(hold);
        bool dropped = false;
        for (int64_t step = 1; !dropped; ++step) {
          sleep_ms(hb_ms);
          if (std::chrono::steady_clock::now() - renewed > std::chrono::milliseconds(ttl_ms)) {
            ++self_fenced;
            dropped = true;
            break;
          }
          grpc::ClientContext hc;
          deadline(hc, ttl_ms);
          v1::HeartbeatRequest hr;
          hr.set_worker_id(id);
          *hr.mutable_lease() = lease;
          hr.set_step(step);
          v1::HeartbeatResponse hresp;
          const auto sent = std::chrono::steady_clock::now();
          const int64_t sent_unix = now_ms();
          const auto hs = stub()->Heartbeat(&hc, hr, &hresp);
          const double lat = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - sent).count();
          ++beats;
          {
            std::lock_guard<std::mutex> lk(hb_mu);
            hbf << "HB " << sent_unix << " " << lat << " " << hs.error_code() << "\n";
          }
          if (hs.ok()) {
            renewed = sent;
            if (hresp.has_lease()) lease.set_expires_unix_ms(hresp.lease().expires_unix_ms());
          } else if (hs.error_code() == grpc::FAILED_PRECONDITION) {
            ++fenced;
            dropped = true;
            break;
          } else {
            next_replica(hs);
            continue;
          }
          grpc::ClientContext mc;
          deadline(mc, 2000);
          v1::ReportMetricsResponse mresp;
          auto stream = stub()->ReportMetrics(&mc, &mresp);
          v1::MetricBatch b;
          b.set_worker_id(id);
          *b.mutable_lease() = lease;
          auto* pt = b.add_points();
          pt->set_step(step);
          pt->set_name("train/loss");
          pt->set_value(4.0 / (1.0 + 0.1 * step));
          pt->set_time_unix_ms(now_ms());
          stream->Write(b);
          stream->WritesDone();
          const auto ms = stream->Finish();
          if (ms.error_code() == grpc::FAILED_PRECONDITION) {
            ++fenced;
            dropped = true;
            break;
          }
          if (std::chrono::steady_clock::now() >= hold_until || g_sim_stop) break;
        }
        if (dropped) continue;
        // Complete, retried (another replica on UNAVAILABLE) while the lease may still be ours.
        for (;;) {
          grpc::ClientContext cc;
          deadline(cc, 2000);
          v1::CompleteJobRequest cr;
          cr.set_worker_id(id);
          *cr.mutable_lease() = lease;
          cr.set_outcome(v1::OUTCOME_SUCCEEDED);
          v1::CompleteJobResponse cresp;
          const auto cs = stub()->CompleteJob(&cc, cr, &cresp);
          if (cs.ok()) {
            ++cycles;
            break;
          }
          if (cs.error_code() == grpc::FAILED_PRECONDITION) {
            ++fenced;
            break;
          }
          next_replica(cs);
          if (std::chrono::steady_clock::now() - renewed > std::chrono::milliseconds(ttl_ms)) {
            ++self_fenced;
            break;
          }
          sleep_ms(200);
        }
      }
    });
  }
  for (auto& t : ts) t.join();
  std::cout << "sim: cycles " << cycles << " fenced " << fenced << " self_fenced " << self_fenced << " errors "
            << errors << " beats " << beats << std::endl;
  return 0;
}

int main(int argc, char** argv) {
  std::vector<std::string> a(argv + 1, argv + argc);
  if (a.size() >= 2) {
    const std::string& cmd = a[0];
    if (cmd == "stale-write" && a.size() == 7)
      return StaleWrite(a[1], a[2], std::stoll(a[3]), std::stoi(a[4]), std::stoll(a[5]), a[6]);
    if (cmd == "malformed") return Malformed(a[1]);
    if (cmd == "oversize") return Oversize(a[1]);
    if (cmd == "invalid-specs") return InvalidSpecs(a[1]);
    if (cmd == "dup-submit") return DupSubmit(a[1]);
    if (cmd == "deadlines") return Deadlines(a[1]);
    if (cmd == "flood" && a.size() == 5) return Flood(a[1], std::stoi(a[2]), std::stod(a[3]), std::stoll(a[4]));
    if (cmd == "sim-workers" && a.size() == 8)
      return SimWorkers(a[1], std::stoi(a[2]), std::stoi(a[3]), std::stoi(a[4]), std::stoi(a[5]), std::stod(a[6]),
                        a[7]);
    if (cmd == "deadline-cap" && a.size() == 4) return DeadlineCap(a[1], std::stoi(a[2]), std::stoi(a[3]));
    if (cmd == "hb-probe" && a.size() == 10)
      return HbProbe(a[1], std::stod(a[2]), std::stoi(a[3]), a[4], std::stoll(a[5]), std::stoi(a[6]),
                     std::stoll(a[7]), a[8], a[9]);
    if (cmd == "authz-matrix" && a.size() >= 6) {
      // authz-matrix ADDR CA USER_TOKEN WCERT WKEY [WORKER_TOKEN] [NAME:ROLE:TOKEN[:MESSAGE] ...]
      std::string worker_token;
      std::vector<ExtraCred> extra;
      for (size_t i = 6; i < a.size(); ++i) {
        if (i == 6 && a[i].find(':') == std::string::npos) {
          worker_token = a[i];
          continue;
        }
        ExtraCred e;
        std::stringstream ss(a[i]);
        std::getline(ss, e.name, ':');
        std::getline(ss, e.role, ':');
        std::getline(ss, e.token, ':');
        std::getline(ss, e.message);
        if (e.name.empty() || e.token.empty() ||
            (e.role != "none" && e.role != "user" && e.role != "admin" && e.role != "worker")) {
          std::cerr << "authz-matrix: bad credential spec #" << i << " (NAME:ROLE:TOKEN[:MESSAGE])\n";
          return 2;
        }
        extra.push_back(e);
      }
      return AuthzMatrix(a[1], a[2], a[3], a[4], a[5], worker_token, extra);
    }
    if (cmd == "token-lease" && a.size() == 8) return TokenLease(a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
  }
  std::cerr << "usage: ablate-fault-rpc stale-write|malformed|oversize|invalid-specs|dup-submit|deadlines|"
               "deadline-cap|hb-probe|authz-matrix|token-lease|flood ADDR ...\n"
               "       ablate-fault-rpc sim-workers ADDRS WORKERS HB_MS HOLD_MS TTL_MS SECONDS HB_FILE\n";
  return 2;
}
