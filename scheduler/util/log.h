// One-line structured logs on stderr: `ts=... level=info event=lease_granted job_id=7 ...`.
#pragma once
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

namespace ablate::scheduler {

using LogField = std::pair<std::string_view, std::string>;

void Log(std::string_view level, std::string_view event, std::initializer_list<LogField> fields = {});
inline void LogInfo(std::string_view e, std::initializer_list<LogField> f = {}) { Log("info", e, f); }
inline void LogWarn(std::string_view e, std::initializer_list<LogField> f = {}) { Log("warn", e, f); }
inline void LogError(std::string_view e, std::initializer_list<LogField> f = {}) { Log("error", e, f); }

// A libpq DSN (key=value or URI form) with the password replaced by "***", safe to log.
std::string RedactDsn(std::string_view dsn);

}  // namespace ablate::scheduler
