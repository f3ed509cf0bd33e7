// fp64 helpers shared by the optimizer tests. Nothing here calls the implementation under test: the maps
// are built from the formulas in double, and quantization is a brute-force nearest-entry search.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <vector>

namespace ablate::optim_test {

// create_dynamic_map (bitsandbytes / torchao) evaluated in double.
inline std::vector<double> ref_dynamic_map(bool is_signed, int max_exp_bits, int total_bits) {
  std::vector<double> d;
  const int nsb = total_bits - 1;
  for (int i = 0; i < max_exp_bits; ++i) {
    const int items = is_signed ? (1 << (i + nsb - max_exp_bits)) + 1 : (1 << (i + nsb - max_exp_bits + 1)) + 1;
    const double scale = std::pow(10.0, -(max_exp_bits - 1) + i);
    for (int j = 0; j + 1 < items; ++j) {
      const double b0 = 0.1 + 0.9 * j / (items - 1), b1 = 0.1 + 0.9 * (j + 1) / (items - 1);
      d.push_back(scale * (b0 + b1) / 2);
      if (is_signed) d.push_back(-scale * (b0 + b1) / 2);
    }
  }
  d.push_back(0.0);
  d.push_back(1.0);
  std::sort(d.begin(), d.end());
  return d;
}

inline std::vector<double> ref_linear_unsigned4() {
  std::vector<double> d;
  for (int k = 1; k <= 16; ++k) d.push_back(k / 16.0);
  return d;
}

inline std::vector<double> ref_linear_square(int bits) {
  std::vector<double> d;
  const int n = 1 << bits;
  for (int i = 0; i < n; ++i) {
    const double x = -1.0 + 2.0 * i / (n - 1);
    d.push_back(x < 0 ? -x * x : x * x);
  }
  return d;
}

// Largest distance from any point of [lo, 1] to its nearest map entry, lo = -1 (signed) or 0 (unsigned):
// the worst-case error of a value normalized by its block's absmax.
inline double ref_map_max_error(const std::vector<double>& q, bool is_signed) {
  double e = std::max(q.front() - (is_signed ? -1.0 : 0.0), 1.0 - q.back());
  for (size_t k = 0; k + 1 < q.size(); ++k) e = std::max(e, (q[k + 1] - q[k]) / 2);
  return e;
}

struct RefQuant {
  std::vector<int> codes;
  std::vector<double> scale;
  std::vector<double> deq;
};

// Block absmax scaling and brute-force nearest entry (ties to the larger entry, as torchao rounds up).
inline RefQuant ref_quantize(const std::vector<double>& x, int64_t block, const std::vector<double>& q) {
  RefQuant r;
  const int64_t n = static_cast<int64_t>(x.size());
  r.codes.resize(n);
  r.deq.resize(n);
  for (int64_t lo = 0; lo < n; lo += block) {
    const int64_t hi = std::min(n, lo + block);
    double amax = 0;
    for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
    const double s = std::max(amax, 1e-12);
    r.scale.push_back(s);
    for (int64_t i = lo; i < hi; ++i) {
      const double xn = x[i] / s;
      int best = 0;
      for (int k = 1; k < static_cast<int>(q.size()); ++k)
        if (std::fabs(xn - q[k]) <= std::fabs(xn - q[best])) best = k;
      r.codes[i] = best;
      r.deq[i] = q[best] * s;
    }
  }
  return r;
}

inline std::vector<double> to_vec(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().to(torch::kCPU, torch::kDouble).contiguous().view(-1);
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

inline torch::Tensor from_vec(const std::vector<double>& v, torch::IntArrayRef shape) {
  return torch::tensor(v, torch::kDouble).view(shape);
}

// max |a - b| / (atol + rtol |b|) over all elements; <= 1 means "close".
inline double close_ratio(const torch::Tensor& a, const torch::Tensor& b, double atol, double rtol) {
  const torch::Tensor x = a.detach().to(torch::kCPU, torch::kDouble), y = b.detach().to(torch::kCPU, torch::kDouble);
  return ((x - y).abs() / (atol + rtol * y.abs())).max().item<double>();
}

}  // namespace ablate::optim_test
