// Cron expressions (5 fields, UTC, so no DST): minute hour day-of-month month day-of-week. Each field: *, N, A-B,
// lists (A,B), steps (*/S, A-B/S, N/S = N-max/S); month names jan-dec and day names sun-sat (case-insensitive) where
// a number goes; day-of-week 0-7 (0 and 7 are Sunday). Shortcuts @hourly @daily @midnight @weekly @monthly @yearly
// @annually. As in Vixie cron, when both day fields are restricted (neither is "*" / "*/1") a day matches if either
// does. An expression that can never fire (0 0 30 2 *) parses; CronNext returns -1 for it.
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
