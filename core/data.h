// Byte-level datasets: preparation (text -> train.bin/val.bin/meta.json) and the memory-mapped loader.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/prepare_data.h"

namespace ablate {

// Read-only memory map of a uint16 token file.
class TokenFile {
 public:
  TokenFile() = default;
  explicit TokenFile(const std::string& path);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;
  TokenFile(TokenFile&& o) noexcept;
  TokenFile& operator=(TokenFile&& o) noexcept;
  const uint16_t* data() const { return data_; }
  int64_t size() const { return n_; }

 private:
  const uint16_t* data_ = nullptr;
  int64_t n_ = 0;
  size_t bytes_ = 0;
};

struct Batch {
  torch::Tensor inputs;   // [B, T] int64
  torch::Tensor targets;  // [B, T] int64, inputs shifted by one (the window holds T + 1 tokens)
};

class DataLoader {
 public:
  // Reads data_dir/meta.json and maps train.bin and val.bin. Throws ConfigError.
  DataLoader(const std::string& data_dir, int64_t batch_size, int64_t context_length, uint64_t seed);
  int64_t vocab_size() const { return vocab_size_; }
  int64_t train_tokens() const { return train_.size(); }
  int64_t val_tokens() const { return val_.size(); }
  // Batch number `cursor` of the training stream: window starts drawn from an RNG seeded by (seed, cursor),
  // so the stream is a pure function of the cursor and resuming at a cursor reproduces it exactly.
  Batch train_batch(int64_t cursor) const;
  // Eval batch i of a fixed set: windows evenly spaced over val.bin (same for every call and every run).
  Batch eval_batch(int64_t i, int64_t num_batches) const;
  // Data-parallel rank `rank` of `world`: batches are drawn for the global batch world x batch_size (exactly those
  // one process with that batch size would draw) and this loader returns rows [rank*batch_size, (rank+1)*batch_size).
  void set_shard(int64_t rank, int64_t world);

 private:
  Batch gather(const TokenFile& f, const std::vector<int64_t>& starts) const;
  int64_t batch_size_, context_length_;
  uint64_t seed_;
  int64_t rank_ = 0, world_ = 1;
  int64_t vocab_size_ = 0;
  TokenFile train_, val_;
};

}  // namespace ablate
