#include "kernels/rmsnorm.h"

#include <cmath>
#include <vector>

namespace ablate::kernels {

void rmsnorm_forward_ref(const RMSNormFwdArgs& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = a.x + r * a.cols;
    float* y = a.y + r * a.cols;
    double ss = 0.0;
    for (int64_t c = 0; c < a.cols; ++c) ss += double(x[c]) * double(x[c]);
    const float rstd = float(1.0 / std::sqrt(ss / double(a.cols) + double(a.eps)));
    if (a.rstd) a.rstd[r] = rstd;
    for (int64_t c = 0; c < a.cols; ++c) y[c] = a.w[c] * (x[c] * rstd);
  }
}

// With xhat = x * rstd:  dx = rstd * (g - xhat * mean(g * xhat)),  g = dy * w;   dw = sum_rows(dy * xhat)
void rmsnorm_backward_ref(const RMSNormBwdArgs& a) {
  std::vector<double> dw(static_cast<size_t>(a.cols), 0.0);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = a.x + r * a.cols;
    const float* dy = a.dy + r * a.cols;
    float* dx = a.dx + r * a.cols;
    const float rstd = a.rstd[r];
    double dot = 0.0;
    for (int64_t c = 0; c < a.cols; ++c) {
      const double xhat = double(x[c]) * rstd;
      dot += double(dy[c]) * a.w[c] * xhat;
      dw[c] += double(dy[c]) * xhat;
    }
    const double m = dot / double(a.cols);
    for (int64_t c = 0; c < a.cols; ++c) {
      const double xhat = double(x[c]) * rstd;
      dx[c] = float(rstd * (double(dy[c]) * a.w[c] - xhat * m));
    }
  }
  if (a.dw)
    for (int64_t c = 0; c < a.cols; ++c) a.dw[c] = float(dw[c]);
}

}  // namespace ablate::kernels
