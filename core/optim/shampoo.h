// Shampoo (Gupta, Koren & Singer 2018) with Adam grafting (Agarwal et al. 2020; as in Distributed Shampoo,
// Shi et al. 2023), decoupled weight decay.
//
// Per 2-D parameter W (m×n), step t, all in fp32:
//   m ← β1·m + (1−β1)·G;  v ← β2·v + (1−β2)·G²;  m̂ = m/(1−β1^t);  v̂ = v/(1−β2^t)
//   A = m̂ / (sqrt(v̂) + eps)                                          (Adam direction, the graft)
//   L ← β_s·L + (1−β_s)·G Gᵀ;  R ← β_s·R + (1−β_s)·Gᵀ G              (factor EMA, β_s = shampoo_beta)
//   t = 1 or t % f = 0:  L⁻¼ = U diag((max(λ, 0) + ε)^(−1/4)) Uᵀ  with (λ, U) = eigh(L); R⁻¼ likewise
//                        (ε = shampoo_eps; eigh in fp32, fp64 on failure)
//   S = L⁻¼ · m̂ · R⁻¼   (Shampoo applied to the first moment, i.e. with momentum; Gupta et al. eq. for order 2)
//   D = S · ‖A‖_F / ‖S‖_F  (layer-wise grafting: Shampoo's direction with Adam's step size; D = A if S = 0)
//   W ← W·(1 − lr·wd) − lr·D
// A side longer than max_precond_dim uses the identity. Parameters with dim() != 2 (or both sides too long)
// take D = A, i.e. AdamW.
#pragma once

#include "core/optim/optimizer.h"

namespace ablate::core::optim {

class Shampoo : public Optimizer {
 public:
  Shampoo(std::vector<ParamGroup> groups, const OptimConfig& config);
  int64_t state_bytes() const override;
  std::string name() const override { return "shampoo"; }
  int64_t preconditioner_bytes() const;
  const torch::Tensor& left_factor(int64_t i) const { return state_.at(i).fac[0]; }
  const torch::Tensor& right_factor(int64_t i) const { return state_.at(i).fac[1]; }
  const torch::Tensor& left_inv_root(int64_t i) const { return state_.at(i).inv[0]; }
  const torch::Tensor& right_inv_root(int64_t i) const { return state_.at(i).inv[1]; }

 protected:
  void step_param(int64_t i, const torch::Tensor& grad, double weight_decay) override;
  void visit_state(int64_t i, const TensorVisitor& fn) override;

 private:
  struct State {
    int64_t rows = 0, cols = 0;
    torch::Tensor exp_avg, exp_avg_sq;  // fp32, parameter shape
    torch::Tensor fac[2], inv[2];       // L, R and L^(-1/4), R^(-1/4); undefined for an identity side
  };
  OptimConfig config_;
  std::vector<State> state_;
};

}  // namespace ablate::core::optim
