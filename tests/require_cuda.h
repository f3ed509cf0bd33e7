// GPU test cases start with ABLATE_REQUIRE_CUDA(): they skip, saying why, when the build has no CUDA code
// (ABLATE_WITH_CUDA off) or the machine has no CUDA device, and run everywhere else.
#pragma once
#include <gtest/gtest.h>
#include <torch/cuda.h>

#if ABLATE_WITH_CUDA
#define ABLATE_REQUIRE_CUDA()                                           \
  do {                                                                  \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)
#else
#define ABLATE_REQUIRE_CUDA() GTEST_SKIP() << "built without CUDA (ABLATE_WITH_CUDA=OFF)"
#endif
