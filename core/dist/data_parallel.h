// Data-parallel and sharded (ZeRO-2 style) training on top of a Communicator. Used by core/train.cpp; knows
// nothing about models or optimizers beyond a list of named parameters.
//
// Data parallel (GradientBuckets):
//   every rank holds all parameters and the whole optimizer; after backward each gradient is the average over the
//   ranks. Parameters are packed (in reverse registration order, roughly the order their gradients become final
//   in backward) into buckets of ~bucket_bytes; with overlap on, a post-accumulation hook on each parameter's
//   AccumulateGrad node marks it ready during the last micro-batch's backward, and a bucket whose parameters are
//   all ready is copied into its flat buffer and its all-reduce is started at once (in bucket order, the same on
//   every rank), while backward continues with earlier layers. finish() starts whatever is left, waits and copies
//   the averages back into the .grad tensors.
//
// Sharded (ZeroSharding):
//   each parameter tensor is owned by exactly one rank (greedy by size, largest first, to the least loaded rank;
//   whole tensors, so SOAP/Shampoo factors and quantization blocks stay as in one process). Each rank builds its
//   optimizer over its own parameters only, so optimizer state per rank is ~1/N. After backward,
//   reduce_gradients() reduce-scatters one flat buffer laid out owner by owner (each owner's segment padded to the
//   longest): the owner receives the average of its gradients, every other gradient is dropped. Clipping uses the
//   global norm (squared norms summed over ranks). After the step, gather_parameters() all-gathers the owners'
//   updated parameters into every rank's full copy.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/dist/communicator.h"

namespace ablate::dist {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Copies rank `root`'s values of every tensor to all ranks (flattened in chunks of at most 64 MiB).
void broadcast_tensors(Communicator& comm, const std::vector<torch::Tensor>& tensors, int root = 0);

class GradientBuckets {
 public:
  GradientBuckets(Communicator& comm, std::vector<torch::Tensor> params, int64_t bucket_bytes = 25 << 20,
                  bool overlap = true);
  ~GradientBuckets();
  GradientBuckets(const GradientBuckets&) = delete;
  GradientBuckets& operator=(const GradientBuckets&) = delete;

  // Call right before the backward of a step's last micro-batch: its gradients are final as they accumulate.
  void arm();
  // After that backward: all-reduces (average) whatever is not in flight yet, waits, writes the .grad tensors.
  void finish();

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }
  // Buckets started from a backward hook (not by finish()) in the last step: > 0 means communication overlapped.
  int64_t launched_in_backward() const { return launched_in_backward_; }
  // True when the last step had a gradient accumulated twice in one backward, so every bucket was reduced again.
  bool reduced_twice() const { return refire_; }

 private:
  struct Bucket {
    std::vector<size_t> params;  // indices into params_
    std::vector<int64_t> offsets;
    torch::Tensor flat;
    int64_t pending = 0;
    WorkPtr work;
  };
  void on_grad_ready(size_t param);
  void launch(size_t bucket);

  Communicator& comm_;
  std::vector<torch::Tensor> params_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;
  std::vector<int64_t> fired_;
  std::vector<std::shared_ptr<void>> hooks_alive_;  // grad accumulators carrying our hooks (kept alive)
  bool armed_ = false, overlap_ = true, refire_ = false;
  size_t next_launch_ = 0;
  int64_t launched_in_backward_ = 0;
};

class ZeroSharding {
 public:
  ZeroSharding(Communicator& comm, NamedTensors params);

  // Owner of each parameter, by position in the constructor's list: a pure function of the sizes and the world.
  static std::vector<int> assign_owners(const std::vector<int64_t>& numels, int world);
  int owner(size_t i) const { return owner_.at(i); }
  // This rank's parameters, in the constructor's order (build the optimizer over these).
  NamedTensors owned() const;
  int64_t owned_numel() const { return seg_len_.at(comm_.rank()); }
  int64_t padded_segment() const { return seg_max_; }

  // Averages every gradient over the ranks into its owner's .grad; other ranks' .grad become undefined.
  // Parameters without a gradient on this rank contribute zeros.
  void reduce_gradients();
  // Global L2 norm of the (owned) gradients; scales them by min(1, max_norm / (norm + 1e-6)) like
  // torch::nn::utils::clip_grad_norm_. Returns the norm before clipping (inf/nan when non-finite).
  double clip_grad_norm(double max_norm);
  // Every rank's full copy of every parameter takes its owner's values.
  void gather_parameters();

 private:
  Communicator& comm_;
  NamedTensors params_;
  std::vector<int> owner_;
  std::vector<int64_t> offset_;  // element offset of each parameter inside its owner's segment
  std::vector<int64_t> seg_len_;
  int64_t seg_max_ = 0;
  torch::Tensor flat_;  // world x seg_max_, reused
};

}  // namespace ablate::dist
