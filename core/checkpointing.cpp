#include "core/checkpointing.h"

#include <ATen/autocast_mode.h>

namespace ablate {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The function travels to backward inside the context's saved_data as an opaque capsule.
struct FnHolder : torch::CustomClassHolder {
  explicit FnHolder(CheckpointFn f) : fn(std::move(f)) {}
  CheckpointFn fn;
};

// Autocast state of the devices we train on, captured at forward time: backward runs with autocast off (the loop
// leaves the autocast region before backward, and on CUDA backward runs on another thread), so the recomputation
// must re-enter it to rebuild the same low-precision graph.
struct AutocastState {
  bool enabled[2] = {false, false};
  c10::ScalarType dtype[2] = {torch::kFloat, torch::kFloat};
  static constexpr at::DeviceType kTypes[2] = {at::kCPU, at::kCUDA};
  static AutocastState capture() {
    AutocastState s;
    for (int i = 0; i < 2; ++i) {
      s.enabled[i] = at::autocast::is_autocast_enabled(kTypes[i]);
      s.dtype[i] = at::autocast::get_autocast_dtype(kTypes[i]);
    }
    return s;
  }
  void apply() const {
    for (int i = 0; i < 2; ++i) {
      at::autocast::set_autocast_enabled(kTypes[i], enabled[i]);
      at::autocast::set_autocast_dtype(kTypes[i], dtype[i]);
    }
  }
};

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  // params is a TensorList because that is what custom Functions unpack into separate inputs (a std::vector would
  // count as one non-tensor argument and its gradients would be dropped).
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, at::TensorList params,
                               const c10::intrusive_ptr<FnHolder>& holder) {
    // Function::apply already runs this with grad mode off: fn records nothing and its activations die here.
    auto y = holder->fn(x);
    std::vector<torch::Tensor> saved{x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    const auto ac = AutocastState::capture();
    for (int i = 0; i < 2; ++i) {
      ctx->saved_data["ac_on" + std::to_string(i)] = ac.enabled[i];
      ctx->saved_data["ac_dt" + std::to_string(i)] = static_cast<int64_t>(ac.dtype[i]);
    }
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto holder = c10::static_intrusive_pointer_cast<FnHolder>(ctx->saved_data["fn"].toCapsule());
    AutocastState fwd_ac;
    for (int i = 0; i < 2; ++i) {
      fwd_ac.enabled[i] = ctx->saved_data["ac_on" + std::to_string(i)].toBool();
      fwd_ac.dtype[i] = static_cast<c10::ScalarType>(ctx->saved_data["ac_dt" + std::to_string(i)].toInt());
    }
    const bool x_needs = ctx->needs_input_grad(0);
    auto x = saved[0].detach().requires_grad_(x_needs);

    // Gradients are requested for x and for every parameter that needs one; the rest get undefined grads.
    std::vector<torch::Tensor> wrt;
    std::vector<size_t> slot;  // index into this node's inputs (0 = x, 1 + i = params[i])
    if (x_needs) {
      wrt.push_back(x);
      slot.push_back(0);
    }
    for (size_t i = 1; i < saved.size(); ++i)
      if (ctx->needs_input_grad(i) && saved[i].requires_grad()) {
        wrt.push_back(saved[i]);
        slot.push_back(i);
      }

    torch::Tensor y;
    {
      torch::AutoGradMode on(true);
      const auto outer = AutocastState::capture();
      fwd_ac.apply();
      try {
        y = holder->fn(x);
      } catch (...) {
        outer.apply();
        throw;
      }
      outer.apply();
      if (fwd_ac.enabled[0] || fwd_ac.enabled[1]) at::autocast::clear_cache();
    }
    variable_list out(saved.size() + 1);  // x, params..., and the (non-tensor) function holder
    if (!wrt.empty() && y.requires_grad()) {
      auto g = torch::autograd::grad({y}, wrt, {grads[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                     /*allow_unused=*/true);
      for (size_t j = 0; j < g.size(); ++j) out[slot[j]] = g[j];
    }
    return out;
  }
};

}  // namespace

torch::Tensor checkpoint(const CheckpointFn& fn, const torch::Tensor& x, const std::vector<torch::Tensor>& params) {
  bool any = x.requires_grad();
  for (const auto& p : params) any = any || p.requires_grad();
  if (!torch::GradMode::is_enabled() || !any) return fn(x);
  return CheckpointFunction::apply(x, at::TensorList(params), c10::make_intrusive<FnHolder>(fn));
}

}  // namespace ablate
