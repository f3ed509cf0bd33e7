#include "worker/util.h"

#include <cstdio>
#include <fstream>
#include <ctime>
#include <random>
#include <thread>

namespace ablate::worker {

void Stopper::Stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
}

bool Stopper::SleepFor(std::chrono::milliseconds d) {
  std::unique_lock<std::mutex> lk(mu_);
  return !cv_.wait_for(lk, d, [&] { return stopped_.load(); });
}

void LogLine(const std::string& line) {
  static std::mutex mu;
  using namespace std::chrono;
  auto now = system_clock::now();
  std::time_t t = system_clock::to_time_t(now);
  int ms = static_cast<int>(duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  std::lock_guard<std::mutex> lk(mu);
  std::fprintf(stderr, "%s.%03dZ worker: %s\n", ts, ms, line.c_str());
  std::fflush(stderr);
}

std::chrono::milliseconds Backoff(int attempt, std::chrono::milliseconds base, std::chrono::milliseconds cap) {
  thread_local std::mt19937 rng{std::random_device{}()};
  double d = static_cast<double>(base.count());
  for (int i = 0; i < attempt && d < cap.count(); ++i) d *= 2;
  if (d > cap.count()) d = static_cast<double>(cap.count());
  std::uniform_real_distribution<double> jitter(0.5, 1.5);
  return std::chrono::milliseconds(static_cast<int64_t>(d * jitter(rng)));
}

grpc::Status CallWithRetry(const std::string& what, const std::function<grpc::Status(grpc::ClientContext*)>& call,
                           std::chrono::milliseconds timeout, Stopper* stop, std::chrono::milliseconds give_up_after) {
  auto start = std::chrono::steady_clock::now();
  for (int attempt = 0;; ++attempt) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    grpc::Status s = call(&ctx);
    if (s.error_code() != grpc::StatusCode::UNAVAILABLE) return s;
    if (stop && stop->stopped()) return s;
    if (give_up_after.count() > 0 && std::chrono::steady_clock::now() - start > give_up_after) return s;
    auto wait = Backoff(attempt);
    if (attempt == 0 || attempt % 10 == 0)
      Log(what, ": scheduler unavailable (", s.error_message(), "), retrying in ", wait.count(), "ms");
    if (stop) {
      if (!stop->SleepFor(wait)) return s;
    } else {
      std::this_thread::sleep_for(wait);
    }
  }
}

bool WriteLeaseDeadline(const std::string& path, std::chrono::steady_clock::time_point deadline, std::string* error) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << "monotonic_deadline_ns "
      << std::chrono::duration_cast<std::chrono::nanoseconds>(deadline.time_since_epoch()).count() << "\n";
    if (!f.flush()) {
      *error = "cannot write " + tmp;
      return false;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    *error = "cannot rename " + tmp + " to " + path;
    return false;
  }
  return true;
}

}  // namespace ablate::worker
