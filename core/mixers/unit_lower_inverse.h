// T = (I + A)^{-1} for a batch of n x n unit lower-triangular systems, as one autograd op: the UT transform of the
// chunked gated delta rule (delta_rule.cpp) solves (I + A) X = R once per chunk; T R with T from here is that X.
//
// A (..., n, n): only its strictly lower part is read (diagonal taken as one, upper part ignored), as in
// torch::linalg_solve_triangular(..., unitriangular = true). The result is unit lower triangular.
// Forward: the CUDA kernel of kernels/unit_lower_inverse.h (fp32 CUDA tensors, n <= 64, CUDA builds) or a
// triangular solve against the identity. Backward, by hand (dT = -T dA T): dA = -tril(T^T dT T^T, -1).
#pragma once
#include <torch/torch.h>

namespace ablate::core {

// Whether the CUDA kernel takes A (fp32 on a CUDA device, n <= 64, a CUDA build).
bool unit_lower_inverse_kernel_applies(const torch::Tensor& A);

// use_kernel: run the CUDA kernel (an error where it does not apply) instead of the triangular solve.
torch::Tensor unit_lower_inverse(const torch::Tensor& A, bool use_kernel);

}  // namespace ablate::core
