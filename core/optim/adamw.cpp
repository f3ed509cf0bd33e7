#include "core/optim/adamw.h"

#include <cmath>

#include "kernels/adam_lowbit.h"

#if ABLATE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
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

AdamWLowBit::AdamWLowBit(std::vector<ParamGroup> groups, const OptimConfig& config, int bits)
    : Optimizer(std::move(groups), config.lr), config_(config), bits_(bits) {
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
  // Bias corrections in fp32 as torchao (β^t with an fp32 step tensor).
  const float t = static_cast<float>(steps_[i]);
  const float b1 = static_cast<float>(config_.beta1), b2 = static_cast<float>(config_.beta2);
  const float bc1 = 1.f - std::pow(b1, t), bc2 = 1.f - std::pow(b2, t);
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
