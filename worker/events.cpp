#include "worker/events.h"

#include <limits>

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <nlohmann/json.hpp>

namespace ablate::worker {
namespace {

using nlohmann::json;

bool GetInt(const json& j, const char* key, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end()) return false;
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return true;
  }
  // Accept 10.0 but not 10.5: some JSON writers print integers as floats.
  if (it->is_number_float()) {
    double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d)) {
      *out = static_cast<int64_t>(d);
      return true;
    }
  }
  return false;
}

std::optional<Event> Fail(std::string* error, std::string why) {
  if (error) *error = std::move(why);
  return std::nullopt;
}

}  // namespace

std::optional<Event> ParseEventLine(std::string_view line, std::string* error) {
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);
  if (line.empty()) return Fail(error, "empty line");
  json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Fail(error, "not valid JSON");
  if (!j.is_object()) return Fail(error, "not a JSON object");
  auto ev = j.find("event");
  if (ev == j.end() || !ev->is_string()) return Fail(error, "missing string field 'event'");
  const std::string kind = ev->get<std::string>();

  if (kind == "started") {
    StartedEvent e;
    GetInt(j, "total_steps", &e.total_steps);
    GetInt(j, "params", &e.params);
    return e;
  }
  if (kind == "metrics") {
    MetricsEvent e;
    if (!GetInt(j, "step", &e.step)) return Fail(error, "metrics: missing integer 'step'");
    GetInt(j, "time_unix_ms", &e.time_unix_ms);
    auto vals = j.find("values");
    if (vals == j.end() || !vals->is_object()) return Fail(error, "metrics: missing object 'values'");
    for (auto it = vals->begin(); it != vals->end(); ++it) {
      // NaN/Inf cannot be written in JSON; a diverged run reports it through 'finished' instead.
      if (it.value().is_number()) {
        e.values.emplace_back(it.key(), it.value().get<double>());
      } else if (it.value().is_string()) {
        // Non-finite values travel as strings: "NaN", "Infinity", "-Infinity" (the worker's NaN guard needs them).
        const std::string& v = it.value().get_ref<const std::string&>();
        if (v == "NaN" || v == "nan") e.values.emplace_back(it.key(), std::numeric_limits<double>::quiet_NaN());
        else if (v == "Infinity" || v == "inf") e.values.emplace_back(it.key(), std::numeric_limits<double>::infinity());
        else if (v == "-Infinity" || v == "-inf") e.values.emplace_back(it.key(), -std::numeric_limits<double>::infinity());
      }
    }
    if (e.values.empty()) return Fail(error, "metrics: no numeric values");
    return e;
  }
  if (kind == "checkpoint") {
    CheckpointEvent e;
    if (!GetInt(j, "step", &e.step)) return Fail(error, "checkpoint: missing integer 'step'");
    auto p = j.find("path");
    if (p == j.end() || !p->is_string() || p->get<std::string>().empty())
      return Fail(error, "checkpoint: missing string 'path'");
    e.path = p->get<std::string>();
    return e;
  }
  if (kind == "checkpoint_abandoned") {
    CheckpointAbandonedEvent e;
    if (!GetInt(j, "step", &e.step)) return Fail(error, "checkpoint_abandoned: missing integer 'step'");
    if (auto r = j.find("reason"); r != j.end() && r->is_string()) e.reason = r->get<std::string>();
    return e;
  }
  if (kind == "finished") {
    FinishedEvent e;
    auto s = j.find("status");
    if (s == j.end() || !s->is_string()) return Fail(error, "finished: missing string 'status'");
    const std::string status = s->get<std::string>();
    if (status == "succeeded") {
      e.succeeded = true;
    } else if (status == "failed") {
      e.succeeded = false;
    } else {
      return Fail(error, "finished: unknown status '" + status + "'");
    }
    if (auto fc = j.find("failure_class"); fc != j.end() && fc->is_string()) e.failure_class = fc->get<std::string>();
    if (auto m = j.find("message"); m != j.end() && m->is_string()) e.message = m->get<std::string>();
    return e;
  }
  return Fail(error, "unknown event '" + kind + "'");
}

void LineSplitter::Feed(std::string_view data, const std::function<void(std::string_view)>& on_line) {
  while (!data.empty()) {
    size_t nl = data.find('\n');
    std::string_view chunk = data.substr(0, nl);
    if (!discarding_) {
      if (buf_.size() + chunk.size() > max_line_) {
        discarding_ = true;
        buf_.clear();
      } else {
        buf_.append(chunk);
      }
    }
    if (nl == std::string_view::npos) return;
    if (discarding_) {
      ++overlong_;
      discarding_ = false;
    } else {
      on_line(buf_);
    }
    buf_.clear();
    data.remove_prefix(nl + 1);
  }
}

void LineSplitter::Finish(const std::function<void(std::string_view)>& on_line) {
  if (discarding_) {
    ++overlong_;
  } else if (!buf_.empty()) {
    on_line(buf_);
  }
  buf_.clear();
  discarding_ = false;
}

EventStats PumpEvents(int fd, const std::function<void(const Event&)>& on_event,
                      const std::function<void(std::string_view, const std::string&)>& on_malformed) {
  EventStats stats;
  LineSplitter splitter;
  auto handle = [&](std::string_view line) {
    ++stats.lines;
    std::string why;
    if (auto ev = ParseEventLine(line, &why)) {
      ++stats.events;
      on_event(*ev);
    } else {
      ++stats.malformed;
      if (on_malformed) on_malformed(line, why);
    }
  };
  char buf[64 * 1024];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    splitter.Feed(std::string_view(buf, static_cast<size_t>(n)), handle);
  }
  splitter.Finish(handle);
  stats.malformed += splitter.overlong_lines();
  stats.lines += splitter.overlong_lines();
  return stats;
}

}  // namespace ablate::worker
