#include "core/optim/adamw.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels/adam_lowbit.h"

#if ABLATE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace ablate::core::optim {

namespace {
torch::TensorOptions fp32_like(const torch::Tensor& p) {
  return torch::TensorOptions().dtype(torch::kFloat).device(p.device());
}
// fp32 working copy of a parameter: the parameter itself when it is fp32 and contiguous.
torch::Tensor fp32_work(const torch::Tensor& p) {
  return (p.scalar_type() == torch::kFloat && p.is_contiguous()) ? p : p.to(torch::kFloat).contiguous();
}
}  // namespace

// ---------------------------------------------------------------------------------------------- AdamW

AdamW::AdamW(std::vector<ParamGroup> groups, const OptimConfig& config)
    : Optimizer(std::move(groups), config.lr), config_(config) {
  for (const auto& p : params_)
    state_.push_back({torch::zeros(p.sizes(), fp32_like(p)), torch::zeros(p.sizes(), fp32_like(p))});
}

int64_t AdamW::state_bytes() const {
  int64_t b = 0;
  for (const auto& s : state_) b += (s.exp_avg.numel() + s.exp_avg_sq.numel()) * 4 + 8;
  return b;
}

void AdamW::step_param(int64_t i, const torch::Tensor& grad, double wd) {
  const torch::Tensor& p = params_[i];
  State& s = state_[i];
  const double t = static_cast<double>(steps_[i]);
  const double b1 = config_.beta1, b2 = config_.beta2;
#if ABLATE_WITH_CUDA
  if (p.is_cuda() && p.scalar_type() == torch::kFloat) {
    // torch's fused kernel expects the step already incremented, as a device fp32 tensor.
    torch::Tensor step_t = torch::full({}, t, fp32_like(p));
    torch::Tensor pp = p;
    at::_fused_adamw_({pp}, {grad}, {s.exp_avg}, {s.exp_avg_sq}, {}, {step_t}, lr_, b1, b2, wd, config_.eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return;
  }
#endif
  torch::Tensor w = fp32_work(p);
  w.mul_(1.0 - lr_ * wd);                                    // decoupled decay
  s.exp_avg.lerp_(grad, 1.0 - b1);                           // m ← β1 m + (1−β1) g
  s.exp_avg_sq.mul_(b2).addcmul_(grad, grad, 1.0 - b2);      // v ← β2 v + (1−β2) g²
  const double bc1 = 1.0 - std::pow(b1, t), bc2 = 1.0 - std::pow(b2, t);
  torch::Tensor denom = (s.exp_avg_sq.sqrt() / std::sqrt(bc2)).add_(config_.eps);
  w.addcdiv_(s.exp_avg, denom, -lr_ / bc1);
  write_param(p, w);
}

void AdamW::step_params(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads) {
#if ABLATE_WITH_CUDA
  // Group the CUDA fp32 parameters by (device, weight decay, step); each group is one _fused_adamw_ call, which
  // walks all its tensors in a few launches (torch.optim.AdamW(fused=True)'s kernel). The step tensor is shared
  // by the group: the kernel only reads it (the caller has already advanced the count).
  struct Group {
    std::vector<torch::Tensor> p, g, m, v;
    torch::Device device{torch::kCPU};
    double wd = 0.0;
    int64_t step = 0;
  };
  std::vector<Group> groups;
  std::vector<size_t> rest;
  for (size_t k = 0; k < idx.size(); ++k) {
    const int64_t i = idx[k];
    const torch::Tensor& p = params_[i];
    if (!(p.is_cuda() && p.scalar_type() == torch::kFloat && p.is_contiguous() && grads[k].is_contiguous())) {
      rest.push_back(k);
      continue;
    }
    Group* grp = nullptr;
    for (auto& gr : groups)
      if (gr.device == p.device() && gr.wd == weight_decay_[i] && gr.step == steps_[i]) grp = &gr;
    if (!grp) {
      groups.push_back(Group{{}, {}, {}, {}, p.device(), weight_decay_[i], steps_[i]});
      grp = &groups.back();
    }
    grp->p.push_back(p);
    grp->g.push_back(grads[k]);
    grp->m.push_back(state_[i].exp_avg);
    grp->v.push_back(state_[i].exp_avg_sq);
  }
  for (auto& gr : groups) {
    const auto step_t = torch::full({}, static_cast<double>(gr.step), fp32_like(gr.p.front()));
    const std::vector<torch::Tensor> steps(gr.p.size(), step_t);
    at::_fused_adamw_(gr.p, gr.g, gr.m, gr.v, {}, steps, lr_, config_.beta1, config_.beta2, gr.wd, config_.eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  }
  for (size_t k : rest) step_param(idx[k], grads[k], weight_decay_[idx[k]]);
#else
  Optimizer::step_params(idx, grads);
#endif
}

void AdamW::visit_state(int64_t i, const TensorVisitor& fn) {
  fn("exp_avg", state_[i].exp_avg);
  fn("exp_avg_sq", state_[i].exp_avg_sq);
}

// ----------------------------------------------------------------------------------------- AdamWLowBit

namespace {
// Bias corrections 1 - β^t in fp32 as torchao (β^t with an fp32 step tensor).
struct BiasCorrections {
  float bc1, bc2;
};
BiasCorrections lowbit_bias_corrections(const OptimConfig& c, int64_t step) {
  const float t = static_cast<float>(step);
  const float b1 = static_cast<float>(c.beta1), b2 = static_cast<float>(c.beta2);
  return {1.f - std::pow(b1, t), 1.f - std::pow(b2, t)};
}
bool env_multi_tensor() {
  const char* e = std::getenv("ABLATE_LOWBIT_MULTI_TENSOR");
  return !(e && std::strcmp(e, "0") == 0);
}
}  // namespace

AdamWLowBit::AdamWLowBit(std::vector<ParamGroup> groups, const OptimConfig& config, int bits)
    : Optimizer(std::move(groups), config.lr), config_(config), bits_(bits), multi_tensor_(env_multi_tensor()) {
  TORCH_CHECK(bits == 8 || bits == 4, "AdamWLowBit: expected bits 8 or 4, got ", bits);
  block_ = config.block_size > 0 ? config.block_size : (bits == 8 ? 256 : 128);
  TORCH_CHECK(block_ % 32 == 0 && block_ <= 1024, "AdamWLowBit: expected a block size that is a multiple of 32 and ",
              "at most 1024, got ", block_);
  const auto m_map = bits == 8 ? kernels::QuantMap::kDynamicSigned8 : kernels::QuantMap::kDynamicSigned4;
  const auto v_map = bits == 8 ? kernels::QuantMap::kDynamicUnsigned8 : kernels::QuantMap::kLinearUnsigned4;
  for (const auto& p : params_) {
    State s;
    if (p.numel() >= config.min_quant_numel && p.numel() % block_ == 0) {
      s.m_q = QuantizedTensor(p.numel(), m_map, block_, p.device());
      s.v_q = QuantizedTensor(p.numel(), v_map, block_, p.device());
    } else {
      s.exp_avg = torch::zeros(p.sizes(), fp32_like(p));
      s.exp_avg_sq = torch::zeros(p.sizes(), fp32_like(p));
    }
    state_.push_back(std::move(s));
  }
}

int64_t AdamWLowBit::state_bytes() const {
  int64_t b = 0;
  for (const auto& s : state_) {
    b += 8;
    if (s.m_q.defined())
      b += s.m_q.bytes() + s.v_q.bytes();
    else
      b += (s.exp_avg.numel() + s.exp_avg_sq.numel()) * 4;
  }
  return b;
}

torch::Tensor AdamWLowBit::exp_avg(int64_t i) const {
  const State& s = state_.at(i);
  return s.m_q.defined() ? s.m_q.decode().view(params_[i].sizes()) : s.exp_avg;
}

torch::Tensor AdamWLowBit::exp_avg_sq(int64_t i) const {
  const State& s = state_.at(i);
  return s.v_q.defined() ? s.v_q.decode().view(params_[i].sizes()) : s.exp_avg_sq;
}

void AdamWLowBit::step_param(int64_t i, const torch::Tensor& grad, double wd) {
  const torch::Tensor& p = params_[i];
  State& s = state_[i];
  const float b1 = static_cast<float>(config_.beta1), b2 = static_cast<float>(config_.beta2);
  const auto [bc1, bc2] = lowbit_bias_corrections(config_, steps_[i]);
  torch::Tensor w = fp32_work(p);
  if (s.m_q.defined()) {
    const torch::Tensor g = grad.contiguous();
    kernels::AdamLowbitArgs a;
    a.p = w.data_ptr<float>();
    a.g = g.data_ptr<float>();
    a.m_codes = s.m_q.codes().data_ptr<uint8_t>();
    a.m_scale = s.m_q.scale().data_ptr<float>();
    a.v_codes = s.v_q.codes().data_ptr<uint8_t>();
    a.v_scale = s.v_q.scale().data_ptr<float>();
    a.m_qmap = s.m_q.qmap().data_ptr<float>();
    a.v_qmap = s.v_q.qmap().data_ptr<float>();
    a.n = p.numel();
    a.block = block_;
    a.bits = bits_;
    a.lr = static_cast<float>(lr_);
    a.beta1 = b1;
    a.beta2 = b2;
    a.eps = static_cast<float>(config_.eps);
    a.weight_decay = static_cast<float>(wd);
    a.bias_correction1 = bc1;
    a.bias_correction2 = bc2;
    if (p.is_cuda()) {
#if ABLATE_WITH_CUDA
      const cudaError_t e = kernels::adam_lowbit_step_cuda(a, at::cuda::getCurrentCUDAStream());
      TORCH_CHECK(e == cudaSuccess, "adam_lowbit_step_cuda failed: ", cudaGetErrorString(e));
#else
      TORCH_CHECK(false, name(), ": got a CUDA parameter but Ablate was built without ABLATE_WITH_CUDA");
#endif
    } else {
      kernels::adam_lowbit_step_ref(a);
    }
  } else {
    // Unquantized small tensors: the same equations with torch ops (torchao single_param_adam).
    const float lr = static_cast<float>(lr_);
    w.sub_(w * (lr * static_cast<float>(wd)));
    s.exp_avg.lerp_(grad, 1.f - b1);
    s.exp_avg_sq.lerp_(grad.square(), 1.f - b2);
    torch::Tensor denom = (s.exp_avg_sq.sqrt() / std::sqrt(bc2)).add_(static_cast<float>(config_.eps));
    w.sub_((s.exp_avg / bc1).mul_(lr).div_(denom));
  }
  write_param(p, w);
}

void AdamWLowBit::step_params(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads) {
  if (!multi_tensor_) {
    Optimizer::step_params(idx, grads);
    return;
  }
  // Parameters are grouped by (device, weight decay, step):
  //  - quantized fp32 CUDA parameters with contiguous fp32 gradients, p and g 16-byte aligned (the kernel moves
  //    them as float4; tensors of the caching allocator are, views at odd offsets may not be), when the block
  //    size is one the kernel takes: one multi-tensor kernel launch per group;
  //  - unquantized fp32 parameters (the small tensors): the torch ops of step_param as _foreach ops, a few
  //    multi-tensor launches per group on CUDA (on CPU the _foreach ops run the same per-tensor ops);
  //  - everything else (quantized CPU or bf16 parameters, ...) through step_param.
  struct Group {
    c10::DeviceIndex device = 0;
    bool cuda = false;
    double wd = 0.0;
    int64_t step = 0;
    std::vector<size_t> ks;
  };
  const auto add_to = [&](std::vector<Group>& gs, size_t k) {
    const int64_t i = idx[k];
    const torch::Device d = params_[i].device();
    for (auto& gr : gs)
      if (gr.cuda == d.is_cuda() && gr.device == d.index() && gr.wd == weight_decay_[i] && gr.step == steps_[i]) {
        gr.ks.push_back(k);
        return;
      }
    gs.push_back(Group{d.index(), d.is_cuda(), weight_decay_[i], steps_[i], {k}});
  };
  const auto aligned = [](const void* ptr, uintptr_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; };
  const uintptr_t code_align = bits_ == 8 ? 4 : 2;
#if ABLATE_WITH_CUDA
  const bool kernel_ok = kernels::adam_lowbit_multi_supported(block_, bits_);
#else
  const bool kernel_ok = false;
#endif
  std::vector<Group> groups, small;
  std::vector<size_t> rest;
  for (size_t k = 0; k < idx.size(); ++k) {
    const int64_t i = idx[k];
    const torch::Tensor& p = params_[i];
    const torch::Tensor& g = grads[k];
    const State& s = state_[i];
    const bool fp32 = p.scalar_type() == torch::kFloat && g.scalar_type() == torch::kFloat && g.device() == p.device();
    if (s.m_q.defined()) {
      const bool ok = kernel_ok && fp32 && p.is_cuda() && p.is_contiguous() && g.is_contiguous() &&
                      aligned(p.data_ptr(), 16) && aligned(g.data_ptr(), 16) &&
                      aligned(s.m_q.codes().data_ptr(), code_align) && aligned(s.v_q.codes().data_ptr(), code_align);
      if (ok)
        add_to(groups, k);
      else
        rest.push_back(k);
    } else if (fp32) {
      add_to(small, k);
    } else {
      rest.push_back(k);
    }
  }
#if ABLATE_WITH_CUDA
  for (const Group& gr : groups) {
    const c10::cuda::CUDAGuard guard(gr.device);
    const int64_t n_t = static_cast<int64_t>(gr.ks.size());
    // Descriptors staged in pinned memory from torch's caching host allocator and copied on the current stream
    // without a synchronization: the allocator keeps the pinned block until that copy has run, and the device
    // copy is a stream-ordered allocation on the launch stream, so it lives until the kernel has read it.
    torch::Tensor host = torch::empty({n_t * static_cast<int64_t>(sizeof(kernels::AdamLowbitTensorDesc))},
                                      torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(true));
    auto* desc = reinterpret_cast<kernels::AdamLowbitTensorDesc*>(host.data_ptr<uint8_t>());
    int64_t start = 0;
    for (int64_t j = 0; j < n_t; ++j) {
      const size_t k = gr.ks[static_cast<size_t>(j)];
      State& s = state_[idx[k]];
      kernels::AdamLowbitTensorDesc d;
      d.p = static_cast<float*>(params_[idx[k]].data_ptr());
      d.g = static_cast<const float*>(grads[k].data_ptr());
      d.m_codes = static_cast<uint8_t*>(s.m_q.codes().data_ptr());
      d.m_scale = static_cast<float*>(s.m_q.scale().data_ptr());
      d.v_codes = static_cast<uint8_t*>(s.v_q.codes().data_ptr());
      d.v_scale = static_cast<float*>(s.v_q.scale().data_ptr());
      d.n = params_[idx[k]].numel();
      d.block_start = start;
      start += d.n / block_;
      std::memcpy(desc + j, &d, sizeof d);
    }
    const torch::Tensor dev = host.to(torch::Device(torch::kCUDA, gr.device), torch::kUInt8, /*non_blocking=*/true);
    const State& s0 = state_[idx[gr.ks.front()]];
    const CodeTables* tables = nullptr;
    for (const auto& ct : code_tables_)
      if (ct.device == gr.device) tables = &ct;
    if (!tables) {
      // Once per device: from the maps the kernel dequantizes with (synchronous copies, first step only).
      const int nq = 1 << bits_;
      const torch::Tensor m_map = s0.m_q.qmap().cpu().contiguous(), v_map = s0.v_q.qmap().cpu().contiguous();
      TORCH_CHECK(m_map.numel() == nq && v_map.numel() == nq, name(), ": unexpected qmap size");
      const torch::Device dev_d(torch::kCUDA, gr.device);
      CodeTables ct;
      ct.device = gr.device;
      torch::Tensor th = torch::empty({2, nq}, torch::kFloat);
      const int64_t lut_bytes = 2 * 32 * 128;
      torch::Tensor lut = torch::zeros({2, lut_bytes}, torch::kUInt8);
      const bool use_lut =
          kernels::adam_lowbit_code_lut(m_map.data_ptr<float>(), bits_, lut.data_ptr<uint8_t>(), th.data_ptr<float>(),
                                        &ct.m_elo, &ct.m_rows) &&
          kernels::adam_lowbit_code_lut(v_map.data_ptr<float>(), bits_, lut.data_ptr<uint8_t>() + lut_bytes,
                                        th.data_ptr<float>() + nq, &ct.v_elo, &ct.v_rows);
      if (use_lut) {
        ct.lut = lut.to(dev_d);
      } else {
        kernels::adam_lowbit_code_thresholds(m_map.data_ptr<float>(), bits_, th.data_ptr<float>());
        kernels::adam_lowbit_code_thresholds(v_map.data_ptr<float>(), bits_, th.data_ptr<float>() + nq);
      }
      ct.thresh = th.to(dev_d);
      code_tables_.push_back(std::move(ct));
      tables = &code_tables_.back();
    }
    const auto [bc1, bc2] = lowbit_bias_corrections(config_, gr.step);
    kernels::AdamLowbitMultiArgs a;
    a.tensors = reinterpret_cast<const kernels::AdamLowbitTensorDesc*>(dev.data_ptr<uint8_t>());
    a.num_tensors = n_t;
    a.total_blocks = start;
    a.m_qmap = s0.m_q.qmap().data_ptr<float>();
    a.v_qmap = s0.v_q.qmap().data_ptr<float>();
    a.m_thresh = tables->thresh.data_ptr<float>();
    a.v_thresh = tables->thresh.data_ptr<float>() + (1 << bits_);
    if (tables->lut.defined()) {
      a.m_lut = tables->lut.data_ptr<uint8_t>();
      a.v_lut = tables->lut.data_ptr<uint8_t>() + tables->lut.size(1);
      a.m_lut_elo = tables->m_elo;
      a.m_lut_rows = tables->m_rows;
      a.v_lut_elo = tables->v_elo;
      a.v_lut_rows = tables->v_rows;
    }
    a.block = block_;
    a.bits = bits_;
    a.lr = static_cast<float>(lr_);
    a.beta1 = static_cast<float>(config_.beta1);
    a.beta2 = static_cast<float>(config_.beta2);
    a.eps = static_cast<float>(config_.eps);
    a.weight_decay = static_cast<float>(gr.wd);
    a.bias_correction1 = bc1;
    a.bias_correction2 = bc2;
    const cudaError_t e = kernels::adam_lowbit_multi_step_cuda(a, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(e == cudaSuccess, "adam_lowbit_multi_step_cuda failed: ", cudaGetErrorString(e));
  }
#endif
  for (const Group& gr : small) step_unquantized(idx, grads, gr.ks, gr.wd, gr.step);
  for (size_t k : rest) step_param(idx[k], grads[k], weight_decay_[idx[k]]);
}

void AdamWLowBit::step_unquantized(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads,
                                   const std::vector<size_t>& ks, double wd, int64_t step) {
  // step_param's unquantized branch, operation for operation, over the lists (w is the fp32 parameter itself).
  std::vector<torch::Tensor> w, g, m, v;
  for (size_t k : ks) {
    w.push_back(params_[idx[k]]);
    g.push_back(grads[k]);
    m.push_back(state_[idx[k]].exp_avg);
    v.push_back(state_[idx[k]].exp_avg_sq);
  }
  const float b1 = static_cast<float>(config_.beta1), b2 = static_cast<float>(config_.beta2);
  const auto [bc1, bc2] = lowbit_bias_corrections(config_, step);
  const float lr = static_cast<float>(lr_);
  at::_foreach_sub_(w, at::_foreach_mul(w, lr * static_cast<float>(wd)));  // w.sub_(w * (lr * wd))
  at::_foreach_lerp_(m, g, 1.f - b1);                                       // m.lerp_(g, 1 - b1)
  at::_foreach_lerp_(v, at::_foreach_mul(g, g), 1.f - b2);                  // v.lerp_(g.square(), 1 - b2): x*x
  std::vector<torch::Tensor> denom = at::_foreach_sqrt(v);                  // (v.sqrt() / sqrt(bc2)).add_(eps)
  at::_foreach_div_(denom, std::sqrt(bc2));
  at::_foreach_add_(denom, static_cast<float>(config_.eps));
  std::vector<torch::Tensor> upd = at::_foreach_div(m, bc1);                // w.sub_((m / bc1).mul_(lr).div_(denom))
  at::_foreach_mul_(upd, lr);
  at::_foreach_div_(upd, denom);
  at::_foreach_sub_(w, upd);
}

void AdamWLowBit::visit_state(int64_t i, const TensorVisitor& fn) {
  State& s = state_[i];
  if (s.m_q.defined()) {
    fn("exp_avg.codes", s.m_q.codes());
    fn("exp_avg.scale", s.m_q.scale());
    fn("exp_avg_sq.codes", s.v_q.codes());
    fn("exp_avg_sq.scale", s.v_q.scale());
  } else {
    fn("exp_avg", s.exp_avg);
    fn("exp_avg_sq", s.exp_avg_sq);
  }
}

}  // namespace ablate::core::optim
