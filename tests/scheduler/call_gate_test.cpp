// CallGate (scheduler/util/call_gate.h): the bound on concurrent client calls (RELIABILITY F13).
#include "scheduler/util/call_gate.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace ablate::scheduler {
namespace {

using namespace std::chrono_literals;

TEST(CallGate, AdmitsUpToItsSlotsThenWaitsUntilTheDeadline) {
  CallGate gate(2);
  CallGate::Slot a(&gate, CallGate::Clock::now());
  CallGate::Slot b(&gate, CallGate::Clock::now());
  EXPECT_TRUE(a.ok());
  EXPECT_TRUE(b.ok());
  EXPECT_EQ(gate.in_use(), 2);
  const auto t0 = CallGate::Clock::now();
  CallGate::Slot c(&gate, t0 + 50ms);
  EXPECT_FALSE(c.ok());
  EXPECT_GE(CallGate::Clock::now() - t0, 50ms);
  EXPECT_EQ(gate.in_use(), 2);  // a refused slot holds nothing
}

TEST(CallGate, AReleasedSlotWakesAWaiter) {
  CallGate gate(1);
  std::atomic<bool> got{false};
  std::thread waiter;
  {
    CallGate::Slot held(&gate, CallGate::Clock::now());
    ASSERT_TRUE(held.ok());
    waiter = std::thread([&] {
      CallGate::Slot s(&gate, CallGate::Clock::now() + 5s);
      got = s.ok();
    });
    while (gate.waiting() == 0) std::this_thread::sleep_for(1ms);
    EXPECT_FALSE(got.load());
  }  // released here
  waiter.join();
  EXPECT_TRUE(got.load());
  EXPECT_EQ(gate.in_use(), 0);
}

TEST(CallGate, NoSlotsMeansNoLimitAndNullGateAdmits) {
  CallGate gate(0);
  CallGate::Slot a(&gate, CallGate::Clock::now()), b(&gate, CallGate::Clock::now()), c(&gate, CallGate::Clock::now());
  EXPECT_TRUE(a.ok() && b.ok() && c.ok());
  CallGate::Slot none(nullptr, CallGate::Clock::now());
  EXPECT_TRUE(none.ok());
}

}  // namespace
}  // namespace ablate::scheduler
