// Cron expressions (5 fields, UTC): minute hour day-of-month month day-of-week. Each field: *, N, A-B, lists
// (A,B), steps (*/N, A-B/N); day-of-week 0-7 (0 and 7 are Sunday). Shortcuts @hourly @daily @weekly @monthly.
// As in Vixie cron, when both day fields are restricted a day matches if either does.
#pragma once
#include <bitset>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace ablate::scheduler::sweep {

struct CronExpr {
  std::bitset<60> minute;
  std::bitset<24> hour;
  std::bitset<32> dom;  // 1..31
  std::bitset<13> month;  // 1..12
  std::bitset<7> dow;   // 0..6
  bool dom_star = true, dow_star = true;
};

absl::StatusOr<CronExpr> ParseCron(const std::string& text);
// The first matching minute strictly after `after_unix_s` (seconds), in UTC; -1 if none within ~5 years.
int64_t CronNext(const CronExpr& c, int64_t after_unix_s);

}  // namespace ablate::scheduler::sweep
