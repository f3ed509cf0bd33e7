// SHA-256 of a file (for checkpoint manifests), self-contained so the engine needs no crypto library.
#pragma once
#include <cstdint>
#include <string>

namespace ablate {
// Hex digest of the file's bytes; throws std::runtime_error if it cannot be read.
std::string sha256_file(const std::string& path);
std::string sha256_hex(const std::string& data);
}  // namespace ablate
