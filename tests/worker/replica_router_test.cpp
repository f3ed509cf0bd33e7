// ReplicaRouter (worker/replica_router.h): which stub the worker's calls other than heartbeats use with several
// scheduler replicas. The stubs sit on channels that are never connected (gRPC channels connect lazily).
#include "worker/replica_router.h"

#include <gtest/gtest.h>

#include <memory>

namespace ablate::worker {
namespace {

std::unique_ptr<v1::WorkerService::Stub> StubNoOneAnswers() {
  return v1::WorkerService::NewStub(grpc::CreateChannel("127.0.0.1:1", grpc::InsecureChannelCredentials()));
}

const grpc::Status kUnavailable(grpc::StatusCode::UNAVAILABLE, "down");
const grpc::Status kDeadline(grpc::StatusCode::DEADLINE_EXCEEDED, "slow");
const grpc::Status kFenced(grpc::StatusCode::FAILED_PRECONDITION, "stale lease");

TEST(ReplicaRouter, OneAddressNeverMoves) {
  auto main = StubNoOneAnswers();
  ReplicaRouter r(main.get(), {});
  EXPECT_FALSE(r.Report(main.get(), kUnavailable, /*store_down=*/true));
  EXPECT_EQ(r.Pick(), main.get());
  EXPECT_EQ(r.moves(), 0);
}

TEST(ReplicaRouter, MainChannelMovesOnlyOnDatabaseDown) {
  auto main = StubNoOneAnswers(), a = StubNoOneAnswers(), b = StubNoOneAnswers();
  std::atomic<int64_t> switches{0};
  ReplicaRouter r(main.get(), {a.get(), b.get()}, &switches);
  // pick_first deals with unreachable replicas itself; a refusal or a fence is not the replica's fault.
  EXPECT_FALSE(r.Report(main.get(), kUnavailable, false));
  EXPECT_FALSE(r.Report(main.get(), kDeadline, false));
  EXPECT_FALSE(r.Report(main.get(), kFenced, false));
  EXPECT_FALSE(r.Report(main.get(), grpc::Status::OK, false));
  EXPECT_EQ(r.Pick(), main.get());
  EXPECT_TRUE(r.Report(main.get(), kUnavailable, true));
  EXPECT_EQ(r.Pick(), a.get());
  EXPECT_EQ(switches.load(), 1);
}

TEST(ReplicaRouter, ReplicasRotateOnDatabaseDownOrUnreachable) {
  auto main = StubNoOneAnswers(), a = StubNoOneAnswers(), b = StubNoOneAnswers();
  ReplicaRouter r(main.get(), {a.get(), b.get()});
  ASSERT_TRUE(r.Report(main.get(), kUnavailable, true));
  EXPECT_FALSE(r.Report(a.get(), kFenced, false));  // the lease is gone: not a reason to move
  EXPECT_FALSE(r.Report(a.get(), grpc::Status::OK, false));
  EXPECT_EQ(r.Pick(), a.get());
  EXPECT_TRUE(r.Report(a.get(), kUnavailable, false));  // a replica of our own that cannot be reached
  EXPECT_EQ(r.Pick(), b.get());
  EXPECT_TRUE(r.Report(b.get(), kDeadline, false));
  EXPECT_EQ(r.Pick(), a.get()) << "wraps around, never back to the main channel";
  EXPECT_TRUE(r.Report(a.get(), grpc::Status(grpc::StatusCode::UNAVAILABLE, "db"), true));
  EXPECT_EQ(r.Pick(), b.get());
  EXPECT_EQ(r.moves(), 4);
}

// Two calls failed on the same replica: the second report must not skip the next replica too.
TEST(ReplicaRouter, StaleReportDoesNotMoveAgain) {
  auto main = StubNoOneAnswers(), a = StubNoOneAnswers(), b = StubNoOneAnswers(), c = StubNoOneAnswers();
  ReplicaRouter r(main.get(), {a.get(), b.get(), c.get()});
  ASSERT_TRUE(r.Report(main.get(), kUnavailable, true));
  EXPECT_FALSE(r.Report(main.get(), kUnavailable, true));
  EXPECT_EQ(r.Pick(), a.get());
  ASSERT_TRUE(r.Report(a.get(), kUnavailable, false));
  EXPECT_FALSE(r.Report(a.get(), kUnavailable, false));
  EXPECT_EQ(r.Pick(), b.get());
  EXPECT_EQ(r.moves(), 2);
}

// The heartbeat fan-out found a healthy replica: the calls follow it at once.
TEST(ReplicaRouter, UseReplicaFollowsTheHeartbeatFanOut) {
  auto main = StubNoOneAnswers(), a = StubNoOneAnswers(), b = StubNoOneAnswers();
  std::atomic<int64_t> switches{0};
  ReplicaRouter r(main.get(), {a.get(), b.get()}, &switches);
  EXPECT_TRUE(r.UseReplica(1));
  EXPECT_EQ(r.Pick(), b.get());
  EXPECT_FALSE(r.UseReplica(1)) << "already there";
  EXPECT_FALSE(r.UseReplica(2)) << "no such replica";
  EXPECT_EQ(r.Pick(), b.get());
  EXPECT_EQ(switches.load(), 1);
  ReplicaRouter single(main.get(), {});
  EXPECT_FALSE(single.UseReplica(0));
  EXPECT_FALSE(single.has_replicas());
}

}  // namespace
}  // namespace ablate::worker
