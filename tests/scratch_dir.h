// Per-process scratch directories for tests: <tmp>/<prefix>-<tag>-<pid>, created empty and removed when the test
// process exits normally. ctest runs every gtest case in its own process, so directories left behind add up
// (hundreds per `make test`, ~5 MB each with a prepared corpus). ABLATE_KEEP_TEST_DIRS=1 keeps them for debugging.
// Users link ablate_core (remove_tree).
#pragma once
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "core/fsutil.h"

namespace ablate::testing {

class ScratchDirs {
 public:
  static ScratchDirs& instance() {
    static ScratchDirs dirs;
    return dirs;
  }
  std::filesystem::path make(const std::string& prefix, const std::string& tag) {
    namespace fs = std::filesystem;
    const fs::path p = fs::temp_directory_path() / (prefix + "-" + tag + "-" + std::to_string(::getpid()));
    remove_tree(p.string());
    fs::create_directories(p);
    std::lock_guard<std::mutex> lk(mu_);
    made_.push_back(p);
    return p;
  }
  ~ScratchDirs() {
    const char* keep = std::getenv("ABLATE_KEEP_TEST_DIRS");
    if (keep != nullptr && std::string(keep) == "1") return;
    if (::getpid() != owner_) return;  // a forked child that exits normally leaves the parent's directories alone
    for (const auto& p : made_) {
      try {
        remove_tree(p.string());  // not std::filesystem::remove_all: core/fsutil.h says why
      } catch (const std::exception&) {
      }
    }
  }

 private:
  ScratchDirs() : owner_(::getpid()) {}
  pid_t owner_;
  std::mutex mu_;
  std::vector<std::filesystem::path> made_;
};

inline std::filesystem::path scratch_dir(const std::string& prefix, const std::string& tag) {
  return ScratchDirs::instance().make(prefix, tag);
}

}  // namespace ablate::testing
