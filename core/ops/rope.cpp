#include "core/ops/rope.h"
#include "core/ops/kernel_dispatch.h"

#include <algorithm>
#include <array>

#include "kernels/rope.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int pos_dim_of(RopeLayout layout) { return layout == RopeLayout::kBHTD ? 2 : 1; }

void check_args(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, RopeLayout layout) {
  TORCH_CHECK(x.dim() == 4, "rope: expected a 4-D q/k tensor ([B, H, T, hd] or [B, T, H, hd]), got shape ", x.sizes());
  const int64_t hd = x.size(3), T = x.size(pos_dim_of(layout));
  TORCH_CHECK(hd % 2 == 0, "rope: expected an even head_dim, got ", hd);
  TORCH_CHECK(cos.dim() == 2 && sin.dim() == 2 && cos.sizes() == sin.sizes(),
              "rope: expected cos and sin of one shape [T_table, hd], got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.size(1) == hd && cos.size(0) >= T, "rope: expected tables [>= ", T, ", ", hd, "], got ",
              cos.sizes());
  TORCH_CHECK(cos.device() == x.device() && sin.device() == x.device(), "rope: expected the tables on ", x.device(),
              ", got ", cos.device(), " and ", sin.device());
}

bool kernel_ok(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (cos.scalar_type() != torch::kFloat32 || sin.scalar_type() != torch::kFloat32) return false;
  return kernel_takes(x.scalar_type(), x.device());
}

// Describes x -> y for the kernel, with the three row dims ordered by decreasing stride of y (the output we
// allocate position-major, see position_major_empty) so that the launch order (n[2] fastest) writes y as one
// stream and consecutive rows share a position, i.e. one cos/sin table row serves all heads from L1.
kernels::RopeTensor describe(const torch::Tensor& x, const torch::Tensor& y, RopeLayout layout) {
  std::array<int, 3> perm = {0, 1, 2};
  std::stable_sort(perm.begin(), perm.end(), [&](int a, int b) { return y.stride(a) > y.stride(b); });
  kernels::RopeTensor t;
  t.x = x.data_ptr();
  t.y = y.data_ptr();
  for (int i = 0; i < 3; ++i) {
    t.n[i] = x.size(perm[i]);
    t.xs[i] = x.stride(perm[i]);
    t.ys[i] = y.stride(perm[i]);
    if (perm[i] == pos_dim_of(layout)) t.pos_dim = i;
  }
  return t;
}

// An uninitialized tensor shaped like x whose memory is [B, T, H, hd] (position-major, heads inner): for the
// kBHTD layout that is the transposed view the model's q/k already are, so the output needs no copy before the
// projection's backward, and its gradient comes back in the same layout.
torch::Tensor position_major_empty(const torch::Tensor& x, RopeLayout layout) {
  if (layout == RopeLayout::kBTHD) return torch::empty(x.sizes(), x.options());
  return torch::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).transpose(1, 2);
}

// Last dim must be contiguous for the kernel; other strides are free.
torch::Tensor last_dim_contiguous(const torch::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

void run(kernels::RopeArgs& a, const torch::Tensor& like, const torch::Tensor& cos, const torch::Tensor& sin,
         bool backward) {
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.table_rows = cos.size(0);
  a.head_dim = cos.size(1);
  a.bf16 = like.scalar_type() == torch::kBFloat16;
  if (like.is_cuda()) {
#if ABLATE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(like.device());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto err = backward ? kernels::rope_backward_cuda(a, stream) : kernels::rope_forward_cuda(a, stream);
    TORCH_CHECK(err == cudaSuccess, "rope ", backward ? "backward" : "forward", " CUDA kernel: ",
                cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "rope: CUDA tensor given, but this build has no CUDA kernels (ABLATE_WITH_CUDA=OFF)");
#endif
  } else {
    backward ? kernels::rope_backward_ref(a) : kernels::rope_forward_ref(a);
  }
}

// Applies the rotation (or its transpose) to up to two tensors in one call; undefined inputs give undefined outputs.
variable_list rotate(const torch::Tensor& x0, const torch::Tensor& x1, const torch::Tensor& cos,
                     const torch::Tensor& sin, RopeLayout layout, bool backward) {
  kernels::RopeArgs a;
  variable_list out(2);
  const torch::Tensor in[2] = {x0.defined() ? last_dim_contiguous(x0) : x0,
                               x1.defined() ? last_dim_contiguous(x1) : x1};
  torch::Tensor like;
  for (int i = 0; i < 2; ++i) {
    if (!in[i].defined()) continue;
    out[i] = position_major_empty(in[i], layout);
    a.t[i] = describe(in[i], out[i], layout);
    like = in[i];
  }
  if (like.defined()) run(a, like, cos, sin, backward);
  return out;
}

struct RopeFn : torch::autograd::Function<RopeFn> {
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& cos, const torch::Tensor& sin, int64_t layout) {
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["layout"] = layout;
    torch::NoGradGuard no_grad;
    return rotate(q, k, cos, sin, static_cast<RopeLayout>(layout), /*backward=*/false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto layout = static_cast<RopeLayout>(ctx->saved_data["layout"].toInt());
    auto d = rotate(grads[0], grads[1], saved[0], saved[1], layout, /*backward=*/true);
    return {d[0], d[1], torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor rope_composite(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             RopeLayout layout) {
  check_args(x, cos, sin, layout);
  const int64_t T = x.size(pos_dim_of(layout)), half = x.size(3) / 2;
  auto c = cos.narrow(0, 0, T).to(x.scalar_type());
  auto s = sin.narrow(0, 0, T).to(x.scalar_type());
  if (layout == RopeLayout::kBTHD) {
    c = c.unsqueeze(1);  // [T, 1, hd] broadcasts over heads
    s = s.unsqueeze(1);
  }
  const auto x1 = x.narrow(-1, 0, half);
  const auto x2 = x.narrow(-1, half, half);
  const auto rot = torch::cat({-x2, x1}, -1);
  return x * c + rot * s;
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, RopeLayout layout) {
  check_args(x, cos, sin, layout);
  if (!kernel_ok(x, cos, sin)) return rope_composite(x, cos, sin, layout);
  // The second slot is a 0-element tensor of the same kind, so autograd sees two defined outputs.
  auto none = torch::empty({0, 0, 0, x.size(3)}, x.options());
  return RopeFn::apply(x, none, cos.contiguous(), sin.contiguous(), static_cast<int64_t>(layout))[0];
}

std::pair<torch::Tensor, torch::Tensor> rope_qk(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cos,
                                                const torch::Tensor& sin, RopeLayout layout) {
  check_args(q, cos, sin, layout);
  check_args(k, cos, sin, layout);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(),
              "rope_qk: expected q and k of one dtype and device, got ", q.scalar_type(), "/", q.device(), " and ",
              k.scalar_type(), "/", k.device());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(pos_dim_of(layout)) == k.size(pos_dim_of(layout)),
              "rope_qk: expected q and k with the same batch and sequence sizes, got ", q.sizes(), " and ", k.sizes());
  if (!kernel_ok(q, cos, sin)) return {rope_composite(q, cos, sin, layout), rope_composite(k, cos, sin, layout)};
  auto out = RopeFn::apply(q, k, cos.contiguous(), sin.contiguous(), static_cast<int64_t>(layout));
  return {out[0], out[1]};
}

}  // namespace ablate::ops
