#include "core/optim/soap.h"

#include <cmath>

namespace ablate::core::optim {
namespace {

const char* kFactorName[2] = {"L", "R"};
const char* kBasisName[2] = {"Q_L", "Q_R"};

// Eigenvectors of a symmetric matrix, columns by descending eigenvalue. fp32 first; fp64 if LAPACK/cuSOLVER
// fails to converge in fp32 (as the reference implementation does).
torch::Tensor eigenvectors_descending(const torch::Tensor& a) {
  torch::Tensor v;
  try {
    v = std::get<1>(torch::linalg_eigh(a));
  } catch (const c10::Error&) {
    v = std::get<1>(torch::linalg_eigh(a.to(torch::kDouble))).to(torch::kFloat);
  }
  return v.flip({1}).contiguous();
}

// G' = Q_Lᵀ X Q_R (identity for an undefined side).
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& ql, const torch::Tensor& qr) {
  torch::Tensor y = ql.defined() ? ql.t().mm(x) : x;
  return qr.defined() ? y.mm(qr) : y;
}

// X = Q_L Y Q_Rᵀ.
torch::Tensor project_back(const torch::Tensor& y, const torch::Tensor& ql, const torch::Tensor& qr) {
  torch::Tensor x = ql.defined() ? ql.mm(y) : y;
  return qr.defined() ? x.mm(qr.t()) : x;
}

torch::Tensor fp32_work(const torch::Tensor& p) {
  return (p.scalar_type() == torch::kFloat && p.is_contiguous()) ? p : p.to(torch::kFloat).contiguous();
}

}  // namespace

SOAP::SOAP(std::vector<ParamGroup> groups, const OptimConfig& config, int precond_bits)
    : Optimizer(std::move(groups), config.lr), config_(config), bits_(precond_bits) {
  TORCH_CHECK(bits_ == 32 || bits_ == 8 || bits_ == 4, "SOAP: expected precond_bits 32, 8 or 4, got ", bits_);
  TORCH_CHECK(config.precondition_frequency >= 1, "SOAP: expected precondition_frequency >= 1, got ",
              config.precondition_frequency);
  TORCH_CHECK(config.precond_block_size > 0 && config.precond_block_size % 2 == 0,
              "SOAP: expected an even positive precond_block_size, got ", config.precond_block_size);
  for (const auto& p : params_) {
    State s;
    const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(p.device());
    s.exp_avg = torch::zeros(p.sizes(), opts);
    s.exp_avg_sq = torch::zeros(p.sizes(), opts);
    if (p.dim() == 2) {
      s.rows = p.size(0);
      s.cols = p.size(1);
      s.left = s.rows <= config.max_precond_dim;
      s.right = s.cols <= config.max_precond_dim;
      for (int side = 0; side < 2; ++side) {
        if (!(side == 0 ? s.left : s.right)) continue;
        const int64_t d = side == 0 ? s.rows : s.cols;
        if (bits_ == 32 || !config.quantize_factors)
          s.fac[side] = torch::zeros({d, d}, opts);
        else
          s.fac_q[side] = QuantizedTensor(d * d, kernels::QuantMap::kDynamicSigned8, config.precond_block_size,
                                          p.device());
        if (bits_ == 32) {
          s.q[side] = torch::eye(d, opts);
        } else {
          s.q_q[side] = QuantizedTensor(d * d,
                                        bits_ == 8 ? kernels::QuantMap::kLinearSquareSigned8
                                                   : kernels::QuantMap::kLinearSquareSigned4,
                                        config.precond_block_size, p.device());
          s.q_q[side].encode(torch::eye(d, opts));
        }
      }
    }
    state_.push_back(std::move(s));
  }
}

std::string SOAP::name() const { return bits_ == 32 ? "soap" : bits_ == 8 ? "soap8bit" : "soap4bit"; }

int64_t SOAP::preconditioner_bytes() const {
  int64_t b = 0;
  for (const auto& s : state_)
    for (int side = 0; side < 2; ++side) {
      if (s.fac[side].defined()) b += s.fac[side].numel() * 4;
      if (s.fac_q[side].defined()) b += s.fac_q[side].bytes();
      if (s.q[side].defined()) b += s.q[side].numel() * 4;
      if (s.q_q[side].defined()) b += s.q_q[side].bytes();
    }
  return b;
}

int64_t SOAP::state_bytes() const {
  int64_t b = preconditioner_bytes();
  for (const auto& s : state_) b += (s.exp_avg.numel() + s.exp_avg_sq.numel()) * 4 + 8;
  return b;
}

torch::Tensor SOAP::factor(const State& s, int side) const {
  if (s.fac[side].defined()) return s.fac[side];
  if (s.fac_q[side].defined()) {
    const int64_t d = side == 0 ? s.rows : s.cols;
    return s.fac_q[side].decode().view({d, d});
  }
  return {};
}

void SOAP::set_factor(State& s, int side, const torch::Tensor& f) {
  if (s.fac[side].defined())
    s.fac[side].copy_(f);
  else
    s.fac_q[side].encode(f);
}

