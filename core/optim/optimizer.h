// Optimizer interface of the engine, parameter groups, and the factory.
//
//   auto groups = make_param_groups(model->named_parameters(), cfg.weight_decay);
//   auto opt = make_optimizer("soap4bit", model->named_parameters(), cfg);
//   loss.backward(); opt->step(); opt->zero_grad();
//   opt->set_lr(schedule(step));            // one learning rate for all groups
//   torch::serialize::OutputArchive ar; opt->save(ar); ar.save_to(path);
//
// Optimizers own their state and create all of it at construction (so state_bytes() is exact before the
// first step). They read p.grad() and skip parameters whose grad is undefined (their step count does not
// advance). Parameters may be fp32 or bf16/fp16; all optimizer math runs in fp32 and the result is written
// back with round-to-nearest.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

namespace ablate::core::optim {

struct OptimConfig {
  double lr = 1e-4;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  // Low-bit AdamW: block size of the moment quantization (0 = 256 for 8-bit, 128 for 4-bit, as torchao)
  // and the smallest tensor that is quantized (smaller ones, or numel % block != 0, stay fp32).
  int64_t block_size = 0;
  int64_t min_quant_numel = 4096;
  // SOAP / Shampoo.
  int64_t precondition_frequency = 10;  // f: basis refresh (SOAP) / root-inverse recompute (Shampoo)
  double shampoo_beta = 0.95;           // EMA factor of the Kronecker factors L, R
  int64_t max_precond_dim = 8192;       // a side longer than this is not preconditioned (identity)
  // Low-bit SOAP: block size of the eigenbasis/factor quantization, and whether L, R are stored 8-bit.
  int64_t precond_block_size = 64;
  bool quantize_factors = true;
  // Shampoo: added to the clamped eigenvalues before the inverse 4th root.
  double shampoo_eps = 1e-12;
};

struct ParamGroup {
  std::vector<std::string> names;
  std::vector<torch::Tensor> params;
  double weight_decay = 0.0;
};

using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

// True when the parameter gets no weight decay: dim() <= 1, a name ending in ".bias", or a name containing
// "norm" or "embed" (case-insensitive). Everything else, including the LM head, is decayed.
bool is_no_decay(const std::string& name, const torch::Tensor& p);

// Two groups in this order: {decay: weight_decay}, {no decay: 0}; empty groups are dropped. Parameters with
// requires_grad() == false are skipped.
std::vector<ParamGroup> make_param_groups(const NamedParams& named_parameters, double weight_decay);
std::vector<ParamGroup> make_param_groups(const torch::OrderedDict<std::string, torch::Tensor>& named_parameters,
                                          double weight_decay);

class Optimizer {
 public:
  Optimizer(std::vector<ParamGroup> groups, double lr);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // One optimizer step over every parameter with a defined grad (no autograd recording).
  void step();
  // Sets every grad to undefined (set_to_none) or zeroes it.
  void zero_grad(bool set_to_none = true);
  void set_lr(double lr) { lr_ = lr; }
  double lr() const { return lr_; }

  // Exact bytes of optimizer state as stored (fp32 moments, quantized codes and scales, factors, bases,
  // step counters as 8 bytes each). Constant lookup maps are not counted.
  virtual int64_t state_bytes() const = 0;
  virtual std::string name() const = 0;

  // Complete state: name, lr, per-parameter step counters and every state tensor (quantized codes as
  // stored). load() checks the name and the parameter shapes and copies into the existing state, so a
  // resumed run continues bitwise identically.
  void save(torch::serialize::OutputArchive& archive) const;
  void load(torch::serialize::InputArchive& archive);
  // "p<i>/<key>" of the first floating state tensor holding a NaN/Inf, or "" when all are finite (the check a
  // checkpoint makes before it writes; one host sync on CUDA when all are finite).
  std::string first_nonfinite_state() const;

  const std::vector<ParamGroup>& param_groups() const { return groups_; }
  int64_t num_params() const { return static_cast<int64_t>(params_.size()); }
  const torch::Tensor& param(int64_t i) const { return params_.at(i); }
  int64_t step_count(int64_t i) const { return steps_.at(i); }

 protected:
  // Updates parameter i (flat index over the groups) with its fp32 gradient; steps_[i] is already advanced.
  virtual void step_param(int64_t i, const torch::Tensor& grad_fp32, double weight_decay) = 0;
  // Updates all parameters of one step (their steps_ already advanced), idx[k] with grads[k]. The default calls
  // step_param in order; optimizers with a multi-tensor kernel override it to update many tensors per launch.
  virtual void step_params(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads_fp32);
  // Visits every state tensor of parameter i under a stable key; save/load are built on it.
  using TensorVisitor = std::function<void(const std::string& key, torch::Tensor& t)>;
  virtual void visit_state(int64_t i, const TensorVisitor& fn) = 0;

  // Writes an fp32 result back into a parameter of any floating dtype.
  static void write_param(const torch::Tensor& p, const torch::Tensor& value_fp32);

  std::vector<ParamGroup> groups_;
  std::vector<torch::Tensor> params_;    // flat over groups
  std::vector<std::string> names_;       // flat over groups
  std::vector<double> weight_decay_;     // flat over groups
  std::vector<int64_t> steps_;           // per parameter
  double lr_;
};

// Names: adamw, adamw8bit, adamw4bit, soap, soap8bit, soap4bit, shampoo. Builds the groups with
// make_param_groups(named_parameters, config.weight_decay).
std::unique_ptr<Optimizer> make_optimizer(const std::string& name, const NamedParams& named_parameters,
                                          const OptimConfig& config);
std::unique_ptr<Optimizer> make_optimizer(const std::string& name,
                                          const torch::OrderedDict<std::string, torch::Tensor>& named_parameters,
                                          const OptimConfig& config);
const std::vector<std::string>& optimizer_names();

}  // namespace ablate::core::optim
