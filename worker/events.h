// Events that ablate-train writes on its --events_fd pipe (docs/contracts.md §3), parsed line by line.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace ablate::worker {

struct StartedEvent {
  int64_t total_steps = -1;
  int64_t params = -1;
};
struct MetricsEvent {
  int64_t step = 0;
  int64_t time_unix_ms = 0;  // 0 when the child did not say; the worker stamps it
  std::vector<std::pair<std::string, double>> values;
};
struct CheckpointEvent {
  int64_t step = 0;
  std::string path;
};
// A background checkpoint save that ablate-train gave up before committing it (--checkpoint_deadline_s): nothing
// to record, the worker only logs it.
struct CheckpointAbandonedEvent {
  int64_t step = 0;
  std::string reason;
};
struct FinishedEvent {
  bool succeeded = false;
  std::string failure_class;  // "diverged" | "oom" | "invalid_config" | "crash" | "" (as written by the child)
  std::string message;
};
using Event = std::variant<StartedEvent, MetricsEvent, CheckpointEvent, FinishedEvent, CheckpointAbandonedEvent>;

// Parses one line. Returns nullopt (and says why in *error) for anything that is not a well-formed event:
// the child's pipe is untrusted input, so a bad line is skipped, never fatal.
std::optional<Event> ParseEventLine(std::string_view line, std::string* error = nullptr);

// Splits a byte stream into lines. Lines longer than max_line are dropped whole (counted as overlong).
class LineSplitter {
 public:
  explicit LineSplitter(size_t max_line = 1 << 20) : max_line_(max_line) {}
  // Calls on_line for each complete line in data (without the '\n').
  void Feed(std::string_view data, const std::function<void(std::string_view)>& on_line);
  // A trailing line without '\n' at EOF.
  void Finish(const std::function<void(std::string_view)>& on_line);
  int64_t overlong_lines() const { return overlong_; }

 private:
  size_t max_line_;
  std::string buf_;
  bool discarding_ = false;
  int64_t overlong_ = 0;
};

// Reads the event pipe until EOF, parsing every line. Blocking; run it on its own thread.
struct EventStats {
  int64_t lines = 0;
  int64_t events = 0;
  int64_t malformed = 0;  // includes overlong lines
};
EventStats PumpEvents(int fd, const std::function<void(const Event&)>& on_event,
                      const std::function<void(std::string_view line, const std::string& why)>& on_malformed = {});

}  // namespace ablate::worker
