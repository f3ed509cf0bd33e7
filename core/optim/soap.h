#pragma once
// SOAP: Shampoo with Adam in the preconditioner's eigenbasis (Vyas et al. 2024, arXiv 2409.11321), with
// optional low-bit storage of the preconditioner (eigenbases as in 4-bit Shampoo, Wang et al. 2024,
// arXiv 2405.18144).
//
// For a 2-D parameter W (m×n) with gradient G, all in fp32 (the order of the reference soap.py):
//   step 1:  L ← (1−β_s)·G Gᵀ, R ← (1−β_s)·Gᵀ G; Q_L, Q_R ← eigenvectors (torch::linalg_eigh), by
//            descending eigenvalue. No parameter update: the eigenbases of this very gradient would make
//            G' = Σ diagonal and Adam would turn its zero entries into ±1 noise.
//   step t ≥ 2, with s = t − 1 Adam steps:
//     1. G' = Q_Lᵀ G Q_R;  m ← β1·m + (1−β1)·G';  v ← β2·v + (1−β2)·G'⊙G'             (Adam in the eigenbasis)
//     2. N = Q_L · [ (m/(1−β1^s)) / (sqrt(v/(1−β2^s)) + eps) ] · Q_Rᵀ
//     3. W ← W·(1 − lr·wd) − lr·N                                                    (decoupled weight decay)
//     4. L ← β_s·L + (1−β_s)·G Gᵀ,  R ← β_s·R + (1−β_s)·Gᵀ G                          (β_s = shampoo_beta)
//     5. if s % f = 0, refresh by one power iteration (paper Alg. 4; used from the next step on):
//        M = Q_L m Q_Rᵀ (momentum back to parameter space with the OLD basis);
//        order the columns of Q_L by the estimated eigenvalues diag(Q_Lᵀ L Q_L), descending, and permute
//        the rows of v the same way (v is kept, not rotated, per the paper); Q_L ← qr(L·Q_L).Q; same for R
//        with the columns of v; then m = Q_Lᵀ M Q_R (momentum forward with the NEW basis).
// A side longer than max_precond_dim is not preconditioned (identity: no factor, no basis); if both are,
// the parameter gets plain AdamW from step 1. Parameters with dim() != 2 likewise (equations 1-3 with Q = I).
//
// precond_bits = 32: L, R, Q_L, Q_R in fp32.
// precond_bits = 8 / 4: Q_L, Q_R are stored block-wise (precond_block_size, default 64) with the signed
//   linear-square map of 4-bit Shampoo (kLinearSquareSigned8 / 4; 4-bit packed two per byte) and an fp32
//   absmax per block. Every use dequantizes and applies one Björck orthonormalization step,
//   Q ← Q + ½·Q(I − QᵀQ), which removes the first-order loss of orthogonality; that rectified Q is the
//   basis used in 1, 2 and 5 (consistently for the old basis at a refresh). With quantize_factors (default) L and
//   R are stored with the signed 8-bit dynamic-tree map (blocks of precond_block_size): each step
//   dequantizes, applies the EMA in fp32, and re-quantizes; the refresh uses the fp32 EMA result of that
//   step. m and v stay fp32.

#include "core/optim/optimizer.h"
#include "core/optim/quant_state.h"

namespace ablate::core::optim {

class SOAP : public Optimizer {
 public:
  SOAP(std::vector<ParamGroup> groups, const OptimConfig& config, int precond_bits = 32);
  int64_t state_bytes() const override;
  std::string name() const override;
  // Bytes of L, R, Q_L, Q_R as stored (codes + scales for the low-bit variants).
  int64_t preconditioner_bytes() const;
  int precond_bits() const { return bits_; }

  // Inspection in fp32 (the stored tensor itself for fp32 state, else a decoded copy); undefined when that
  // side is not preconditioned.
  bool preconditions_left(int64_t i) const { return state_.at(i).left; }
  bool preconditions_right(int64_t i) const { return state_.at(i).right; }
  torch::Tensor left_factor(int64_t i) const { return factor(state_.at(i), 0); }
  torch::Tensor right_factor(int64_t i) const { return factor(state_.at(i), 1); }
  torch::Tensor left_basis(int64_t i) const { return basis(state_.at(i), 0); }    // as used (rectified)
  torch::Tensor right_basis(int64_t i) const { return basis(state_.at(i), 1); }
  const torch::Tensor& exp_avg(int64_t i) const { return state_.at(i).exp_avg; }      // eigenbasis coordinates
  const torch::Tensor& exp_avg_sq(int64_t i) const { return state_.at(i).exp_avg_sq; }

 protected:
  void step_param(int64_t i, const torch::Tensor& grad, double weight_decay) override;
  void visit_state(int64_t i, const TensorVisitor& fn) override;

 private:
  struct State {
    bool left = false, right = false;
    int64_t rows = 0, cols = 0;
    torch::Tensor exp_avg, exp_avg_sq;  // fp32, [rows, cols] for 2-D, else the parameter's shape
    torch::Tensor fac[2], q[2];         // fp32 storage: L, R and Q_L, Q_R
    QuantizedTensor fac_q[2], q_q[2];   // low-bit storage
  };
  torch::Tensor factor(const State& s, int side) const;
  void set_factor(State& s, int side, const torch::Tensor& f);
  torch::Tensor basis(const State& s, int side) const;
  void set_basis(State& s, int side, const torch::Tensor& q);

  OptimConfig config_;
  int bits_;
  std::vector<State> state_;
};

}  // namespace ablate::core::optim
