#include "worker/spill.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace ablate::worker {
namespace {

constexpr size_t kHeader = 8;       // u32 length + u32 crc
constexpr size_t kFixed = 24;       // step + time + value
constexpr uint32_t kMaxPayload = 1 << 20;

uint32_t Crc32(const char* p, size_t n) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ static_cast<uint8_t>(p[i])) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void Put(std::string* s, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) s->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
uint64_t Get(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

std::string Encode(const v1::MetricPoint& p) {
  std::string payload;
  Put(&payload, static_cast<uint64_t>(p.step()), 8);
  Put(&payload, static_cast<uint64_t>(p.time_unix_ms()), 8);
  double v = p.value();
  uint64_t bits;
  std::memcpy(&bits, &v, 8);
  Put(&payload, bits, 8);
  payload += p.name();
  std::string rec;
  Put(&rec, payload.size(), 4);
  Put(&rec, Crc32(payload.data(), payload.size()), 4);
  return rec + payload;
}

// Parses the record at data[off]; false for a short, oversized or corrupt one.
bool Decode(const std::string& data, size_t off, v1::MetricPoint* p, size_t* len) {
  if (data.size() - off < kHeader) return false;
  uint32_t n = static_cast<uint32_t>(Get(data.data() + off, 4));
  uint32_t crc = static_cast<uint32_t>(Get(data.data() + off + 4, 4));
  if (n < kFixed || n > kMaxPayload || data.size() - off - kHeader < n) return false;
  const char* q = data.data() + off + kHeader;
  if (Crc32(q, n) != crc) return false;
  p->set_step(static_cast<int64_t>(Get(q, 8)));
  p->set_time_unix_ms(static_cast<int64_t>(Get(q + 8, 8)));
  uint64_t bits = Get(q + 16, 8);
  double v;
  std::memcpy(&v, &bits, 8);
  p->set_value(v);
  p->set_name(std::string(q + kFixed, n - kFixed));
  *len = kHeader + n;
  return true;
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  return true;
}

void FsyncDir(const std::string& dir) {
  int d = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (d >= 0) {
    ::fsync(d);
    ::close(d);
  }
}

bool MkdirP(const std::string& dir) {
  std::string cur;
  std::stringstream ss(dir);
  std::string part;
  if (!dir.empty() && dir[0] == '/') cur = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    cur += part + "/";
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) return false;
  }
  return true;
}

}  // namespace

MetricSpill::MetricSpill(std::string dir, Options opts, std::string* error) : dir_(std::move(dir)), opts_(opts) {
  if (dir_.empty()) return;
  std::string why;
  if (!OpenDir(&why)) {
    if (error) *error = why;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    seg_size_.clear();
    pending_ = bytes_ = 0;
  }
}

MetricSpill::~MetricSpill() {
  if (fd_ >= 0) {
    ::fdatasync(fd_);
    ::close(fd_);
  }
}

std::string MetricSpill::SegPath(uint64_t seg) const {
  char buf[32];
  std::snprintf(buf, sizeof buf, "/seg-%08llu.log", static_cast<unsigned long long>(seg));
  return dir_ + buf;
}

bool MetricSpill::OpenDir(std::string* error) {
  if (!MkdirP(dir_)) {
    *error = "cannot create " + dir_ + ": " + std::strerror(errno);
    return false;
  }
  DIR* d = ::opendir(dir_.c_str());
  if (!d) {
    *error = "cannot list " + dir_ + ": " + std::strerror(errno);
    return false;
  }
  std::vector<uint64_t> found;
  while (dirent* e = ::readdir(d)) {
    unsigned long long n = 0;
    char tail[8] = {};
    if (std::sscanf(e->d_name, "seg-%llu.lo%1s", &n, tail) == 2 && std::string(tail) == "g") found.push_back(n);
  }
  ::closedir(d);
  std::sort(found.begin(), found.end());
  std::string ack;
  if (ReadFile(dir_ + "/ack", &ack)) {
    unsigned long long s = 0, o = 0;
    if (std::sscanf(ack.c_str(), "%llu %llu", &s, &o) == 2) read_ = {s, o};
  }
  if (!found.empty() && read_.seg < found.front()) read_ = {found.front(), 0};
  for (uint64_t seg : found) {
    if (seg < read_.seg) {  // wholly delivered; its deletion was cut short
      ::unlink(SegPath(seg).c_str());
      continue;
    }
    std::string data;
    if (!ReadFile(SegPath(seg), &data)) {
      *error = "cannot read " + SegPath(seg);
      return false;
    }
    size_t off = 0, len = 0;
    v1::MetricPoint p;
    const size_t start = seg == read_.seg ? static_cast<size_t>(read_.off) : 0;
    uint64_t n = 0;
    while (off < data.size() && Decode(data, off, &p, &len)) {
      if (off >= start) ++n;
      off += len;
    }
    if (off < data.size()) {  // torn / corrupt tail: keep the good prefix
      ++torn_;
      if (::truncate(SegPath(seg).c_str(), static_cast<off_t>(off)) != 0) {
        *error = "cannot truncate " + SegPath(seg) + ": " + std::strerror(errno);
        return false;
      }
    }
    if (seg == read_.seg && read_.off > off) read_.off = off;  // the ack ran ahead of a cut tail
    pending_ += n;
    bytes_ += off;
    seg_size_[seg] = off;
  }
  uint64_t last = seg_size_.empty() ? std::max<uint64_t>(read_.seg, 1) : seg_size_.rbegin()->first;
  if (seg_size_.empty()) read_ = {last, 0};
  return OpenSegment(last, error);
}

