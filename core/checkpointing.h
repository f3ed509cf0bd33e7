// Activation checkpointing for LibTorch C++ (which has no torch.utils.checkpoint).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <vector>

namespace ablate {

using CheckpointFn = std::function<torch::Tensor(const torch::Tensor&)>;

// y = fn(x) without keeping fn's intermediate activations: the forward runs with autograd recording off and saves
// only x; backward re-runs fn(x) with recording on (and with the forward's autocast state) and backpropagates
// through the recomputation. `params` must list every tensor that fn uses and that may need a gradient, other
// than x (a block's parameters): their gradients reach them through this node and accumulate as usual.
// fn must compute the same thing twice: no dropout or other RNG (our blocks have none) and no state updates.
// Falls back to a plain fn(x) when nothing needs a gradient (eval, NoGradGuard).
torch::Tensor checkpoint(const CheckpointFn& fn, const torch::Tensor& x, const std::vector<torch::Tensor>& params);

}  // namespace ablate
