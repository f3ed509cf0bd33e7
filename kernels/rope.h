// RoPE kernels (NeoX rotate_half convention), plain-pointer interface for the CPU reference and the CUDA kernels.
//
// For one row x[0..hd) at position p, with half = hd / 2 and the fp32 tables cos/sin [table_rows, hd]
// (core/model.cpp rope_tables: angle[p, i] = p * theta^(-2i/hd), repeated for both halves):
//   forward  y[i]        = x[i] * cos[p, i]               - x[i + half] * sin[p, i]
//            y[i + half] = x[i + half] * cos[p, i + half] + x[i] * sin[p, i + half]      (i < half)
//   backward (the transpose, i.e. rotation by -angle):
//            dx[i]        = dy[i] * cos[p, i]               + dy[i + half] * sin[p, i + half]
//            dx[i + half] = dy[i + half] * cos[p, i + half] - dy[i] * sin[p, i]
// This is exactly core/model.cpp apply_rope (x * cos + rotate_half(x) * sin) and its autograd backward.
//
// Layout: each tensor is a 4-D strided view [n0, n1, n2, hd] with hd contiguous (stride 1) and arbitrary
// element strides for the three row dimensions, so [B, T, H, hd], [B, H, T, hd] and the model's transposed
// view of a [B, T, H, hd] buffer all work without a copy. pos_dim says which of n0/n1/n2 is the position.
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ablate::kernels {

struct RopeTensor {
  const void* x = nullptr;   // input  (fp32 or bf16, see RopeArgs::bf16)
  void* y = nullptr;         // output, same shape; may not alias x
  int64_t n[3] = {0, 0, 0};  // row dimensions; n[2] varies fastest in the launch order
  int64_t xs[3] = {0, 0, 0};  // element strides of x for the row dimensions (hd has stride 1)
  int64_t ys[3] = {0, 0, 0};  // element strides of y
  int pos_dim = 1;            // index in n[] of the position (table row) dimension
};

struct RopeArgs {
  RopeTensor t[2];             // e.g. q and k; an unused slot has n = {0, 0, 0}
  const float* cos = nullptr;  // [table_rows, head_dim] fp32, contiguous
  const float* sin = nullptr;  // [table_rows, head_dim] fp32, contiguous
  int64_t table_rows = 0;      // must be > every position index
  int64_t head_dim = 0;        // even
  bool bf16 = false;           // x and y are bfloat16 (else float32); math is fp32 either way
};

// CPU reference (fp32 only: bf16 must be false). backward: a.t[i].x holds dy, a.t[i].y receives dx.
void rope_forward_ref(const RopeArgs& a);
void rope_backward_ref(const RopeArgs& a);

#if ABLATE_WITH_CUDA
// One launch for both tensors. Returns cudaErrorInvalidValue for an odd head_dim.
cudaError_t rope_forward_cuda(const RopeArgs& a, cudaStream_t stream);
cudaError_t rope_backward_cuda(const RopeArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
