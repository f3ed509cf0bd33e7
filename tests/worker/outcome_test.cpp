#include <gtest/gtest.h>
#include <signal.h>

#include "worker/outcome.h"

namespace ablate::worker {
namespace {

ExitStatus Code(int c) { return ExitStatus{true, c, 0}; }
ExitStatus Sig(int s) { return ExitStatus{false, 0, s}; }

TEST(MapOutcome, ExitCodesPerContract) {
  EXPECT_EQ(MapOutcome(Code(0), std::nullopt).outcome, v1::OUTCOME_SUCCEEDED);
  EXPECT_EQ(MapOutcome(Code(0), std::nullopt).failure_class, v1::FAILURE_CLASS_UNSPECIFIED);
  struct Case {
    int code;
    v1::FailureClass fc;
  } cases[] = {{2, v1::FAILURE_CLASS_INVALID_CONFIG}, {3, v1::FAILURE_CLASS_DIVERGED}, {4, v1::FAILURE_CLASS_OOM},
               {1, v1::FAILURE_CLASS_CRASH},          {127, v1::FAILURE_CLASS_CRASH}};
  for (const auto& c : cases) {
    JobResult r = MapOutcome(Code(c.code), std::nullopt);
    EXPECT_EQ(r.outcome, v1::OUTCOME_FAILED) << c.code;
    EXPECT_EQ(r.failure_class, c.fc) << c.code;
    EXPECT_EQ(r.exit_code, c.code);
    EXPECT_NE(r.message.find(std::to_string(c.code)), std::string::npos) << r.message;
  }
}

TEST(MapOutcome, SignalIsCrash) {
  JobResult r = MapOutcome(Sig(SIGSEGV), FinishedEvent{true, "", ""});
  EXPECT_EQ(r.outcome, v1::OUTCOME_FAILED);
  EXPECT_EQ(r.failure_class, v1::FAILURE_CLASS_CRASH);
  EXPECT_EQ(r.exit_code, 128 + SIGSEGV);
  EXPECT_NE(r.message.find("signal"), std::string::npos);
}

TEST(MapOutcome, ExitCodeWinsButEventGivesMessage) {
  // A child claiming success but exiting 3 diverged.
  JobResult r = MapOutcome(Code(3), FinishedEvent{false, "diverged", "loss is NaN at step 7"});
  EXPECT_EQ(r.failure_class, v1::FAILURE_CLASS_DIVERGED);
  EXPECT_EQ(r.message, "loss is NaN at step 7");
  // Exit 4 stays OOM even if the event says crash.
  EXPECT_EQ(MapOutcome(Code(4), FinishedEvent{false, "crash", "x"}).failure_class, v1::FAILURE_CLASS_OOM);
  // Exit 5 is a hung collective, also when only a non-reporting rank saw it (no finished event).
  EXPECT_EQ(MapOutcome(Code(5), std::nullopt).failure_class, v1::FAILURE_CLASS_HANG);
}

TEST(MapOutcome, GenericExitRefinedByNamedClass) {
  EXPECT_EQ(MapOutcome(Code(1), FinishedEvent{false, "oom", "late OOM"}).failure_class, v1::FAILURE_CLASS_OOM);
  EXPECT_EQ(MapOutcome(Code(1), FinishedEvent{false, "nonsense", "?"}).failure_class, v1::FAILURE_CLASS_CRASH);
}

TEST(FailureClassFromName, KnownAndUnknown) {
  EXPECT_EQ(FailureClassFromName("invalid_config"), v1::FAILURE_CLASS_INVALID_CONFIG);
  EXPECT_EQ(FailureClassFromName("hang"), v1::FAILURE_CLASS_HANG);
  EXPECT_FALSE(FailureClassFromName("OOM"));
}

}  // namespace
}  // namespace ablate::worker
