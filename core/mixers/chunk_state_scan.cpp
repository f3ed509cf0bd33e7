#include "core/mixers/chunk_state_scan.h"

#include <vector>

#include "kernels/chunk_state_scan.h"

#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ablate::core {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Scan = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>;

void check_scan_inputs(const torch::Tensor& Ut, const torch::Tensor& W, const torch::Tensor& Kend,
                       const torch::Tensor& decay, const torch::Tensor& S0) {
  TORCH_CHECK(Ut.dim() == 5, "chunk_state_scan: Ut must be (B,H,C,L,V), got ", Ut.sizes());
  const int64_t B = Ut.size(0), H = Ut.size(1), C = Ut.size(2), L = Ut.size(3), V = Ut.size(4);
  TORCH_CHECK(C > 0 && L > 0, "chunk_state_scan: need at least one chunk of at least one step, got Ut ", Ut.sizes());
  TORCH_CHECK(W.dim() == 5 && W.size(0) == B && W.size(1) == H && W.size(2) == C && W.size(3) == L,
              "chunk_state_scan: W must be (B,H,C,L,K) with (B,H,C,L) from Ut ", Ut.sizes(), ", got ", W.sizes());
  const int64_t K = W.size(4);
  TORCH_CHECK(Kend.sizes() == W.sizes(), "chunk_state_scan: Kend must have W's shape ", W.sizes(), ", got ",
              Kend.sizes());
  const std::vector<int64_t> bhc{B, H, C}, bhkv{B, H, K, V};
  TORCH_CHECK(decay.sizes() == bhc, "chunk_state_scan: decay must be (B,H,C) = ", c10::IntArrayRef(bhc), ", got ",
              decay.sizes());
  TORCH_CHECK(S0.sizes() == bhkv, "chunk_state_scan: S0 must be (B,H,K,V) = ", c10::IntArrayRef(bhkv), ", got ",
              S0.sizes());
  for (const auto* t : {&W, &Kend, &decay, &S0}) {
    TORCH_CHECK(t->scalar_type() == Ut.scalar_type() && t->device() == Ut.device(),
                "chunk_state_scan: all inputs must share Ut's dtype and device (", Ut.scalar_type(), ", ", Ut.device(),
                "), got ", t->scalar_type(), ", ", t->device());
  }
}

torch::Tensor dec(const torch::Tensor& decay, int64_t c) { return decay.select(2, c).unsqueeze(-1).unsqueeze(-1); }

// The forward walk as recorded by autograd (kAutogradLoop, and the reference for the custom op).
Scan scan_autograd_loop(const torch::Tensor& Ut, const torch::Tensor& W, const torch::Tensor& Kend,
                        const torch::Tensor& decay, const torch::Tensor& S0) {
  const int64_t C = Ut.size(2);
  auto S = S0;
  std::vector<torch::Tensor> s_in, us;
  s_in.reserve(C);
  us.reserve(C);
  for (int64_t c = 0; c < C; ++c) {
    s_in.push_back(S);
    us.push_back(Ut.select(2, c) - torch::matmul(W.select(2, c), S));
    S = dec(decay, c) * S + torch::matmul(Kend.select(2, c).transpose(-1, -2), us.back());
  }
  return {torch::stack(s_in, 2), torch::stack(us, 2), S};
}

// The generic walk of kernels/chunk_state_scan.h as a LibTorch loop (no autograd):
//   Zout_c = Z;  X_c = P1_c + s1 M1_c Z;  Z = decay_c Z + s2 M2_c^T X_c + P2_c.
Scan walk_torch(const torch::Tensor& M1, const torch::Tensor& M2, const torch::Tensor& P1, const torch::Tensor& P2,
                const torch::Tensor& decay, const torch::Tensor& Z0, double s1, double s2, bool reverse) {
  const int64_t C = M1.size(2);
  auto zout = torch::empty({Z0.size(0), Z0.size(1), C, Z0.size(2), Z0.size(3)}, Z0.options());
  auto x = torch::empty(P1.sizes(), P1.options());
  auto Z = Z0.clone();
  for (int64_t step = 0; step < C; ++step) {
    const int64_t c = reverse ? C - 1 - step : step;
    zout.select(2, c).copy_(Z);
    const auto xc = P1.select(2, c) + s1 * torch::matmul(M1.select(2, c), Z);
    x.select(2, c).copy_(xc);
    Z = dec(decay, c) * Z + s2 * torch::matmul(M2.select(2, c).transpose(-1, -2), xc);
    if (P2.defined()) Z = Z + P2.select(2, c);
  }
  return {zout, x, Z};
}

