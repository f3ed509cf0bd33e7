// CPU reference for block-wise state quantization and the construction of the quantization maps.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/quant.h"

namespace ablate::kernels {
namespace {

// torch.linspace(start, end, steps) for fp32 on CPU: step in fp32; the first half counts up from start,
// the second half counts down from end (aten RangeFactoriesKernel.cpp). ATen evaluates start + step * i
// with a fused multiply-add (its vectorized path; verified bit-exact against torch 2.11 for 9..1000 steps).
std::vector<float> linspace_f32(float start, float end, int64_t steps) {
  std::vector<float> out(static_cast<size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int64_t halfway = steps / 2;
  for (int64_t i = 0; i < steps; ++i)
    out[i] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                         : std::fma(-step, static_cast<float>(steps - i - 1), end);
  return out;
}

// torchao quant_utils.create_dynamic_map (bitsandbytes' dynamic tree map without the zero padding).
// For exponent e = 0..E-1, a fraction grid of means of linspace(0.1, 1, k) scaled by 10^(e-(E-1)):
// k = 2^(e + nsb - E) + 1 (signed, mirrored to negatives) or 2^(e + nsb - E + 1) + 1 (unsigned), with
// nsb = total_bits - 1 non-sign bits. Then 0 and 1 are appended and the list is sorted.
int dynamic_map(bool is_signed, int max_exponent_bits, int total_bits, float* out) {
  std::vector<float> data;
  const int non_sign_bits = total_bits - 1;  // torchao: `total_bits - (1 if signed else 1)`
  const int additional_items = (1 << (non_sign_bits - max_exponent_bits)) - 1;
  auto add_decade = [&](int i, int64_t fraction_items) {
    const std::vector<float> b = linspace_f32(0.1f, 1.0f, fraction_items);
    const float mult = static_cast<float>(std::pow(10.0, static_cast<double>(-(max_exponent_bits - 1) + i)));
    std::vector<float> means;
    for (size_t j = 0; j + 1 < b.size(); ++j) means.push_back((b[j] + b[j + 1]) / 2.0f);
    for (float m : means) data.push_back(mult * m);
    if (is_signed)
      for (float m : means) data.push_back(-mult * m);
  };
  int i = 0;
  for (i = 0; i < max_exponent_bits; ++i) {
    const int64_t items = is_signed ? (int64_t{1} << (i + non_sign_bits - max_exponent_bits)) + 1
                                    : (int64_t{1} << (i + non_sign_bits - max_exponent_bits + 1)) + 1;
    add_decade(i, items);
  }
  if (additional_items > 0) add_decade(i - 1, additional_items + 1);  // python reuses the loop's last i
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::copy(data.begin(), data.end(), out);
  return static_cast<int>(data.size());
}

int linear_square_signed_map(int bits, float* out) {
  const int n = 1 << bits;
  for (int i = 0; i < n; ++i) {
    const double x = -1.0 + 2.0 * i / static_cast<double>(n - 1);
    out[i] = static_cast<float>(x < 0 ? -x * x : x * x);
  }
  return n;
}

}  // namespace

int quant_map_build(QuantMap map, float* out) {
  switch (map) {
    case QuantMap::kDynamicSigned8:
      return dynamic_map(true, 7, 8, out);
    case QuantMap::kDynamicUnsigned8:
      return dynamic_map(false, 7, 8, out);
    case QuantMap::kDynamicSigned4:
      return dynamic_map(true, 3, 4, out);
    case QuantMap::kLinearUnsigned4: {
      const std::vector<float> l = linspace_f32(0.0f, 1.0f, 17);
      std::copy(l.begin() + 1, l.end(), out);
      return 16;
    }
    case QuantMap::kLinearSquareSigned4:
      return linear_square_signed_map(4, out);
    case QuantMap::kLinearSquareSigned8:
      return linear_square_signed_map(8, out);
  }
  return 0;
}

void quant_encode_ref(const QuantEncodeArgs& a) {
  const int64_t nblocks = (a.n + a.block - 1) / a.block;
  if (a.bits == 4)
    for (int64_t i = 0; i < (a.n + 1) / 2; ++i) a.codes[i] = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t lo = b * a.block, hi = std::min(a.n, lo + a.block);
    float amax = 0.f;
    for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(a.x[i]));
    const float s = std::max(amax, 1e-12f);
    a.scale[b] = s;
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t c = quant_nearest_code(a.x[i] / s, a.qmap, a.bits);
      if (a.bits == 8)
        a.codes[i] = static_cast<uint8_t>(c);
      else
        a.codes[i >> 1] = static_cast<uint8_t>(a.codes[i >> 1] | ((i & 1) ? c : (c << 4)));
    }
  }
}

void quant_decode_ref(const QuantDecodeArgs& a) {
  for (int64_t i = 0; i < a.n; ++i) a.y[i] = a.qmap[quant_code_at(a.codes, i, a.bits)] * a.scale[i / a.block];
}

}  // namespace ablate::kernels
