// C++ reference of the chunk state scan (see chunk_state_scan.h): the recurrence as written, one (bh) at a time.
#include "kernels/chunk_state_scan.h"

#include <algorithm>
#include <vector>

namespace ablate::kernels {

void chunk_state_scan_ref(const ChunkScanArgs& a) {
  const int64_t C = a.chunks, L = a.chunk_len, K = a.dk, V = a.dv;
  std::vector<float> z(static_cast<size_t>(K * V)), x(static_cast<size_t>(L * V));
  for (int64_t b = 0; b < a.bh; ++b) {
    std::copy(a.z0 + b * K * V, a.z0 + (b + 1) * K * V, z.begin());
    for (int64_t step = 0; step < C; ++step) {
      const int64_t c = a.reverse ? C - 1 - step : step;
      const int64_t bc = b * C + c;
      const float* m1 = a.m1 + bc * L * K;
      const float* m2 = a.m2 + bc * L * K;
      std::copy(z.begin(), z.end(), a.zout + bc * K * V);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t v = 0; v < V; ++v) {
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += m1[l * K + k] * z[k * V + v];
          x[l * V + v] = a.p1[bc * L * V + l * V + v] + a.s1 * acc;
        }
      std::copy(x.begin(), x.end(), a.x + bc * L * V);
      const float d = a.decay[bc];
      for (int64_t k = 0; k < K; ++k)
        for (int64_t v = 0; v < V; ++v) {
          float acc = 0.f;
          for (int64_t l = 0; l < L; ++l) acc += m2[l * K + k] * x[l * V + v];
          const float p2 = a.p2 ? a.p2[bc * K * V + k * V + v] : 0.f;
          z[k * V + v] = d * z[k * V + v] + a.s2 * acc + p2;
        }
    }
    std::copy(z.begin(), z.end(), a.zfinal + b * K * V);
  }
}

}  // namespace ablate::kernels
