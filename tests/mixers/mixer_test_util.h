// Small helpers shared by the mixer tests: relative errors, autograd gradients, and a finite-difference
// gradcheck (LibTorch C++ has no torch.autograd.gradcheck).
#pragma once
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ablate::core::testing {

// ||a - b|| / ||b|| in fp64 (0 when both are zero).
inline double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  const auto ad = a.detach().to(torch::kFloat64), bd = b.detach().to(torch::kFloat64);
  const double den = bd.norm().item<double>();
  const double num = (ad - bd).norm().item<double>();
  return den == 0.0 ? num : num / den;
}

inline double max_abs(const torch::Tensor& a) { return a.detach().abs().max().item<double>(); }

// Fresh leaf copies (requires_grad) of the defined tensors; undefined ones stay undefined.
inline std::vector<torch::Tensor> leaves(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(t.defined() ? t.detach().clone().requires_grad_(true) : torch::Tensor());
  return out;
}

using ScalarFn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

// Gradients of the scalar f(inputs) with respect to every defined input (undefined slots stay undefined).
inline std::vector<torch::Tensor> grads_of(const ScalarFn& f, const std::vector<torch::Tensor>& inputs) {
  auto xs = leaves(inputs);
  std::vector<torch::Tensor> defined;
  for (const auto& x : xs)
    if (x.defined()) defined.push_back(x);
  const auto g = torch::autograd::grad({f(xs)}, defined, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
  std::vector<torch::Tensor> out;
  size_t j = 0;
  for (const auto& x : xs) {
    if (!x.defined()) {
      out.emplace_back();
      continue;
    }
    out.push_back(g[j].defined() ? g[j] : torch::zeros_like(x));
    ++j;
  }
  return out;
}

struct GradcheckReport {
  bool ok = true;
  double max_abs_err = 0.0;
  std::string first_failure;
};

// Compares autograd gradients of f with central differences, element by element, in fp64 (torch's gradcheck
// criterion |analytic - numeric| <= atol + rtol * |numeric|). Inputs are converted to fp64.
inline GradcheckReport gradcheck(const ScalarFn& f, const std::vector<torch::Tensor>& inputs, double eps = 1e-6,
                                 double atol = 1e-6, double rtol = 1e-4) {
  std::vector<torch::Tensor> xs;
  for (const auto& t : inputs) xs.push_back(t.defined() ? t.detach().to(torch::kFloat64).contiguous() : t);
  const auto analytic = grads_of(f, xs);
  GradcheckReport rep;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (!xs[i].defined()) continue;
    auto pert = xs;
    pert[i] = xs[i].clone();
    double* p = pert[i].data_ptr<double>();
    const auto an = analytic[i].contiguous();
    const double* a = an.data_ptr<double>();
    for (int64_t j = 0; j < pert[i].numel(); ++j) {
      const double orig = p[j];
      p[j] = orig + eps;
      const double fp = f(pert).item<double>();
      p[j] = orig - eps;
      const double fm = f(pert).item<double>();
      p[j] = orig;
      const double num = (fp - fm) / (2 * eps);
      const double err = std::abs(a[j] - num);
      rep.max_abs_err = std::max(rep.max_abs_err, err);
      if (err > atol + rtol * std::abs(num) && rep.ok) {
        rep.ok = false;
        std::ostringstream os;
        os << "input " << i << " element " << j << ": analytic " << a[j] << " vs numeric " << num;
        rep.first_failure = os.str();
      }
    }
  }
  return rep;
}

// sum(y * w) for a fixed random w of y's shape: a scalar whose gradient reaches every output element differently.
inline torch::Tensor weighted_sum(const torch::Tensor& y, const torch::Tensor& w) {
  return (y * w.to(y.dtype())).sum();
}

}  // namespace ablate::core::testing
