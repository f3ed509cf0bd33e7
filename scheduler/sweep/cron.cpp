#include "scheduler/sweep/cron.h"

#include <ctime>
#include <sstream>
#include <vector>

#include "absl/status/status.h"

namespace ablate::scheduler::sweep {
namespace {

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError("cron " + field + ": " + why);
}

bool ParseNum(const std::string& s, int* out) {
  if (s.empty() || s.size() > 3) return false;
  for (char ch : s) if (ch < '0' || ch > '9') return false;
  *out = std::stoi(s);
  return true;
}

// A number, or (names != nullptr) a three-letter name, case-insensitive: names[i] has the value base + i.
bool ParseValue(const std::string& s, const char* const* names, int n_names, int base, int* out) {
  if (ParseNum(s, out)) return true;
  if (names == nullptr || s.size() != 3) return false;
  std::string low;
  for (char ch : s) low += static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
  for (int i = 0; i < n_names; ++i) {
    if (low == names[i]) {
      *out = base + i;
      return true;
    }
  }
  return false;
}

constexpr const char* kMonths[] = {"jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"};
constexpr const char* kDays[] = {"sun", "mon", "tue", "wed", "thu", "fri", "sat"};

// Fills bits lo..hi of `set` per one field; *star when the field is "*" (or "*/1").
template <size_t N>
absl::Status ParseField(const std::string& text, const char* name, int lo, int hi, std::bitset<N>* set, bool* star,
                        const char* const* names = nullptr, int n_names = 0, int name_base = 0) {
  *star = text == "*" || text == "*/1";
  if (!text.empty() && text.back() == ',') return Bad(name, "empty list element in '" + text + "'");
  std::stringstream ss(text);
  std::string part;
  bool any = false;
  while (std::getline(ss, part, ',')) {
    any = true;
    int step = 1;
    bool stepped = false;
    if (part.empty()) return Bad(name, "empty list element in '" + text + "'");
    if (auto slash = part.find('/'); slash != std::string::npos) {
      if (!ParseNum(part.substr(slash + 1), &step) || step < 1) {
        return Bad(name, "bad step in '" + part + "'");
      }
      part = part.substr(0, slash);
      stepped = true;
    }
    int a = lo, b = hi;
    if (part != "*") {
      if (auto dash = part.find('-'); dash != std::string::npos) {
        if (!ParseValue(part.substr(0, dash), names, n_names, name_base, &a) ||
            !ParseValue(part.substr(dash + 1), names, n_names, name_base, &b)) {
          return Bad(name, "bad range '" + part + "'");
        }
      } else {
        if (!ParseValue(part, names, n_names, name_base, &a)) {
          return Bad(name, "'" + part + "' is not a number, range, list, step or *");
        }
        b = stepped ? hi : a;  // "N/S" is "N-hi/S" (as in cronie), not just N
      }
    }
    if (a < lo || b > hi || a > b) {
      return Bad(name, "'" + part + "' out of range " + std::to_string(lo) + "-" + std::to_string(hi));
    }
    for (int v = a; v <= b; v += step) set->set(static_cast<size_t>(v));
  }
  if (!any) return Bad(name, "empty");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CronExpr> ParseCron(const std::string& raw) {
  std::string text = raw;
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t' || text.back() == '\n')) text.pop_back();
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.erase(0, 1);
  if (text == "@yearly" || text == "@annually") text = "0 0 1 1 *";
  else if (text == "@hourly") text = "0 * * * *";
  else if (text == "@daily" || text == "@midnight") text = "0 0 * * *";
  else if (text == "@weekly") text = "0 0 * * 0";
  else if (text == "@monthly") text = "0 0 1 * *";
  else if (!text.empty() && text[0] == '@') return absl::InvalidArgumentError("cron: unknown shortcut '" + text + "'");
  if (text.size() > 200) return absl::InvalidArgumentError("cron: longer than 200 characters");
  std::stringstream ss(text);
  std::vector<std::string> f;
  for (std::string x; ss >> x;) f.push_back(x);
  if (f.size() != 5) {
    return absl::InvalidArgumentError("cron '" + raw + "': expected 5 fields (minute hour day-of-month month "
                                      "day-of-week), got " + std::to_string(f.size()));
  }
  CronExpr c;
  bool star = false;
  if (auto st = ParseField(f[0], "minute", 0, 59, &c.minute, &star); !st.ok()) return st;
  if (auto st = ParseField(f[1], "hour", 0, 23, &c.hour, &star); !st.ok()) return st;
  if (auto st = ParseField(f[2], "day-of-month", 1, 31, &c.dom, &c.dom_star); !st.ok()) return st;
  if (auto st = ParseField(f[3], "month", 1, 12, &c.month, &star, kMonths, 12, 1); !st.ok()) return st;
  std::bitset<8> dow8;
  if (auto st = ParseField(f[4], "day-of-week", 0, 7, &dow8, &c.dow_star, kDays, 7, 0); !st.ok()) return st;
  for (int i = 0; i < 7; ++i) c.dow[static_cast<size_t>(i)] = dow8[static_cast<size_t>(i)];
  if (dow8[7]) c.dow[0] = true;
  return c;
}

int64_t CronNext(const CronExpr& c, int64_t after_unix_s) {
  int64_t t = (after_unix_s / 60 + 1) * 60;  // next whole minute
  const int64_t limit = t + int64_t{5} * 366 * 86400;
  while (t < limit) {
    time_t tt = static_cast<time_t>(t);
    struct tm tm {};
    gmtime_r(&tt, &tm);
    bool dom_ok = c.dom[static_cast<size_t>(tm.tm_mday)], dow_ok = c.dow[static_cast<size_t>(tm.tm_wday)];
    bool day_ok = (c.dom_star || c.dow_star) ? (dom_ok && dow_ok) : (dom_ok || dow_ok);
    if (!c.month[static_cast<size_t>(tm.tm_mon + 1)] || !day_ok) {
      t += int64_t{86400} - (tm.tm_hour * 3600 + tm.tm_min * 60);  // next day 00:00
      continue;
    }
    if (!c.hour[static_cast<size_t>(tm.tm_hour)]) {
      t += 3600 - tm.tm_min * 60;  // next hour :00
      continue;
    }
    if (!c.minute[static_cast<size_t>(tm.tm_min)]) {
      t += 60;
      continue;
    }
    return t;
  }
  return -1;
}

}  // namespace ablate::scheduler::sweep
