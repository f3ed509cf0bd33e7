// The time budget of the work this thread does for one call: an RPC handler (the client's deadline, clamped to the
// method's cap: RELIABILITY F36), one step of the leader loop, one /metrics scrape. The PostgreSQL layer never waits
// past it: each statement gets at most the time that is left as its server-side statement_timeout/lock_timeout
// (a locked table, F17), and a connection that does not answer by then is abandoned (a half-open TCP connection or
// a stalled server, F18), so a handler thread never hangs on the database. Scopes nest; an inner scope can only
// shorten the budget of the outer one.
#pragma once
#include <chrono>
#include <optional>

namespace ablate::scheduler {

class CallBudget {
 public:
  using Clock = std::chrono::steady_clock;
  explicit CallBudget(Clock::time_point deadline) : prev_(current_) {
    current_ = (prev_ && *prev_ < deadline) ? *prev_ : deadline;
  }
  explicit CallBudget(std::chrono::milliseconds d) : CallBudget(Clock::now() + d) {}
  ~CallBudget() { current_ = prev_; }
  CallBudget(const CallBudget&) = delete;
  CallBudget& operator=(const CallBudget&) = delete;

  // The deadline of the innermost scope on this thread; nullopt outside any scope.
  static std::optional<Clock::time_point> Deadline() { return current_; }

 private:
  std::optional<Clock::time_point> prev_;
  static inline thread_local std::optional<Clock::time_point> current_;
};

}  // namespace ablate::scheduler