torch::Tensor SOAP::basis(const State& s, int side) const {
  if (s.q[side].defined()) return s.q[side];
  if (!s.q_q[side].defined()) return {};
  const int64_t d = side == 0 ? s.rows : s.cols;
  const torch::Tensor q = s.q_q[side].decode().view({d, d});
  // One Björck step toward the nearest orthogonal matrix: Q + ½ Q (I − QᵀQ) = 1.5 Q − 0.5 Q QᵀQ.
  return q * 1.5 - q.mm(q.t().mm(q)) * 0.5;
}

void SOAP::set_basis(State& s, int side, const torch::Tensor& q) {
  if (s.q[side].defined())
    s.q[side].copy_(q);
  else
    s.q_q[side].encode(q);
}

void SOAP::step_param(int64_t i, const torch::Tensor& grad, double wd) {
  const torch::Tensor& p = params_[i];
  State& s = state_[i];
  const int64_t t = steps_[i];
  const double b1 = config_.beta1, b2 = config_.beta2, sb = config_.shampoo_beta;
  const bool precond = s.left || s.right;
  const torch::Tensor g = precond ? grad.reshape({s.rows, s.cols}) : grad;

  // Kronecker-factor EMA with this step's gradient; returns the fp32 result (stored possibly quantized).
  auto update_factors = [&](torch::Tensor (&fac_new)[2]) {
    if (s.left) {
      fac_new[0] = factor(s, 0) * sb + g.mm(g.t()) * (1.0 - sb);
      set_factor(s, 0, fac_new[0]);
    }
    if (s.right) {
      fac_new[1] = factor(s, 1) * sb + g.t().mm(g) * (1.0 - sb);
      set_factor(s, 1, fac_new[1]);
    }
  };

  if (precond && t == 1) {
    // First step: only the preconditioner is initialized (eigh of the factors). Projecting G onto the
    // eigenbases of G Gᵀ and Gᵀ G would give the diagonal Σ, whose zero entries Adam would turn into ±1
    // noise updates; the reference implementation (nikhilvyas/SOAP) skips the update the same way.
    torch::Tensor fac_new[2];
    update_factors(fac_new);
    for (int side = 0; side < 2; ++side)
      if (fac_new[side].defined()) set_basis(s, side, eigenvectors_descending(fac_new[side]));
    return;
  }
  // Adam steps taken so far, this one included (preconditioned parameters skip the first step).
  const int64_t n_adam = precond ? t - 1 : t;

  // (3) Adam in the current eigenbasis.
  torch::Tensor q[2] = {basis(s, 0), basis(s, 1)};
  const torch::Tensor gp = precond ? project(g, q[0], q[1]) : g;
  s.exp_avg.mul_(b1).add_(gp, 1.0 - b1);
  s.exp_avg_sq.mul_(b2).addcmul_(gp, gp, 1.0 - b2);
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(n_adam));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(n_adam));
  const torch::Tensor n_rot = (s.exp_avg / bc1) / ((s.exp_avg_sq / bc2).sqrt_().add_(config_.eps));
  // (4) Back to parameter space; (5) decoupled decay and update.
  const torch::Tensor n = precond ? project_back(n_rot, q[0], q[1]).view(p.sizes()) : n_rot;
  torch::Tensor w = fp32_work(p);
  w.mul_(1.0 - lr_ * wd).add_(n, -lr_);
  write_param(p, w);
  if (!precond) return;

  // (1) Factor EMA, then (2) every f Adam steps a basis refresh used from the next step on.
  torch::Tensor fac_new[2];
  update_factors(fac_new);
  if (n_adam % config_.precondition_frequency != 0) return;
  const torch::Tensor momentum = project_back(s.exp_avg, q[0], q[1]);  // old basis
  torch::Tensor v = s.exp_avg_sq;
  for (int side = 0; side < 2; ++side) {
    if (!fac_new[side].defined()) continue;
    const torch::Tensor& f = fac_new[side];
    const torch::Tensor est = (q[side] * f.mm(q[side])).sum(0);  // diag(Qᵀ F Q)
    const torch::Tensor order = torch::argsort(est, /*stable=*/true, /*dim=*/0, /*descending=*/true);
    v = v.index_select(side, order);
    set_basis(s, side, std::get<0>(torch::linalg_qr(f.mm(q[side].index_select(1, order)))));
    q[side] = basis(s, side);
  }
  s.exp_avg_sq.copy_(v);
  s.exp_avg.copy_(project(momentum, q[0], q[1]));  // new basis
}

void SOAP::visit_state(int64_t i, const TensorVisitor& fn) {
  State& s = state_[i];
  fn("exp_avg", s.exp_avg);
  fn("exp_avg_sq", s.exp_avg_sq);
  for (int side = 0; side < 2; ++side) {
    const std::string fk = kFactorName[side], qk = kBasisName[side];
    if (s.fac[side].defined()) fn(fk, s.fac[side]);
    if (s.fac_q[side].defined()) {
      fn(fk + ".codes", s.fac_q[side].codes());
      fn(fk + ".scale", s.fac_q[side].scale());
    }
    if (s.q[side].defined()) fn(qk, s.q[side]);
    if (s.q_q[side].defined()) {
      fn(qk + ".codes", s.q_q[side].codes());
      fn(qk + ".scale", s.q_q[side].scale());
    }
  }
}

}  // namespace ablate::core::optim