#if ABLATE_WITH_CUDA
Scan walk_kernel(const torch::Tensor& M1, const torch::Tensor& M2, const torch::Tensor& P1, const torch::Tensor& P2,
                 const torch::Tensor& decay, const torch::Tensor& Z0, double s1, double s2, bool reverse) {
  const c10::cuda::CUDAGuard guard(M1.device());
  const auto m1 = M1.contiguous(), m2 = M2.contiguous(), p1 = P1.contiguous(), d = decay.contiguous();
  const auto z0 = Z0.contiguous();
  const auto p2 = P2.defined() ? P2.contiguous() : P2;
  const int64_t B = M1.size(0), H = M1.size(1), C = M1.size(2), L = M1.size(3), K = M1.size(4), V = P1.size(4);
  auto zout = torch::empty({B, H, C, K, V}, z0.options());
  auto x = torch::empty({B, H, C, L, V}, z0.options());
  auto zfinal = torch::empty({B, H, K, V}, z0.options());
  kernels::ChunkScanArgs a;
  a.bh = B * H;
  a.chunks = C;
  a.chunk_len = L;
  a.dk = K;
  a.dv = V;
  a.m1 = m1.data_ptr<float>();
  a.m2 = m2.data_ptr<float>();
  a.p1 = p1.data_ptr<float>();
  a.p2 = p2.defined() ? p2.data_ptr<float>() : nullptr;
  a.decay = d.data_ptr<float>();
  a.z0 = z0.data_ptr<float>();
  a.zout = zout.data_ptr<float>();
  a.x = x.data_ptr<float>();
  a.zfinal = zfinal.data_ptr<float>();
  a.s1 = static_cast<float>(s1);
  a.s2 = static_cast<float>(s2);
  a.reverse = reverse;
  const auto err = kernels::chunk_state_scan_cuda(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "chunk_state_scan ", reverse ? "backward" : "forward", " CUDA kernel: ",
              cudaGetErrorString(err));
  return {zout, x, zfinal};
}
#endif

Scan walk(bool use_kernel, const torch::Tensor& M1, const torch::Tensor& M2, const torch::Tensor& P1,
          const torch::Tensor& P2, const torch::Tensor& decay, const torch::Tensor& Z0, double s1, double s2,
          bool reverse) {
#if ABLATE_WITH_CUDA
  if (use_kernel) return walk_kernel(M1, M2, P1, P2, decay, Z0, s1, s2, reverse);
#else
  TORCH_CHECK(!use_kernel, "chunk_state_scan: this build has no CUDA kernels (ABLATE_WITH_CUDA=OFF)");
#endif
  return walk_torch(M1, M2, P1, P2, decay, Z0, s1, s2, reverse);
}

struct ChunkStateScanFn : torch::autograd::Function<ChunkStateScanFn> {
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& Ut, const torch::Tensor& W,
                               const torch::Tensor& Kend, const torch::Tensor& decay, const torch::Tensor& S0,
                               bool use_kernel) {
    torch::NoGradGuard no_grad;
    // Forward: M1 = W, s1 = -1, P1 = Ut; M2 = Kend, s2 = +1, no P2.
    auto [S_in, U, S_final] = walk(use_kernel, W, Kend, Ut, torch::Tensor(), decay, S0, -1.0, 1.0, false);
    ctx->save_for_backward({W, Kend, decay, S_in, U});
    ctx->saved_data["use_kernel"] = use_kernel;
    return {S_in, U, S_final};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &W = saved[0], &Kend = saved[1], &decay = saved[2], &S_in = saved[3], &U = saved[4];
    const bool use_kernel = ctx->saved_data["use_kernel"].toBool();
    // grads are materialized (zeros for outputs that did not reach the loss).
    const auto &dS_in = grads[0], &dU = grads[1], &dS_final = grads[2];
    // Backward walk: M1 = Kend, s1 = +1, P1 = dU; M2 = W, s2 = -1, P2 = dS_in; from dS_final, chunks reversed.
    auto [G_next, dUt, dS0] = walk(use_kernel, Kend, W, dU, dS_in, decay, dS_final, 1.0, -1.0, true);
    auto dW = -torch::matmul(dUt, S_in.transpose(-1, -2));
    auto dKend = torch::matmul(U, G_next.transpose(-1, -2));
    auto ddecay = (S_in * G_next).sum({-2, -1});
    return {dUt, dW, dKend, ddecay, dS0, torch::Tensor()};
  }
};

}  // namespace

bool chunk_state_scan_kernel_applies(const torch::Tensor& t, int64_t chunk_len, int64_t dk) {
#if ABLATE_WITH_CUDA
  if (!t.is_cuda() || t.scalar_type() != torch::kFloat32) return false;
  const c10::cuda::CUDAGuard guard(t.device());
  return kernels::chunk_state_scan_cuda_supported(chunk_len, dk);
#else
  (void)t;
  (void)chunk_len;
  (void)dk;
  return false;
#endif
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> chunk_state_scan(const torch::Tensor& Ut,
                                                                         const torch::Tensor& W,
                                                                         const torch::Tensor& Kend,
                                                                         const torch::Tensor& decay,
                                                                         const torch::Tensor& S0, ChunkScanImpl impl) {
  check_scan_inputs(Ut, W, Kend, decay, S0);
  if (impl == ChunkScanImpl::kAutogradLoop) return scan_autograd_loop(Ut, W, Kend, decay, S0);
  const bool applies = chunk_state_scan_kernel_applies(Ut, Ut.size(3), W.size(4));
  TORCH_CHECK(impl != ChunkScanImpl::kKernel || applies,
              "chunk_state_scan: the CUDA kernel does not take these inputs (needs fp32 on CUDA in a CUDA build, and "
              "two L x K fp32 tiles in shared memory), got ",
              Ut.scalar_type(), " on ", Ut.device(), ", L ", Ut.size(3), ", K ", W.size(4));
  const bool use_kernel = impl == ChunkScanImpl::kKernel || (impl == ChunkScanImpl::kAuto && applies);
  auto out = ChunkStateScanFn::apply(Ut, W, Kend, decay, S0, use_kernel);
  return {out[0], out[1], out[2]};
}

}  // namespace ablate::core
