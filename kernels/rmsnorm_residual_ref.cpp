#include "kernels/rmsnorm_residual.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace ablate::kernels {

int64_t rmsnorm_residual_bwd_workspace_floats(int64_t rows, int64_t cols) {
  return std::min(rows, kRMSNormResidualBwdMaxBlocks) * cols;
}

void rmsnorm_residual_forward_ref(const RMSNormResidualFwdArgs& a) {
  const auto* X = static_cast<const float*>(a.x);
  const auto* R = static_cast<const float*>(a.residual);
  const auto* W = static_cast<const float*>(a.w);
  auto* H = static_cast<float*>(a.h);
  auto* Y = static_cast<float*>(a.y);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = X + r * a.cols;
    const float* res = R + r * a.cols;
    float* h = H + r * a.cols;
    float* y = Y + r * a.cols;
    double ss = 0.0;
    for (int64_t c = 0; c < a.cols; ++c) {
      h[c] = x[c] + res[c];
      ss += double(h[c]) * double(h[c]);
    }
    const float rstd = float(1.0 / std::sqrt(ss / double(a.cols) + double(a.eps)));
    if (a.rstd) a.rstd[r] = rstd;
    for (int64_t c = 0; c < a.cols; ++c) y[c] = W[c] * (h[c] * rstd);
  }
}

void rmsnorm_residual_backward_ref(const RMSNormResidualBwdArgs& a) {
  const auto* DY = static_cast<const float*>(a.dy);
  const auto* DH = static_cast<const float*>(a.dh);
  const auto* H = static_cast<const float*>(a.h);
  const auto* W = static_cast<const float*>(a.w);
  auto* DX = static_cast<float*>(a.dx);
  std::vector<double> dw(static_cast<size_t>(a.cols), 0.0);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* dy = DY + r * a.cols;
    const float* h = H + r * a.cols;
    float* dx = DX + r * a.cols;
    const double rstd = a.rstd[r];
    double dot = 0.0;
    for (int64_t c = 0; c < a.cols; ++c) {
      const double n = double(h[c]) * rstd;
      dot += double(dy[c]) * W[c] * n;
      dw[c] += double(dy[c]) * n;
    }
    const double m = dot / double(a.cols);
    for (int64_t c = 0; c < a.cols; ++c) {
      const double n = double(h[c]) * rstd;
      const double dn = rstd * (double(dy[c]) * W[c] - n * m);
      dx[c] = float(dn + (DH ? double(DH[r * a.cols + c]) : 0.0));
    }
  }
  if (a.dw)
    for (int64_t c = 0; c < a.cols; ++c) a.dw[c] = float(dw[c]);
}

}  // namespace ablate::kernels
