#include "core/data.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/config.h"

namespace fs = std::filesystem;

namespace ablate {
namespace {

bool looks_binary(const std::string& bytes) {
  // NUL bytes mean binary (fortune .dat index files, images, ...); text may contain any other byte.
  const size_t n = std::min<size_t>(bytes.size(), 8192);
  return std::memchr(bytes.data(), 0, n) != nullptr;
}

void collect(const fs::path& p, std::vector<fs::path>& out, std::vector<std::string>& skipped) {
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    std::vector<fs::path> kids;
    for (const auto& e : fs::recursive_directory_iterator(p, ec)) {
      if (e.is_regular_file(ec)) kids.push_back(e.path());
    }
    std::sort(kids.begin(), kids.end());
    for (const auto& k : kids) {
      const auto ext = k.extension().string();
      // .u8 files are symlinks to the plain file (duplicates); .dat are binary strfile indexes.
      if (ext == ".dat" || ext == ".u8") {
        skipped.push_back(k.string());
        continue;
      }
      out.push_back(k);
    }
  } else if (fs::is_regular_file(p, ec)) {
    out.push_back(p);
  } else {
    throw ConfigError("prepare-data: input '" + p.string() + "' does not exist or is not a file/directory");
  }
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

std::vector<std::string> split_documents(const std::string& text) {
  std::vector<std::string> docs;
  std::string cur;
  std::istringstream in(text);
  std::string line;
  auto flush = [&] {
    // Trim surrounding blank lines; drop empty documents.
    const auto b = cur.find_first_not_of("\n\r \t");
    if (b != std::string::npos) {
      const auto e = cur.find_last_not_of("\n\r \t");
      docs.push_back(cur.substr(b, e - b + 1));
    }
    cur.clear();
  };
  while (std::getline(in, line)) {
    if (line == "%" || line == "%\r") {
      flush();
      continue;
    }
    cur += line;
    cur += '\n';
  }
  flush();
  return docs;
}

void write_tokens(const fs::path& path, const std::vector<uint16_t>& toks) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw ConfigError("prepare-data: cannot write " + path.string());
  // Token files are little-endian uint16; every supported host is little-endian.
  static_assert(std::endian::native == std::endian::little, "big-endian hosts need byte swapping here");
  f.write(reinterpret_cast<const char*>(toks.data()), static_cast<std::streamsize>(toks.size() * sizeof(uint16_t)));
  if (!f) throw ConfigError("prepare-data: write failed for " + path.string());
}

}  // namespace

PrepareSummary prepare_data(const std::vector<std::string>& inputs, const std::string& out_dir, double val_fraction) {
  if (inputs.empty()) throw ConfigError("prepare-data: no --input given");
  if (!(val_fraction > 0.0 && val_fraction < 1.0))
    throw ConfigError("prepare-data: --val_fraction must be in (0, 1), got " + std::to_string(val_fraction));
  PrepareSummary s;
  std::vector<fs::path> files;
  for (const auto& in : inputs) collect(in, files, s.skipped);

  std::vector<std::string> train_docs, val_docs;
  std::vector<std::string> sources;
  const uint64_t threshold = static_cast<uint64_t>(val_fraction * 1e6);
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) throw ConfigError("prepare-data: cannot read " + f.string());
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (looks_binary(text)) {
      s.skipped.push_back(f.string());
      continue;
    }
    ++s.files;
    sources.push_back(fs::absolute(f).lexically_normal().string());
    for (auto& d : split_documents(text)) {
      ++s.documents;
      (fnv1a(d) % 1000000 < threshold ? val_docs : train_docs).push_back(std::move(d));
    }
  }
  if (s.documents == 0) throw ConfigError("prepare-data: the inputs hold no text documents");
  // Both splits must be non-empty: move one document over if the hash split left one side empty.
  if (val_docs.empty()) {
    val_docs.push_back(train_docs.back());
    train_docs.pop_back();
  }
  if (train_docs.empty()) {
    train_docs.push_back(val_docs.back());
    val_docs.pop_back();
  }
  if (train_docs.empty() || val_docs.empty())
    throw ConfigError("prepare-data: need at least 2 documents to make a train and a val split");

  auto encode = [](const std::vector<std::string>& docs) {
    std::vector<uint16_t> t;
    for (const auto& d : docs) {
      for (unsigned char c : d) t.push_back(c);
      t.push_back(static_cast<uint16_t>(kEosId));
    }
    return t;
  };
  const auto train = encode(train_docs), val = encode(val_docs);
  s.train_docs = static_cast<int64_t>(train_docs.size());
  s.val_docs = static_cast<int64_t>(val_docs.size());
  s.train_tokens = static_cast<int64_t>(train.size());
  s.val_tokens = static_cast<int64_t>(val.size());

  fs::create_directories(out_dir);
  write_tokens(fs::path(out_dir) / "train.bin", train);
  write_tokens(fs::path(out_dir) / "val.bin", val);
  nlohmann::json meta = {{"tokenizer", "byte"},          {"vocab_size", kByteVocab},  {"eos_id", kEosId},
                         {"train_tokens", s.train_tokens}, {"val_tokens", s.val_tokens}, {"sources", sources}};
  std::ofstream mf(fs::path(out_dir) / "meta.json", std::ios::trunc);
  mf << meta.dump(2) << "\n";
  if (!mf) throw ConfigError("prepare-data: cannot write meta.json in " + out_dir);
  return s;
}

