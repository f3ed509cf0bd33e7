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
// CPU parameters use the C++ reference kernel, CUDA parameters the fused CUDA kernel. On CUDA, the quantized
// fp32 parameters of one step are grouped by (device, weight decay, step count) and each group is updated by
// one multi-tensor launch (kernels/adam_lowbit.h, adam_lowbit_multi_step_cuda); results are bit-identical to
// the per-tensor kernel. set_multi_tensor(false), or ABLATE_LOWBIT_MULTI_TENSOR=0 in the environment when the
// optimizer is built, keeps the per-tensor path (one launch per parameter) for A/B timing.
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
  // Multi-tensor CUDA launches (default) or one launch per parameter (the previous path, for A/B timing).
  void set_multi_tensor(bool on) { multi_tensor_ = on; }
  bool multi_tensor() const { return multi_tensor_; }

 protected:
  void step_param(int64_t i, const torch::Tensor& grad, double weight_decay) override;
  // With multi_tensor(): quantized CUDA fp32 parameters in one multi-tensor launch per (device, weight decay,
  // step) group when the block size is one the kernel takes (128, 256, 512); unquantized fp32 parameters with
  // torch _foreach ops per group; the rest via step_param. Without: step_param for each.
  void step_params(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads) override;
  void visit_state(int64_t i, const TensorVisitor& fn) override;

 private:
  // The unquantized fp32 parameters idx[k], k in ks, of one (device, weight decay, step) group, with _foreach ops.
  void step_unquantized(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads,
                        const std::vector<size_t>& ks, double wd, int64_t step);
  struct State {
    QuantizedTensor m_q, v_q;           // quantized tensors
    torch::Tensor exp_avg, exp_avg_sq;  // small tensors, fp32
  };
  OptimConfig config_;
  int bits_;
  int64_t block_;
  bool multi_tensor_ = true;
  std::vector<State> state_;
  // Per CUDA device, built on first use from the m and v maps: the multi-tensor kernel's re-quantization tables
  // (kernels::adam_lowbit_code_lut for 8-bit when both maps fit, else adam_lowbit_code_thresholds). Derived
  // constants, not state.
  struct CodeTables {
    int device = -1;
    torch::Tensor thresh;  // fp32 [2, 2^bits]: m, v
    torch::Tensor lut;     // uint8 [2, 2 * 32 * 128] or undefined
    int m_elo = 0, m_rows = 0, v_elo = 0, v_rows = 0;
  };
  std::vector<CodeTables> code_tables_;
};

}  // namespace ablate::core::optim
