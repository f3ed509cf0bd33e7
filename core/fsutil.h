// Filesystem helpers that avoid std::filesystem::remove_all: libtorch.so exports its own copy of some
// std::filesystem symbols, and the process then binds to it and crashes (seen with LibTorch 2.11).
#pragma once
#include <string>

namespace ablate {
// rm -rf; a missing path is fine. Throws std::runtime_error on failure.
void remove_tree(const std::string& path);
}  // namespace ablate
