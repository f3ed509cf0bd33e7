// Bounded on-disk spill of one attempt's metric points (RELIABILITY.md F15): while the scheduler (or its database)
// is unreachable the worker keeps training, and the points it cannot deliver go to an append-only log in the
// worker's state directory instead of a memory queue.
//
// Layout: <dir>/seg-00000001.log, seg-00000002.log, ... and <dir>/ack (the delivered position, written with a
// rename). A record is [u32 payload length][u32 CRC-32 of the payload][payload: i64 step, i64 time_unix_ms,
// f64 value, name bytes], little-endian. Appends go to the newest segment; past segment_bytes it is fsync'ed and a
// new one begins (the directory is fsync'ed too). Sync() fsyncs the open segment (the worker calls it when a flush
// fails and at the end of the attempt). Peek() reads the oldest undelivered points in append order without
// consuming them; Ack(n) marks the first n of them delivered, and segments wholly behind the ack are deleted (the
// log is truncated once the scheduler has stored them). Open() on an existing directory (a worker restarted for
// the same attempt) resumes from the ack; a torn or corrupt tail (crash mid-write) is cut off at the last good
// record and counted in torn_tails(). Delivery after a crash may repeat a batch: the scheduler's upsert is
// keyed (job, name, step), so a repeat is a no-op.
//
// The cap: when the segments would exceed max_bytes, new points are refused and counted in dropped() (the points
// already spilled stay, so what is lost is an explicitly counted gap, never a silent one).
//
// With an empty dir (or one that cannot be used) the spill keeps the points in memory under the same cap.
// Not thread-safe: the caller serializes.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "ablate/v1/ablate.pb.h"

namespace ablate::worker {

class MetricSpill {
 public:
  struct Options {
    uint64_t max_bytes = uint64_t{256} << 20;
    uint64_t segment_bytes = uint64_t{4} << 20;
  };
  // dir: created if missing ("" = memory only). On failure *error says why and the spill runs in memory.
  MetricSpill(std::string dir, Options opts, std::string* error = nullptr);
  ~MetricSpill();
  MetricSpill(const MetricSpill&) = delete;
  MetricSpill& operator=(const MetricSpill&) = delete;

  // Returns how many of the points were refused because of the cap (also added to dropped()).
  size_t Append(const std::vector<v1::MetricPoint>& points);
  // Up to max of the oldest undelivered points, in append order; the same points again until Ack.
  std::vector<v1::MetricPoint> Peek(size_t max);
  // The first n points of the last Peek are stored by the scheduler.
  void Ack(size_t n);
  void Sync();
  // Deletes the directory (the attempt is over and nothing more can be delivered).
  void Remove();

  bool on_disk() const { return fd_ >= 0; }
  uint64_t pending() const { return pending_; }
  uint64_t bytes() const { return bytes_; }
  int64_t dropped() const { return dropped_; }
  // Torn or corrupt tails cut off by Open (each one a crash mid-write; the records in it are lost).
  int64_t torn_tails() const { return torn_; }
  const std::string& dir() const { return dir_; }

 private:
  struct Pos {
    uint64_t seg = 0, off = 0;
  };
  bool OpenDir(std::string* error);
  bool OpenSegment(uint64_t seg, std::string* error);
  std::string SegPath(uint64_t seg) const;
  void WriteAck();
  void Fail(const std::string& why);

  std::string dir_;
  Options opts_;
  int fd_ = -1;
  uint64_t write_seg_ = 0, write_off_ = 0;
  Pos read_;                       // the ack position: the first undelivered record
  std::vector<Pos> peeked_;        // end position of each point of the last Peek
  uint64_t pending_ = 0, bytes_ = 0;
  int64_t dropped_ = 0, torn_ = 0;
  std::map<uint64_t, uint64_t> seg_size_;  // live segments (number -> bytes), ascending
  std::deque<v1::MetricPoint> mem_;  // memory mode
};

}  // namespace ablate::worker
