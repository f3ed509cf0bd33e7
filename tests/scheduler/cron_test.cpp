// Table-driven tests of the cron grammar (scheduler/sweep/cron.h) and of next-fire computation (UTC).
#include "scheduler/sweep/cron.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ctime>
#include <string>
#include <vector>

namespace ablate::scheduler::sweep {
namespace {

using ::testing::HasSubstr;

// "YYYY-MM-DD HH:MM" (UTC) -> unix seconds.
int64_t T(const std::string& s) {
  struct tm tm {};
  EXPECT_EQ(std::sscanf(s.c_str(), "%d-%d-%d %d:%d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour, &tm.tm_min), 5)
      << s;
  tm.tm_year -= 1900;
  tm.tm_mon -= 1;
  return static_cast<int64_t>(timegm(&tm));
}

std::string Fmt(int64_t t) {
  if (t < 0) return "never";
  time_t tt = static_cast<time_t>(t);
  struct tm tm {};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &tm);
  return buf;
}

template <size_t N>
std::vector<int> Bits(const std::bitset<N>& b) {
  std::vector<int> v;
  for (size_t i = 0; i < N; ++i) if (b[i]) v.push_back(static_cast<int>(i));
  return v;
}

TEST(CronParse, Fields) {
  struct Case {
    std::string expr;
    std::vector<int> minute, hour, dom, month, dow;
    bool dom_star, dow_star;
  };
  std::vector<int> all_dom, all_month, all_dow, all_hour;
  for (int i = 1; i <= 31; ++i) all_dom.push_back(i);
  for (int i = 1; i <= 12; ++i) all_month.push_back(i);
  for (int i = 0; i <= 6; ++i) all_dow.push_back(i);
  for (int i = 0; i <= 23; ++i) all_hour.push_back(i);
  const std::vector<Case> cases = {
      {"0 2 * * *", {0}, {2}, all_dom, all_month, all_dow, true, true},
      {"5,10,15 1-3 * * *", {5, 10, 15}, {1, 2, 3}, all_dom, all_month, all_dow, true, true},
      {"*/15 * * * *", {0, 15, 30, 45}, all_hour, all_dom, all_month, all_dow, true, true},
      {"10-30/10 */6 * * *", {10, 20, 30}, {0, 6, 12, 18}, all_dom, all_month, all_dow, true, true},
      {"50/5 0 * * *", {50, 55}, {0}, all_dom, all_month, all_dow, true, true},  // N/S = N-59/S
      {"0 0 1,15 * 1-5", {0}, {0}, {1, 15}, all_month, {1, 2, 3, 4, 5}, false, false},
      {"0 0 * * 7", {0}, {0}, all_dom, all_month, {0}, true, false},  // 7 is Sunday
      {"0 0 * * 5-7", {0}, {0}, all_dom, all_month, {0, 5, 6}, true, false},
      {"0 0 * jan,JUN-Aug *", {0}, {0}, all_dom, {1, 6, 7, 8}, all_dow, true, true},
      {"0 0 * * mon-fri", {0}, {0}, all_dom, all_month, {1, 2, 3, 4, 5}, true, false},
      {"0 0 * * Sun,sat", {0}, {0}, all_dom, all_month, {0, 6}, true, false},
      {"0 0 */1 * *", {0}, {0}, all_dom, all_month, all_dow, true, true},  // */1 counts as *
      {"59 23 31 12 6", {59}, {23}, {31}, {12}, {6}, false, false},
      {"@hourly", {0}, all_hour, all_dom, all_month, all_dow, true, true},
      {"@daily", {0}, {0}, all_dom, all_month, all_dow, true, true},
      {"@midnight", {0}, {0}, all_dom, all_month, all_dow, true, true},
      {"@weekly", {0}, {0}, all_dom, all_month, {0}, true, false},
      {"@monthly", {0}, {0}, {1}, all_month, all_dow, false, true},
      {"@yearly", {0}, {0}, {1}, {1}, all_dow, false, true},
      {"@annually", {0}, {0}, {1}, {1}, all_dow, false, true},
      {"  0   2 * * *  ", {0}, {2}, all_dom, all_month, all_dow, true, true},
  };
  for (const auto& c : cases) {
    auto r = ParseCron(c.expr);
    ASSERT_TRUE(r.ok()) << c.expr << ": " << r.status();
    EXPECT_EQ(Bits(r->minute), c.minute) << c.expr;
    EXPECT_EQ(Bits(r->hour), c.hour) << c.expr;
    EXPECT_EQ(Bits(r->dom), c.dom) << c.expr;
    EXPECT_EQ(Bits(r->month), c.month) << c.expr;
    EXPECT_EQ(Bits(r->dow), c.dow) << c.expr;
    EXPECT_EQ(r->dom_star, c.dom_star) << c.expr;
    EXPECT_EQ(r->dow_star, c.dow_star) << c.expr;
  }
}

TEST(CronParse, Rejected) {
  struct Case {
    std::string expr, fragment;
  };
  const std::vector<Case> cases = {
      {"", "expected 5 fields"},
      {"* * * *", "expected 5 fields"},
      {"* * * * * *", "expected 5 fields"},
      {"60 * * * *", "minute: '60' out of range 0-59"},
      {"* 24 * * *", "hour: '24' out of range 0-23"},
      {"* * 0 * *", "day-of-month: '0' out of range 1-31"},
      {"* * 32 * *", "day-of-month"},
      {"* * * 13 *", "month: '13' out of range 1-12"},
      {"* * * 0 *", "month"},
      {"* * * * 8", "day-of-week: '8' out of range 0-7"},
      {"5-1 * * * *", "minute: '5-1' out of range"},
      {"*/0 * * * *", "minute: bad step"},
      {"*/x * * * *", "minute: bad step"},
      {"1-/2 * * * *", "minute: bad range"},
      {"a * * * *", "minute: 'a' is not a number"},
      {"-1 * * * *", "minute: bad range"},
      {"1,,2 * * * *", "minute: empty list element"},
      {"1, * * * *", "minute: empty list element"},
      {"* * * * mon-", "day-of-week: bad range"},
      {"* * * jan * ", ""},  // valid (trailing space): see below
      {"* * * * jan", "day-of-week: 'jan' is not a number"},
      {"* * * mon *", "month: 'mon' is not a number"},
      {"* * * january *", "month: 'january'"},
      {"@reboot", "unknown shortcut"},
      {"@every 5m", "unknown shortcut"},
  };
  for (const auto& c : cases) {
    auto r = ParseCron(c.expr);
    if (c.fragment.empty()) {
      EXPECT_TRUE(r.ok()) << c.expr << ": " << r.status();
      continue;
    }
    ASSERT_FALSE(r.ok()) << "accepted: '" << c.expr << "'";
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.expr;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(c.fragment)) << c.expr;
  }
  auto long_expr = ParseCron(std::string(201, '*'));
  ASSERT_FALSE(long_expr.ok());
  EXPECT_THAT(std::string(long_expr.status().message()), HasSubstr("longer than 200"));
}

TEST(CronNext, Table) {
  struct Case {
    std::string expr, after, want;
  };
  const std::vector<Case> cases = {
      // strictly after: an exact match is skipped; seconds are ignored
      {"0 2 * * *", "2026-03-10 01:59", "2026-03-10 02:00"},
      {"0 2 * * *", "2026-03-10 02:00", "2026-03-11 02:00"},
      {"* * * * *", "2026-03-10 02:00", "2026-03-10 02:01"},
      {"*/15 * * * *", "2026-03-10 02:14", "2026-03-10 02:15"},
      {"*/15 * * * *", "2026-03-10 23:46", "2026-03-11 00:00"},
      // month and year ends, leap years
      {"0 0 1 * *", "2026-01-31 12:00", "2026-02-01 00:00"},
      {"30 23 31 * *", "2026-01-31 23:30", "2026-03-31 23:30"},  // skips February
      {"0 0 31 * *", "2026-04-01 00:00", "2026-05-31 00:00"},    // April has 30 days
      {"59 23 31 12 *", "2026-06-01 00:00", "2026-12-31 23:59"},
      {"0 0 1 1 *", "2026-12-31 23:59", "2027-01-01 00:00"},
      {"@yearly", "2026-01-01 00:00", "2027-01-01 00:00"},
      {"0 12 29 2 *", "2025-03-01 00:00", "2028-02-29 12:00"},  // next leap day
      {"0 0 28-31 2 *", "2028-02-28 00:00", "2028-02-29 00:00"},
      {"0 0 28-31 2 *", "2027-02-28 00:00", "2028-02-28 00:00"},
      // day-of-week (2026-03-10 is a Tuesday)
      {"0 9 * * mon", "2026-03-10 00:00", "2026-03-16 09:00"},
      {"0 9 * * 2", "2026-03-10 08:00", "2026-03-10 09:00"},
      {"0 0 * * 0", "2026-03-10 00:00", "2026-03-15 00:00"},
      {"0 0 * * 7", "2026-03-10 00:00", "2026-03-15 00:00"},
      {"0 0 * * sat,sun", "2026-03-10 00:00", "2026-03-14 00:00"},
      // both day fields restricted: either matches (the 13th, or any Friday)
      {"0 0 13 * 5", "2026-03-10 00:00", "2026-03-13 00:00"},  // Friday the 13th: both
      {"0 0 13 * 5", "2026-03-13 00:00", "2026-03-20 00:00"},  // next Friday
      {"0 0 13 * 5", "2026-04-05 00:00", "2026-04-10 00:00"},  // a Friday before the 13th
      {"0 0 13 * 5", "2026-04-10 00:00", "2026-04-13 00:00"},  // the 13th, a Monday
      {"0 0 1 * mon", "2026-03-10 00:00", "2026-03-16 00:00"},
      // one day field restricted: only that one counts
      {"0 0 13 * *", "2026-03-14 00:00", "2026-04-13 00:00"},
      {"0 0 * * 5", "2026-03-14 00:00", "2026-03-20 00:00"},
      {"0 0 */1 * 5", "2026-03-14 00:00", "2026-03-20 00:00"},  // */1 is *: AND, Fridays only
      // hour and minute skipping within a matching day
      {"5 4,22 * * *", "2026-03-10 04:05", "2026-03-10 22:05"},
      {"5 4,22 * * *", "2026-03-10 22:05", "2026-03-11 04:05"},
      // UTC only: no DST shift around the European / US change dates
      {"30 2 * * *", "2026-03-29 00:00", "2026-03-29 02:30"},
      {"30 2 * * *", "2026-03-08 00:00", "2026-03-08 02:30"},
      {"30 1 * * *", "2026-10-25 01:30", "2026-10-26 01:30"},
      // never fires
      {"0 0 30 2 *", "2026-01-01 00:00", "never"},
      {"0 0 31 4,6,9,11 *", "2026-01-01 00:00", "never"},
  };
  for (const auto& c : cases) {
    auto r = ParseCron(c.expr);
    ASSERT_TRUE(r.ok()) << c.expr << ": " << r.status();
    EXPECT_EQ(Fmt(CronNext(*r, T(c.after))), c.want) << c.expr << " after " << c.after;
    EXPECT_EQ(Fmt(CronNext(*r, T(c.after) + 59)), c.want) << c.expr << " after " << c.after << ":59";
  }
}

TEST(CronNext, ConsecutiveFiresAreStrictlyIncreasing) {
  auto r = ParseCron("7,37 */5 * * mon-fri");
  ASSERT_TRUE(r.ok());
  int64_t t = T("2026-12-30 00:00");
  std::vector<std::string> got;
  for (int i = 0; i < 6; ++i) {
    int64_t n = CronNext(*r, t);
    ASSERT_GT(n, t);
    got.push_back(Fmt(n));
    t = n;
  }
  EXPECT_EQ(got, (std::vector<std::string>{"2026-12-30 00:07", "2026-12-30 00:37", "2026-12-30 05:07",
                                           "2026-12-30 05:37", "2026-12-30 10:07", "2026-12-30 10:37"}));
  // across the year end and a weekend: 2027-01-01 is a Friday, 02/03 the weekend
  auto e = ParseCron("0 23 * * mon-fri");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(Fmt(CronNext(*e, T("2027-01-01 23:00"))), "2027-01-04 23:00");
}

}  // namespace
}  // namespace ablate::scheduler::sweep
