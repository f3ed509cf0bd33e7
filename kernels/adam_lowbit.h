// Fused AdamW step with block-wise quantized moments (8-bit: Dettmers et al. 2022, torchao AdamW8bit;
// 4-bit: Li et al. 2023, torchao AdamW4bit). Per element i of block b, all arithmetic in fp32:
//   m, v   = qmap_m[cm_i] * sm_b, qmap_v[cv_i] * sv_b                 (dequantize, kernels/quant.h)
//   p      = p - (lr * wd) * p                                          (decoupled weight decay)
//   m      = m + (1 - beta1) * (g - m);   v = v + (1 - beta2) * (g*g - v)   (torch.lerp, weight < 0.5)
//   p      = p - lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)          (Adam with bias correction)
//   sm_b   = max(max_b |m|, 1e-12), cm_i = nearest(m / sm_b); same for v    (re-quantize the new moments)
// The update uses the unquantized new moments (torchao's "high precision copy"). n must be a multiple of
// block; codes are packed as in kernels/quant.h.
#pragma once
#include <cstdint>

#include "kernels/quant.h"

namespace ablate::kernels {

struct AdamLowbitArgs {
  float* p = nullptr;        // [n] fp32 parameter, updated in place
  const float* g = nullptr;  // [n] fp32 gradient
  uint8_t* m_codes = nullptr;
  float* m_scale = nullptr;  // [n / block]
  uint8_t* v_codes = nullptr;
  float* v_scale = nullptr;
  const float* m_qmap = nullptr;  // signed map, 2^bits entries
  const float* v_qmap = nullptr;  // unsigned map
  int64_t n = 0;
  int64_t block = 256;
  int bits = 8;
  float lr = 0.f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
  float bias_correction1 = 1.f;  // 1 - beta1^t
  float bias_correction2 = 1.f;  // 1 - beta2^t
};

void adam_lowbit_step_ref(const AdamLowbitArgs& a);

#if ABLATE_WITH_CUDA
// One thread block per quantization block; block must be a multiple of 32 and at most 1024.
cudaError_t adam_lowbit_step_cuda(const AdamLowbitArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
