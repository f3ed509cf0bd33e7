// Dataset preparation (no LibTorch): text files -> byte-level train.bin / val.bin / meta.json.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ablate {

constexpr int64_t kByteVocab = 257;  // ids 0..255 = bytes, 256 = EOS (document separator)
constexpr int64_t kEosId = 256;

struct PrepareSummary {
  int64_t files = 0, documents = 0, train_docs = 0, val_docs = 0, train_tokens = 0, val_tokens = 0;
  std::vector<std::string> skipped;  // files skipped as binary / index files
};

// Reads text files (directories recursively; .dat/.u8 and binary files skipped), splits documents on lines
// that are exactly "%" (fortune format; a file without such lines is one document), assigns each document
// to val by a hash of its content (deterministic, independent of file order), writes DIR/{train,val}.bin
// (uint16 LE) and DIR/meta.json. Throws ConfigError on bad input.
PrepareSummary prepare_data(const std::vector<std::string>& inputs, const std::string& out_dir, double val_fraction);

}  // namespace ablate
