// Which tensors the hand-written kernels take. The C++ reference (kernels/*_ref.cpp) runs fp32 on CPU; the CUDA
// kernels, compiled only with ABLATE_WITH_CUDA, run fp32 and bf16. Everything else goes to the LibTorch composite.
#pragma once
#include <torch/torch.h>

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

}  // namespace ablate::ops
