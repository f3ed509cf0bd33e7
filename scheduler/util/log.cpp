#include "scheduler/util/log.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <regex>

namespace ablate::scheduler {
namespace {

// Quote values that would break the key=value grammar.
std::string Quote(std::string_view v) {
  bool plain = !v.empty();
  for (char c : v) {
    if (c == ' ' || c == '"' || c == '=' || c == '\n' || c == '\\' || c == '\t') plain = false;
  }
  if (plain) return std::string(v);
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out + "\"";
}

}  // namespace

void Log(std::string_view level, std::string_view event, std::initializer_list<LogField> fields) {
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char ts[32];
  std::snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms % 1000));
  std::string line = "ts=" + std::string(ts) + " level=" + std::string(level) + " event=" + Quote(event);
  for (const auto& [k, v] : fields) line += " " + std::string(k) + "=" + Quote(v);
  line += "\n";
  static std::mutex mu;  // keep lines whole when threads log at once
  std::lock_guard<std::mutex> lock(mu);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

std::string RedactDsn(std::string_view dsn) {
  std::string s(dsn);
  // URI form: postgresql://user:secret@host/db
  static const std::regex uri(R"((postgres(?:ql)?://[^:/@]*:)[^@]*@)");
  s = std::regex_replace(s, uri, "$1***@");
  // key=value form, possibly quoted: password='se cret' / password=secret
  static const std::regex kv(R"((password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+))", std::regex::icase);
  s = std::regex_replace(s, kv, "$1***");
  // URI query parameter: ?password=secret
  static const std::regex qp(R"(([?&]password=)[^&]*)", std::regex::icase);
  return std::regex_replace(s, qp, "$1***");
}

}  // namespace ablate::scheduler
