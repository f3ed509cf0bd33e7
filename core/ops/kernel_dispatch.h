// Which tensors the hand-written kernels take. The C++ reference (kernels/*_ref.cpp) runs fp32 on CPU; the CUDA
// kernels, compiled only with ABLATE_WITH_CUDA, run fp32 and bf16. Everything else goes to the LibTorch composite.
#pragma once
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>

#include "kernels/nsa_select.h"  // NsaDtype

namespace ablate::ops {

#if ABLATE_WITH_CUDA
inline constexpr bool kHaveCudaKernels = true;
#else
inline constexpr bool kHaveCudaKernels = false;
#endif

inline bool kernel_takes(torch::ScalarType t, const torch::Device& d) {
  if (d.is_cpu()) return t == torch::kFloat32;
  return kHaveCudaKernels && d.is_cuda() && (t == torch::kFloat32 || t == torch::kBFloat16);
}

// The element type of the attention-like kernels (kernels/nsa_*.h, kernels/ssd_intra.h) for a tensor dtype: bf16,
// fp16, fp32 for anything else (the callers admit only those three).
inline kernels::NsaDtype kernel_dtype(torch::ScalarType t) {
  return t == torch::kBFloat16 ? kernels::NsaDtype::kBF16
         : t == torch::kHalf   ? kernels::NsaDtype::kF16
                               : kernels::NsaDtype::kF32;
}

// The initial state of a fused-kernel switch: `unset` when the environment variable `env` is not set, else on
// unless it is "0". (A path not yet run on a GPU starts off: unset = false.)
inline bool env_switch_default(const char* env, bool unset = true) {
  const char* e = std::getenv(env);
  return e == nullptr ? unset : std::strcmp(e, "0") != 0;
}

}  // namespace ablate::ops
