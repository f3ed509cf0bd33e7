// AdamW (Loshchilov & Hutter 2019) with fp32 moments, and AdamW with block-wise 8-bit / 4-bit moments
// (Dettmers et al. 2022; Li et al. 2023), numerically following torchao's AdamW8bit / AdamW4bit.
#pragma once

#include "core/optim/optimizer.h"
#include "core/optim/quant_state.h"

namespace ablate::core::optim {

// Per parameter, t = its step count, all in fp32 (moments are fp32 whatever the parameter dtype):
//   p ← p·(1 − lr·wd);  m ← lerp(m, g, 1−β1);  v ← β2·v + (1−β2)·g²
//   p ← p − (lr/(1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + eps)
// On CUDA with fp32 parameters the math is delegated to torch's _fused_adamw_ (same equations).
// State: 8 bytes per parameter element + 8 bytes (step counter) per tensor.
class AdamW : public Optimizer {
 public:
  AdamW(std::vector<ParamGroup> groups, const OptimConfig& config);
  int64_t state_bytes() const override;
  std::string name() const override { return "adamw"; }
  const torch::Tensor& exp_avg(int64_t i) const { return state_.at(i).exp_avg; }
  const torch::Tensor& exp_avg_sq(int64_t i) const { return state_.at(i).exp_avg_sq; }

 protected:
  void step_param(int64_t i, const torch::Tensor& grad, double weight_decay) override;
  // On CUDA, fp32 parameters go through LibTorch's multi-tensor fused AdamW kernel, one launch per (weight
  // decay, step) group; everything else through step_param.
  void step_params(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads) override;
  void visit_state(int64_t i, const TensorVisitor& fn) override;

 private:
  struct State {
    torch::Tensor exp_avg, exp_avg_sq;
  };
  OptimConfig config_;
  std::vector<State> state_;
};

// AdamW with quantized moments (torchao AdamW8bit / AdamW4bit semantics):
//   bits 8: block 256, m with the signed dynamic-tree map, v with the unsigned dynamic-tree map
//           (kernels::QuantMap::kDynamicSigned8 / kDynamicUnsigned8), 1 byte per code.
//   bits 4: block 128, m with the signed dynamic-exponent map (3 exponent bits), v with the linear map
//           k/16, k = 1..16 (zero excluded), two codes per byte.
// Each block has one fp32 absmax scale; encoding picks the nearest map entry. A tensor is quantized only
// when numel >= min_quant_numel (4096) and numel % block == 0, else its moments stay fp32.
// Per step (kernels/adam_lowbit.h): dequantize, p ← p − lr·wd·p, m ← lerp(m, g, 1−β1),
// v ← lerp(v, g², 1−β2), p ← p − lr·(m/bc1)/(sqrt(v)/sqrt(bc2) + eps), re-quantize m and v.
// CPU parameters use the C++ reference kernel, CUDA parameters the fused CUDA kernel.
class AdamWLowBit : public Optimizer {
 public:
  AdamWLowBit(std::vector<ParamGroup> groups, const OptimConfig& config, int bits);
  int64_t state_bytes() const override;
  std::string name() const override { return bits_ == 8 ? "adamw8bit" : "adamw4bit"; }
  int bits() const { return bits_; }
  int64_t block_size() const { return block_; }
  bool is_quantized(int64_t i) const { return state_.at(i).m_q.defined(); }
  // fp32 views of the moments (dequantized when quantized), shaped like the parameter.
  torch::Tensor exp_avg(int64_t i) const;
  torch::Tensor exp_avg_sq(int64_t i) const;
  const QuantizedTensor& exp_avg_quantized(int64_t i) const { return state_.at(i).m_q; }
  const QuantizedTensor& exp_avg_sq_quantized(int64_t i) const { return state_.at(i).v_q; }

 protected:
  void step_param(int64_t i, const torch::Tensor& grad, double weight_decay) override;
  void visit_state(int64_t i, const TensorVisitor& fn) override;

 private:
  struct State {
    QuantizedTensor m_q, v_q;           // quantized tensors
    torch::Tensor exp_avg, exp_avg_sq;  // small tensors, fp32
  };
  OptimConfig config_;
  int bits_;
  int64_t block_;
  std::vector<State> state_;
};

}  // namespace ablate::core::optim