// ---------------------------------------------------------------- TokenFile
TokenFile::TokenFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw ConfigError("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw ConfigError("cannot stat " + path);
  }
  bytes_ = static_cast<size_t>(st.st_size);
  if (bytes_ % 2 != 0) {
    ::close(fd);
    throw ConfigError(path + ": size " + std::to_string(bytes_) + " is odd; expected uint16 tokens");
  }
  n_ = static_cast<int64_t>(bytes_ / 2);
  if (bytes_ > 0) {
    void* p = ::mmap(nullptr, bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw ConfigError("cannot mmap " + path + ": " + std::strerror(errno));
    }
    data_ = static_cast<const uint16_t*>(p);
  }
  ::close(fd);
}

TokenFile::~TokenFile() {
  if (data_) ::munmap(const_cast<uint16_t*>(data_), bytes_);
}

TokenFile::TokenFile(TokenFile&& o) noexcept : data_(o.data_), n_(o.n_), bytes_(o.bytes_) {
  o.data_ = nullptr;
  o.n_ = 0;
  o.bytes_ = 0;
}

TokenFile& TokenFile::operator=(TokenFile&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(const_cast<uint16_t*>(data_), bytes_);
    data_ = o.data_;
    n_ = o.n_;
    bytes_ = o.bytes_;
    o.data_ = nullptr;
    o.n_ = 0;
    o.bytes_ = 0;
  }
  return *this;
}

// ---------------------------------------------------------------- DataLoader
DataLoader::DataLoader(const std::string& data_dir, int64_t batch_size, int64_t context_length, uint64_t seed)
    : batch_size_(batch_size), context_length_(context_length), seed_(seed) {
  const fs::path dir(data_dir);
  const auto meta_path = dir / "meta.json";
  std::ifstream mf(meta_path);
  if (!mf)
    throw ConfigError("--data_dir " + data_dir + ": no meta.json (prepare it with: ablate-train prepare-data --input " +
                      "/usr/share/games/fortunes --output " + data_dir + ")");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(mf);
    vocab_size_ = meta.at("vocab_size").get<int64_t>();
  } catch (const std::exception& e) {
    throw ConfigError(meta_path.string() + ": invalid (" + e.what() + ")");
  }
  if (vocab_size_ <= 0 || vocab_size_ > 65536) throw ConfigError(meta_path.string() + ": bad vocab_size");
  train_ = TokenFile((dir / "train.bin").string());
  val_ = TokenFile((dir / "val.bin").string());
  const int64_t need = context_length_ + 1;
  if (train_.size() < need)
    throw ConfigError("train.bin has " + std::to_string(train_.size()) + " tokens, fewer than context_length+1 = " +
                      std::to_string(need));
  if (val_.size() < need)
    throw ConfigError("val.bin has " + std::to_string(val_.size()) + " tokens, fewer than context_length+1 = " +
                      std::to_string(need) + ": prepare the data with a larger validation split (`ablate-train " +
                      "prepare-data --val_fraction F`) or a larger corpus");
  // One pass to catch a corrupt or mismatched file now rather than as an index error mid-run.
  for (const TokenFile* f : {&train_, &val_})
    for (int64_t i = 0; i < f->size(); ++i)
      if (f->data()[i] >= vocab_size_)
        throw ConfigError("token id " + std::to_string(f->data()[i]) + " >= vocab_size in " + data_dir);
}

Batch DataLoader::gather(const TokenFile& f, const std::vector<int64_t>& starts) const {
  const int64_t B = static_cast<int64_t>(starts.size()), T = context_length_;
  auto win = torch::empty({B, T + 1}, torch::kInt64);
  auto* w = win.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t <= T; ++t) w[b * (T + 1) + t] = f.data()[starts[b] + t];
  return {win.narrow(1, 0, T).contiguous(), win.narrow(1, 1, T).contiguous()};
}

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
}  // namespace

Batch DataLoader::train_batch(int64_t cursor) const {
  const uint64_t range = static_cast<uint64_t>(train_.size() - context_length_);  // valid starts: [0, range)
  uint64_t state = splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(cursor)));
  std::vector<int64_t> starts(static_cast<size_t>(batch_size_ * world_));  // the global batch
  for (auto& s : starts) {
    state = splitmix64(state);
    s = static_cast<int64_t>(state % range);  // modulo bias is negligible at these sizes
  }
  return gather(train_, std::vector<int64_t>(starts.begin() + rank_ * batch_size_,
                                             starts.begin() + (rank_ + 1) * batch_size_));
}

void DataLoader::set_shard(int64_t rank, int64_t world) {
  if (world < 1 || rank < 0 || rank >= world)
    throw std::invalid_argument("DataLoader::set_shard: rank " + std::to_string(rank) + " of " + std::to_string(world));
  rank_ = rank;
  world_ = world;
}

Batch DataLoader::eval_batch(int64_t i, int64_t num_batches) const {
  const int64_t global = batch_size_ * world_;
  const int64_t total = num_batches * global;
  const int64_t last = val_.size() - context_length_ - 1;  // largest valid start
  std::vector<int64_t> starts(static_cast<size_t>(batch_size_));
  for (int64_t b = 0; b < batch_size_; ++b) {
    const int64_t k = i * global + rank_ * batch_size_ + b;
    starts[b] = total > 1 ? k * last / (total - 1) : 0;
  }
  return gather(val_, starts);
}

}  // namespace ablate
