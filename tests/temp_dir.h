// A fresh directory under the system's temporary directory for one test fixture (mkdtemp), removed with everything
// in it when the fixture goes away. Header-only: the control-plane tests do not link ablate_core (tests/scratch_dir.h
// is the engine tests' per-process variant).
#pragma once
#include <stdlib.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace ablate::test_util {

class TempDir {
 public:
  // The directory is <tmp>/<prefix>-XXXXXX.
  explicit TempDir(const std::string& prefix) {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp(" + tmpl + ") failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;  // best effort: a test that left a read-only tree behind must not throw here
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace ablate::test_util
