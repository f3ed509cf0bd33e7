// CPU reference of the NSA selected branch (kernels/nsa_select.h): the contract written as plain loops, fp32 in,
// double accumulation. Query-centric for everything (dk/dv are scattered per query), so it needs no inverse index.
#include "kernels/nsa_select.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace ablate::kernels {
namespace {

struct Dims {
  int64_t B, T, H, KV, hd, n, lp, G;
};

Dims dims_of(const NsaSelectShape& s) {
  return {s.B, s.T, s.H, s.KV, s.head_dim, s.num_selected, s.block, s.H / s.KV};
}

// The allowed key positions of (b, t, c), in slot order.
void allowed_keys(const Dims& d, const int64_t* idx, int64_t b, int64_t t, int64_t c, std::vector<int64_t>& keys) {
  keys.clear();
  const int64_t* row = idx + ((b * d.T + t) * d.KV + c) * d.n;
  for (int64_t i = 0; i < d.n; ++i) {
    const int64_t j = row[i];
    if (j < 0) continue;
    for (int64_t u = 0; u < d.lp; ++u) {
      const int64_t s = j * d.lp + u;
      if (s > t) break;
      keys.push_back(s);
    }
  }
}

// The tensor-core switch of the CUDA launchers (kernels/nsa_select.h): ABLATE_NSA_TC=0 turns it off by default.
std::atomic<bool>& tc_switch() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("ABLATE_NSA_TC");
    return !(e != nullptr && std::strcmp(e, "0") == 0);
  }()};
  return on;
}

std::atomic<int64_t> g_tc_launches{0};

}  // namespace

void nsa_select_set_tensor_cores(bool enabled) { tc_switch().store(enabled); }
bool nsa_select_tensor_cores() { return tc_switch().load(); }
int64_t nsa_select_tc_launches() { return g_tc_launches.load(); }
void nsa_select_note_tc_launch() { g_tc_launches.fetch_add(1); }

bool nsa_select_forward_ref(const NsaSelectFwdArgs& a) {
  if (a.s.dtype != NsaDtype::kF32) return false;
  const Dims d = dims_of(a.s);
  const auto* q = static_cast<const float*>(a.q);
  const auto* k = static_cast<const float*>(a.k);
  const auto* v = static_cast<const float*>(a.v);
  auto* o = static_cast<float*>(a.o);
  std::vector<int64_t> keys;
  std::vector<double> sc, acc(static_cast<size_t>(d.hd));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t c = 0; c < d.KV; ++c) {
        allowed_keys(d, a.block_idx, b, t, c, keys);
        for (int64_t g = 0; g < d.G; ++g) {
          const int64_t h = c * d.G + g;
          const float* qr = q + ((b * d.T + t) * d.H + h) * d.hd;
          float* orow = o + ((b * d.T + t) * d.H + h) * d.hd;
          float& lse = a.lse[(b * d.T + t) * d.H + h];
          if (keys.empty()) {
            for (int64_t e = 0; e < d.hd; ++e) orow[e] = 0.f;
            lse = -std::numeric_limits<float>::infinity();
            continue;
          }
          sc.assign(keys.size(), 0.0);
          double m = -std::numeric_limits<double>::infinity();
          for (size_t i = 0; i < keys.size(); ++i) {
            const float* kr = k + ((b * d.T + keys[i]) * d.KV + c) * d.hd;
            double s = 0;
            for (int64_t e = 0; e < d.hd; ++e) s += double(qr[e]) * kr[e];
            sc[i] = s * a.s.scale;
            m = std::max(m, sc[i]);
          }
          double l = 0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (size_t i = 0; i < keys.size(); ++i) {
            const double p = std::exp(sc[i] - m);
            l += p;
            const float* vr = v + ((b * d.T + keys[i]) * d.KV + c) * d.hd;
            for (int64_t e = 0; e < d.hd; ++e) acc[e] += p * vr[e];
          }
          for (int64_t e = 0; e < d.hd; ++e) orow[e] = static_cast<float>(acc[e] / l);
          lse = static_cast<float>(m + std::log(l));
        }
      }
  return true;
}

bool nsa_select_backward_ref(const NsaSelectBwdArgs& a) {
  if (a.s.dtype != NsaDtype::kF32) return false;
  const Dims d = dims_of(a.s);
  const auto* q = static_cast<const float*>(a.q);
  const auto* k = static_cast<const float*>(a.k);
  const auto* v = static_cast<const float*>(a.v);
  const auto* dout = static_cast<const float*>(a.dout);
  auto* dq = static_cast<float*>(a.dq);
  std::vector<int64_t> keys;
  std::vector<double> dqa(static_cast<size_t>(d.hd));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t t = 0; t < d.T; ++t)
      for (int64_t c = 0; c < d.KV; ++c) {
        allowed_keys(d, a.block_idx, b, t, c, keys);
        for (int64_t g = 0; g < d.G; ++g) {
          const int64_t h = c * d.G + g, row = (b * d.T + t) * d.H + h;
          const float* qr = q + row * d.hd;
          const float* dor = dout + row * d.hd;
          std::fill(dqa.begin(), dqa.end(), 0.0);
          const double lse = a.lse[row], delta = a.delta[row];
          for (const int64_t s : keys) {
            const int64_t kv_row = ((b * d.T + s) * d.KV + c) * d.hd;
            const float* kr = k + kv_row;
            const float* vr = v + kv_row;
            double sc = 0, dp = 0;
            for (int64_t e = 0; e < d.hd; ++e) {
              sc += double(qr[e]) * kr[e];
              dp += double(dor[e]) * vr[e];
            }
            const double p = std::exp(sc * a.s.scale - lse);
            const double ds = p * (dp - delta);
            for (int64_t e = 0; e < d.hd; ++e) {
              dqa[e] += ds * kr[e];
              a.dk[kv_row + e] += static_cast<float>(a.s.scale * ds * qr[e]);
              a.dv[kv_row + e] += static_cast<float>(p * dor[e]);
            }
          }
          for (int64_t e = 0; e < d.hd; ++e) dq[row * d.hd + e] = static_cast<float>(a.s.scale * dqa[e]);
        }
      }
  return true;
}

}  // namespace ablate::kernels
