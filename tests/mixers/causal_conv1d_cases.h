// A causal conv1d test case (tests/mixers/causal_conv1d_test.cpp and causal_conv1d_gpu_test.cpp): its sizes, the
// kernels' shape for it, and a printable name.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

#include "kernels/causal_conv1d.h"

namespace ablate::core::conv_test {

struct Case {
  int64_t B, T, C, W;
  bool bias, silu;
};

inline kernels::CausalConv1dShape shape_of(const Case& c, kernels::NsaDtype dtype = kernels::NsaDtype::kF32) {
  kernels::CausalConv1dShape s;
  s.B = c.B;
  s.T = c.T;
  s.C = c.C;
  s.W = c.W;
  s.dtype = dtype;
  s.silu = c.silu;
  return s;
}

inline std::string case_name(const Case& c) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "B%ld T%ld C%ld W%ld%s%s", long(c.B), long(c.T), long(c.C), long(c.W),
                c.bias ? " bias" : "", c.silu ? " silu" : "");
  return buf;
}

}  // namespace ablate::core::conv_test