bool MetricSpill::OpenSegment(uint64_t seg, std::string* error) {
  int fd = ::open(SegPath(seg).c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (error) *error = "cannot open " + SegPath(seg) + ": " + std::strerror(errno);
    return false;
  }
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
  write_seg_ = seg;
  write_off_ = seg_size_[seg];  // 0 for a new one
  return true;
}

size_t MetricSpill::Append(const std::vector<v1::MetricPoint>& points) {
  size_t refused = 0;
  for (const auto& p : points) {
    std::string rec = Encode(p);
    if (bytes_ + rec.size() > opts_.max_bytes) {
      ++refused;
      continue;
    }
    if (fd_ < 0) {
      mem_.push_back(p);
      bytes_ += rec.size();
      ++pending_;
      continue;
    }
    size_t done = 0;
    while (done < rec.size()) {
      ssize_t w = ::write(fd_, rec.data() + done, rec.size() - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) break;
      done += static_cast<size_t>(w);
    }
    if (done != rec.size()) {
      // Disk full / I/O error: cut the partial record off so the log stays parseable, count the point.
      if (done > 0 && ::ftruncate(fd_, static_cast<off_t>(write_off_)) != 0) {
        // Unparseable tail: the next Open cuts it off (torn tail).
      }
      ++refused;
      continue;
    }
    write_off_ += rec.size();
    seg_size_[write_seg_] = write_off_;
    bytes_ += rec.size();
    ++pending_;
    if (write_off_ >= opts_.segment_bytes) {  // rotate: the full segment is made durable first
      ::fdatasync(fd_);
      std::string why;
      if (OpenSegment(write_seg_ + 1, &why)) FsyncDir(dir_);
    }
  }
  dropped_ += static_cast<int64_t>(refused);
  return refused;
}

std::vector<v1::MetricPoint> MetricSpill::Peek(size_t max) {
  std::vector<v1::MetricPoint> out;
  peeked_.clear();
  if (fd_ < 0) {
    for (size_t i = 0; i < mem_.size() && out.size() < max; ++i) out.push_back(mem_[i]);
    return out;
  }
  if (pending_ == 0) return out;
  for (auto it = seg_size_.lower_bound(read_.seg); it != seg_size_.end() && out.size() < max; ++it) {
    const uint64_t seg = it->first;
    uint64_t off = seg == read_.seg ? read_.off : 0;
    if (off >= it->second) continue;
    std::string data;
    int fd = ::open(SegPath(seg).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) break;
    data.resize(static_cast<size_t>(it->second - off));
    size_t got = 0;
    while (got < data.size()) {
      ssize_t r = ::pread(fd, data.data() + got, data.size() - got, static_cast<off_t>(off + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    ::close(fd);
    data.resize(got);
    size_t pos = 0, len = 0;
    v1::MetricPoint p;
    while (pos < data.size() && out.size() < max && Decode(data, pos, &p, &len)) {
      pos += len;
      out.push_back(p);
      peeked_.push_back({seg, off + pos});
    }
    if (pos < data.size() && out.size() < max) break;  // unreadable record: never skip past it
  }
  return out;
}

void MetricSpill::Ack(size_t n) {
  if (fd_ < 0) {
    for (size_t i = 0; i < n && !mem_.empty(); ++i) {
      bytes_ -= std::min<uint64_t>(bytes_, Encode(mem_.front()).size());
      mem_.pop_front();
      --pending_;
    }
    return;
  }
  if (n == 0 || peeked_.empty()) return;
  n = std::min(n, peeked_.size());
  read_ = peeked_[n - 1];
  pending_ -= std::min<uint64_t>(pending_, n);
  peeked_.clear();
  // Segments wholly behind the ack go; so does everything once all is delivered (the active segment is emptied).
  while (read_.seg != write_seg_ && read_.off >= seg_size_[read_.seg]) {
    auto next = seg_size_.upper_bound(read_.seg);
    if (next == seg_size_.end()) break;
    read_ = {next->first, 0};
  }
  for (auto it = seg_size_.begin(); it != seg_size_.end() && it->first < read_.seg;) {
    ::unlink(SegPath(it->first).c_str());
    bytes_ -= std::min(bytes_, it->second);
    it = seg_size_.erase(it);
  }
  if (pending_ == 0 && read_.seg == write_seg_ && write_off_ > 0 && ::ftruncate(fd_, 0) == 0) {
    bytes_ -= std::min(bytes_, write_off_);
    write_off_ = 0;
    seg_size_[write_seg_] = 0;
    read_ = {write_seg_, 0};
  }
  WriteAck();
}

void MetricSpill::WriteAck() {
  // Not fsync'ed: an ack lost in a crash only means a batch is delivered twice, which the scheduler ignores.
  std::string tmp = dir_ + "/ack.tmp";
  if (FILE* f = std::fopen(tmp.c_str(), "w")) {
    std::fprintf(f, "%llu %llu\n", static_cast<unsigned long long>(read_.seg),
                 static_cast<unsigned long long>(read_.off));
    std::fclose(f);
    std::rename(tmp.c_str(), (dir_ + "/ack").c_str());
  }
}

void MetricSpill::Sync() {
  if (fd_ >= 0) ::fdatasync(fd_);
}

void MetricSpill::Remove() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!dir_.empty()) {
    for (const auto& [seg, size] : seg_size_) ::unlink(SegPath(seg).c_str());
    if (DIR* d = ::opendir(dir_.c_str())) {
      while (dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") ::unlink((dir_ + "/" + n).c_str());
      }
      ::closedir(d);
    }
    ::rmdir(dir_.c_str());
  }
  seg_size_.clear();
  mem_.clear();
  peeked_.clear();
  pending_ = bytes_ = 0;
}

}  // namespace ablate::worker
