// Bounds how many calls of one class run at once. The scheduler puts its client-facing calls (SweepService: submit,
// list, get, compare, cancel, schedules) behind one, so that a burst of them — or a CPU-starved process — cannot
// occupy every database connection and handler while workers' heartbeats wait (RELIABILITY F13: heartbeats come
// first). Workers' calls are never gated. A gated call waits for a slot up to its own deadline; past it, the caller
// answers RESOURCE_EXHAUSTED ("scheduler busy") and the client retries later.
#pragma once
#include <chrono>
#include <condition_variable>
#include <mutex>

namespace ablate::scheduler {

class CallGate {
 public:
  using Clock = std::chrono::steady_clock;
  // slots <= 0: no limit (Acquire always succeeds at once).
  explicit CallGate(int slots) : slots_(slots) {}
  CallGate(const CallGate&) = delete;
  CallGate& operator=(const CallGate&) = delete;

  // Takes a slot, waiting until `deadline` at most; false when none came free in time.
  bool Acquire(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lk(mu_);
    if (slots_ <= 0) {
      ++used_;
      return true;
    }
    ++waiting_;
    const bool got = cv_.wait_until(lk, deadline, [&] { return used_ < slots_; });
    --waiting_;
    if (got) ++used_;
    return got;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      --used_;
    }
    cv_.notify_one();
  }
  int slots() const { return slots_; }
  int in_use() const {
    std::lock_guard<std::mutex> lk(mu_);
    return used_;
  }
  int waiting() const {
    std::lock_guard<std::mutex> lk(mu_);
    return waiting_;
  }

  // Holds a slot for a scope (ok() says whether it got one).
  class Slot {
   public:
    Slot(CallGate* gate, Clock::time_point deadline) : gate_(gate), ok_(gate == nullptr || gate->Acquire(deadline)) {}
    ~Slot() {
      if (gate_ != nullptr && ok_) gate_->Release();
    }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    bool ok() const { return ok_; }

   private:
    CallGate* gate_;
    bool ok_;
  };

 private:
  const int slots_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int used_ = 0;
  int waiting_ = 0;
};

}  // namespace ablate::scheduler
