#include "core/optim/shampoo.h"

#include <cmath>

namespace ablate::core::optim {
namespace {

// (A)^(-1/4) of a symmetric PSD matrix via eigh, eigenvalues clamped at 0 then regularized by eps.
torch::Tensor inverse_fourth_root(const torch::Tensor& a, double eps) {
  torch::Tensor lam, u;
  try {
    std::tie(lam, u) = torch::linalg_eigh(a);
  } catch (const c10::Error&) {
    std::tie(lam, u) = torch::linalg_eigh(a.to(torch::kDouble));
    lam = lam.to(torch::kFloat);
    u = u.to(torch::kFloat);
  }
  const torch::Tensor d = (lam.clamp_min(0.0) + eps).pow(-0.25);
  return (u * d.unsqueeze(0)).mm(u.t());
}

}  // namespace

Shampoo::Shampoo(std::vector<ParamGroup> groups, const OptimConfig& config)
    : Optimizer(std::move(groups), config.lr), config_(config) {
  TORCH_CHECK(config.precondition_frequency >= 1, "Shampoo: expected precondition_frequency >= 1, got ",
              config.precondition_frequency);
  for (const auto& p : params_) {
    State s;
    const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(p.device());
    s.exp_avg = torch::zeros(p.sizes(), opts);
    s.exp_avg_sq = torch::zeros(p.sizes(), opts);
    if (p.dim() == 2) {
      s.rows = p.size(0);
      s.cols = p.size(1);
      for (int side = 0; side < 2; ++side) {
        const int64_t d = side == 0 ? s.rows : s.cols;
        if (d > config.max_precond_dim) continue;
        s.fac[side] = torch::zeros({d, d}, opts);
        s.inv[side] = torch::eye(d, opts);
      }
    }
    state_.push_back(std::move(s));
  }
}

int64_t Shampoo::preconditioner_bytes() const {
  int64_t b = 0;
  for (const auto& s : state_)
    for (int side = 0; side < 2; ++side)
      if (s.fac[side].defined()) b += (s.fac[side].numel() + s.inv[side].numel()) * 4;
  return b;
}

int64_t Shampoo::state_bytes() const {
  int64_t b = preconditioner_bytes();
  for (const auto& s : state_) b += (s.exp_avg.numel() + s.exp_avg_sq.numel()) * 4 + 8;
  return b;
}

void Shampoo::step_param(int64_t i, const torch::Tensor& grad, double wd) {
  const torch::Tensor& p = params_[i];
  State& s = state_[i];
  const int64_t t = steps_[i];
  const double b1 = config_.beta1, b2 = config_.beta2, sb = config_.shampoo_beta;
  s.exp_avg.mul_(b1).add_(grad, 1.0 - b1);
  s.exp_avg_sq.mul_(b2).addcmul_(grad, grad, 1.0 - b2);
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(t));
  const torch::Tensor m_hat = s.exp_avg / bc1;
  const torch::Tensor adam = m_hat / ((s.exp_avg_sq / bc2).sqrt_().add_(config_.eps));
  torch::Tensor dir = adam;
  if (s.fac[0].defined() || s.fac[1].defined()) {
    const torch::Tensor g = grad.reshape({s.rows, s.cols});
    const bool refresh = t == 1 || t % config_.precondition_frequency == 0;
    if (s.fac[0].defined()) {
      s.fac[0].mul_(sb).add_(g.mm(g.t()), 1.0 - sb);
      if (refresh) s.inv[0].copy_(inverse_fourth_root(s.fac[0], config_.shampoo_eps));
    }
    if (s.fac[1].defined()) {
      s.fac[1].mul_(sb).add_(g.t().mm(g), 1.0 - sb);
      if (refresh) s.inv[1].copy_(inverse_fourth_root(s.fac[1], config_.shampoo_eps));
    }
    torch::Tensor sh = m_hat.reshape({s.rows, s.cols});
    if (s.inv[0].defined()) sh = s.inv[0].mm(sh);
    if (s.inv[1].defined()) sh = sh.mm(s.inv[1]);
    // Graft without a host sync: D = S·‖A‖/‖S‖, or A where ‖S‖ = 0.
    const torch::Tensor s_norm = sh.norm();
    const torch::Tensor grafted = sh * (adam.norm() / s_norm.clamp_min(1e-30));
    dir = torch::where(s_norm > 0, grafted, adam.reshape({s.rows, s.cols})).view(p.sizes());
  }
  torch::Tensor w = (p.scalar_type() == torch::kFloat && p.is_contiguous()) ? p : p.to(torch::kFloat).contiguous();
  w.mul_(1.0 - lr_ * wd).add_(dir, -lr_);
  write_param(p, w);
}

void Shampoo::visit_state(int64_t i, const TensorVisitor& fn) {
  State& s = state_[i];
  fn("exp_avg", s.exp_avg);
  fn("exp_avg_sq", s.exp_avg_sq);
  if (s.fac[0].defined()) {
    fn("L", s.fac[0]);
    fn("L_inv_root", s.inv[0]);
  }
  if (s.fac[1].defined()) {
    fn("R", s.fac[1]);
    fn("R_inv_root", s.inv[1]);
  }
}

}  // namespace ablate::core::optim
