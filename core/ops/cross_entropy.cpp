#include "core/ops/cross_entropy.h"
#include "core/ops/kernel_dispatch.h"

#include <ATen/autocast_mode.h>

#include <algorithm>

#include "kernels/cross_entropy.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::ops {
namespace {

namespace F = torch::nn::functional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool kernel_ok(torch::ScalarType ct, const torch::Device& dev) { return kernel_takes(ct, dev); }

void run_ce(kernels::CrossEntropyArgs& a, const torch::Tensor& logits) {
  if (logits.is_cuda()) {
#if ABLATE_WITH_CUDA
    const auto err = kernels::cross_entropy_cuda(a, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "cross_entropy CUDA kernel: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "linear_cross_entropy: CUDA tensor given, but this build has no CUDA kernels");
#endif
  } else {
    kernels::cross_entropy_ref(a);
  }
}

struct LinearCEFn : torch::autograd::Function<LinearCEFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& hidden, const torch::Tensor& weight,
                               const torch::Tensor& targets, int64_t chunk_rows, int64_t ignore_index,
                               int64_t compute_dtype) {
    // Every dtype below is chosen explicitly; autocast must not re-cast the matmuls.
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
#if ABLATE_WITH_CUDA
    const c10::cuda::OptionalCUDAGuard guard(hidden.is_cuda() ? std::optional<c10::Device>(hidden.device())
                                                               : std::nullopt);
#endif
    const auto ct = static_cast<torch::ScalarType>(compute_dtype);
    const bool need_grad = hidden.requires_grad() || weight.requires_grad();
    const auto h = hidden.to(ct).contiguous();
    const auto w = weight.to(ct).contiguous();
    const auto tgt = targets.to(torch::kLong).contiguous();
    const int64_t N = h.size(0), d = h.size(1), V = w.size(0);
    const auto f32 = h.options().dtype(torch::kFloat32);
    const auto count = tgt.ne(ignore_index).sum().clamp_min(1).to(torch::kFloat32);  // on device: no sync
    const auto inv_count = count.reciprocal().contiguous();
    auto loss_rows = torch::empty({N}, f32);
    torch::Tensor grad_h, grad_w;
    if (need_grad) {
      grad_h = torch::empty({N, d}, h.options());
      grad_w = torch::zeros({V, d}, f32);
    }
    if (chunk_rows <= 0) chunk_rows = linear_cross_entropy_chunk_rows(V);
    auto logits_buf = torch::empty({std::min(chunk_rows, std::max<int64_t>(N, 1)), V}, h.options());
    for (int64_t s = 0; s < N; s += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - s);
      const auto hc = h.narrow(0, s, n);
      auto lg = logits_buf.narrow(0, 0, n);
      at::mm_out(lg, hc, w.t());
      kernels::CrossEntropyArgs a;
      a.logits = lg.data_ptr();
      a.targets = tgt.data_ptr<int64_t>() + s;
      a.loss = loss_rows.data_ptr<float>() + s;
      a.grad_scale = inv_count.data_ptr<float>();
      a.rows = n;
      a.vocab = V;
      a.ld = lg.stride(0);
      a.ignore_index = ignore_index;
      a.bf16 = ct == torch::kBFloat16;
      a.write_grad = need_grad;
      run_ce(a, lg);
      if (!need_grad) continue;
      auto gh = grad_h.narrow(0, s, n);
      at::mm_out(gh, lg, w);  // lg now holds d(loss)/d(logits) for the chunk
      if (ct == torch::kFloat32) {
        grad_w.addmm_(lg.t(), hc);
      } else {
        at::addmm_out(grad_w, grad_w, lg.t(), hc, torch::kFloat32);  // bf16 operands, fp32 accumulate/output
      }
    }
    const auto loss = loss_rows.sum() / count;
    if (need_grad) ctx->save_for_backward({grad_h, grad_w});
    ctx->saved_data["need_grad"] = need_grad;
    ctx->saved_data["h_dtype"] = static_cast<int64_t>(hidden.scalar_type());
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!ctx->saved_data["need_grad"].toBool() || !grads[0].defined())
      return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const auto g = grads[0].to(torch::kFloat32);
    const auto h_dtype = static_cast<torch::ScalarType>(ctx->saved_data["h_dtype"].toInt());
    const auto w_dtype = static_cast<torch::ScalarType>(ctx->saved_data["w_dtype"].toInt());
    auto gh = (saved[0] * g.to(saved[0].scalar_type())).to(h_dtype);
    auto gw = (saved[1] * g).to(w_dtype);
    return {gh, gw, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

// 4096 rows for any vocabulary up to 2^18 (1.2 GB of bf16 logits at V = 151936): on the H200 the matmuls of
// 4096-row chunks ran 10% faster than 1664-row ones (bench/kernels/README.md); fewer rows for larger V.
int64_t linear_cross_entropy_chunk_rows(int64_t V) {
  const int64_t rows = (int64_t(1) << 30) / std::max<int64_t>(V, 1);
  return std::clamp<int64_t>(rows, 128, 4096) / 128 * 128;
}

torch::Tensor linear_cross_entropy_composite(const torch::Tensor& hidden, const torch::Tensor& weight,
                                             const torch::Tensor& targets, int64_t ignore_index) {
  const auto logits = torch::matmul(hidden, weight.t()).to(torch::kFloat32);
  const auto count = targets.ne(ignore_index).sum().clamp_min(1).to(torch::kFloat32);
  const auto sum = F::cross_entropy(logits, targets,
                                    F::CrossEntropyFuncOptions().ignore_index(ignore_index).reduction(torch::kSum));
  return sum / count;
}

torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                   const torch::Tensor& targets, int64_t chunk_rows, int64_t ignore_index) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_cross_entropy: expected hidden [N, d] and weight [V, d], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "linear_cross_entropy: expected targets [",
              hidden.size(0), "], got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == torch::kLong || targets.scalar_type() == torch::kInt,
              "linear_cross_entropy: expected int64 (or int32) targets, got ", targets.scalar_type());
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == targets.device(),
              "linear_cross_entropy: expected hidden, weight and targets on one device, got ", hidden.device(), ", ",
              weight.device(), ", ", targets.device());
  const auto dev = hidden.device();
  torch::ScalarType ct = hidden.scalar_type();
  if (at::autocast::is_autocast_enabled(dev.type())) {
    ct = at::autocast::get_autocast_dtype(dev.type());
  } else {
    TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(),
                "linear_cross_entropy: expected hidden and weight of one dtype (or autocast on), got ",
                hidden.scalar_type(), " and ", weight.scalar_type());
  }
  if (!kernel_ok(ct, dev) || hidden.size(0) == 0 || weight.size(0) == 0) {
    return linear_cross_entropy_composite(hidden, weight, targets.to(torch::kLong), ignore_index);
  }
  return LinearCEFn::apply(hidden, weight, targets, chunk_rows, ignore_index, static_cast<int64_t>(ct));
}

}  // namespace ablate::ops
