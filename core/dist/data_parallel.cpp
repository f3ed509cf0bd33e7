#include "core/dist/data_parallel.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <numeric>

namespace ablate::dist {

void broadcast_tensors(Communicator& comm, const std::vector<torch::Tensor>& tensors, int root) {
  if (comm.world_size() == 1) return;
  torch::NoGradGuard ng;
  constexpr int64_t kChunkBytes = 64 << 20;
  // Tensors of one dtype are packed into flat chunks: one collective per chunk instead of one per tensor.
  size_t i = 0;
  while (i < tensors.size()) {
    const auto dtype = tensors[i].scalar_type();
    size_t j = i;
    int64_t bytes = 0, numel = 0;
    while (j < tensors.size() && tensors[j].scalar_type() == dtype &&
           (j == i || bytes + tensors[j].nbytes() <= static_cast<size_t>(kChunkBytes))) {
      bytes += static_cast<int64_t>(tensors[j].nbytes());
      numel += tensors[j].numel();
      ++j;
    }
    auto flat = torch::empty({numel}, tensors[i].options().device(comm.device()).requires_grad(false));
    int64_t off = 0;
    for (size_t k = i; k < j; ++k) {
      flat.narrow(0, off, tensors[k].numel()).copy_(tensors[k].detach().reshape({-1}));
      off += tensors[k].numel();
    }
    comm.broadcast(flat, root);
    off = 0;
    for (size_t k = i; k < j; ++k) {
      tensors[k].detach().copy_(flat.narrow(0, off, tensors[k].numel()).view(tensors[k].sizes()));
      off += tensors[k].numel();
    }
    i = j;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// GradientBuckets

namespace {
struct HookHandle {
  std::shared_ptr<torch::autograd::Node> node;
  uintptr_t key = 0;
  ~HookHandle() {
    if (node) node->del_post_hook(key);
  }
};
}  // namespace

GradientBuckets::GradientBuckets(Communicator& comm, std::vector<torch::Tensor> params, int64_t bucket_bytes,
                                 bool overlap)
    : comm_(comm), params_(std::move(params)), overlap_(overlap) {
  bucket_of_.resize(params_.size());
  fired_.assign(params_.size(), 0);
  // Reverse registration order: the output side of the network gets its gradients first in backward.
  Bucket cur;
  int64_t cur_bytes = 0;
  auto close = [&] {
    if (cur.params.empty()) return;
    int64_t n = 0;
    for (size_t k : cur.params) {
      cur.offsets.push_back(n);
      n += params_[k].numel();
    }
    const auto& p0 = params_[cur.params.front()];
    cur.flat = torch::zeros({n}, torch::TensorOptions().dtype(p0.scalar_type()).device(p0.device()));
    cur.pending = static_cast<int64_t>(cur.params.size());
    for (size_t k : cur.params) bucket_of_[k] = buckets_.size();
    buckets_.push_back(std::move(cur));
    cur = Bucket();
    cur_bytes = 0;
  };
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    TORCH_CHECK(p.device() == comm_.device(), "data parallel: parameter on ", p.device(), ", communicator on ",
                comm_.device());
    if (!cur.params.empty() && (params_[cur.params.front()].scalar_type() != p.scalar_type() ||
                                cur_bytes + static_cast<int64_t>(p.nbytes()) > bucket_bytes))
      close();
    cur.params.push_back(k);
    cur_bytes += static_cast<int64_t>(p.nbytes());
  }
  close();
  if (overlap_) {
    for (size_t k = 0; k < params_.size(); ++k) {
      auto h = std::make_shared<HookHandle>();
      h->node = torch::autograd::impl::grad_accumulator(params_[k]);
      TORCH_CHECK(h->node, "data parallel: parameter ", k, " is not a leaf that requires grad");
      h->key = h->node->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [this, k](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
            on_grad_ready(k);
            return outputs;
          }));
      hooks_alive_.push_back(std::move(h));
    }
  }
}

GradientBuckets::~GradientBuckets() { hooks_alive_.clear(); }  // removes the hooks before `this` goes

void GradientBuckets::arm() {
  armed_ = true;
  refire_ = false;
  next_launch_ = 0;
  launched_in_backward_ = 0;
  std::fill(fired_.begin(), fired_.end(), 0);
  for (auto& b : buckets_) {
    b.pending = static_cast<int64_t>(b.params.size());
    b.work.reset();
  }
}

void GradientBuckets::on_grad_ready(size_t k) {
  if (!armed_) return;
  if (++fired_[k] > 1) {  // accumulated twice in one backward: an early bucket would hold a partial sum
    refire_ = true;
    return;
  }
  if (--buckets_[bucket_of_[k]].pending > 0) return;
  // Buckets start strictly in order so that every rank issues the same sequence of collectives.
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    launch(next_launch_++);
    ++launched_in_backward_;
  }
}

void GradientBuckets::launch(size_t bi) {
  torch::NoGradGuard ng;
  Bucket& b = buckets_[bi];
  for (size_t j = 0; j < b.params.size(); ++j) {
    const auto& p = params_[b.params[j]];
    auto slot = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
    if (p.grad().defined()) {
      slot.copy_(p.grad());
    } else {
      slot.zero_();  // unused on this rank: contributes nothing
    }
  }
  b.work = comm_.all_reduce_async(b.flat, ReduceOp::kAvg);
}

void GradientBuckets::finish() {
  torch::NoGradGuard ng;
  if (!armed_) arm();  // no overlap (or arm() not called): everything is reduced here
  for (size_t bi = next_launch_; bi < buckets_.size(); ++bi) launch(bi);
  next_launch_ = buckets_.size();
  for (auto& b : buckets_) b.work->wait();
  if (refire_) {  // a gradient grew after its bucket left: reduce every bucket again (the same on all ranks)
    for (size_t bi = 0; bi < buckets_.size(); ++bi) launch(bi);
    for (auto& b : buckets_) b.work->wait();
  }
  for (auto& b : buckets_) {
    for (size_t j = 0; j < b.params.size(); ++j) {
      auto& p = params_[b.params[j]];
      auto avg = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(avg);
      } else {
        p.mutable_grad() = avg.clone();
      }
    }
    b.work.reset();
  }
  armed_ = false;
}

// ---------------------------------------------------------------------------------------------------------------
// ZeroSharding

std::vector<int> ZeroSharding::assign_owners(const std::vector<int64_t>& numels, int world) {
  std::vector<size_t> order(numels.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return numels[a] > numels[b]; });
  std::vector<int64_t> load(static_cast<size_t>(world), 0);
  std::vector<int> owner(numels.size(), 0);
  for (size_t i : order) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());  // first minimum
    owner[i] = r;
    load[static_cast<size_t>(r)] += numels[i];
  }
  return owner;
}

ZeroSharding::ZeroSharding(Communicator& comm, NamedTensors params) : comm_(comm), params_(std::move(params)) {
  std::vector<int64_t> numels;
  for (const auto& [name, p] : params_) {
    TORCH_CHECK(p.scalar_type() == params_.front().second.scalar_type(), "sharded training: parameter ", name,
                " is ", p.scalar_type(), ", the others ", params_.front().second.scalar_type());
    TORCH_CHECK(p.device() == comm_.device(), "sharded training: parameter ", name, " on ", p.device(),
                ", communicator on ", comm_.device());
    numels.push_back(p.numel());
  }
  owner_ = assign_owners(numels, comm_.world_size());
  seg_len_.assign(static_cast<size_t>(comm_.world_size()), 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    offset_.push_back(seg_len_[owner_[i]]);
    seg_len_[owner_[i]] += numels[i];
  }
  seg_max_ = *std::max_element(seg_len_.begin(), seg_len_.end());
  const auto& p0 = params_.empty() ? torch::Tensor() : params_.front().second;
  flat_ = torch::zeros({comm_.world_size() * seg_max_},
                       torch::TensorOptions().dtype(p0.defined() ? p0.scalar_type() : torch::kFloat).device(comm_.device()));
}

NamedTensors ZeroSharding::owned() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owner_[i] == comm_.rank()) out.push_back(params_[i]);
  return out;
}

void ZeroSharding::reduce_gradients() {
  torch::NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i].second;
    auto slot = flat_.narrow(0, owner_[i] * seg_max_ + offset_[i], p.numel()).view(p.sizes());
    if (p.grad().defined()) {
      slot.copy_(p.grad());
    } else {
      slot.zero_();
    }
  }
  auto mine = torch::empty({seg_max_}, flat_.options());  // fresh each step: the owned .grad are views of it
  comm_.reduce_scatter(flat_, mine, ReduceOp::kAvg);
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& p = params_[i].second;
    if (owner_[i] == comm_.rank()) {
      p.mutable_grad() = mine.narrow(0, offset_[i], p.numel()).view(p.sizes());
    } else {
      p.mutable_grad() = torch::Tensor();  // ZeRO-2: only the owner keeps a gradient
    }
  }
}

double ZeroSharding::clip_grad_norm(double max_norm) {
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> norms;
  for (size_t i = 0; i < params_.size(); ++i)
    if (owner_[i] == comm_.rank() && params_[i].second.grad().defined())
      norms.push_back(params_[i].second.grad().norm(2));
  auto sq = norms.empty() ? torch::zeros({1}, flat_.options())
                          : torch::stack(norms).pow(2).sum().reshape({1});
  comm_.all_reduce(sq, ReduceOp::kSum);
  auto total = sq.sqrt();
  auto coef = torch::clamp(max_norm / (total + 1e-6), std::nullopt, 1.0);
  for (size_t i = 0; i < params_.size(); ++i)
    if (owner_[i] == comm_.rank() && params_[i].second.grad().defined()) params_[i].second.mutable_grad().mul_(coef);
  return total.item<double>();
}

void ZeroSharding::gather_parameters() {
  torch::NoGradGuard ng;
  const int r = comm_.rank();
  for (size_t i = 0; i < params_.size(); ++i)
    if (owner_[i] == r)
      flat_.narrow(0, r * seg_max_ + offset_[i], params_[i].second.numel()).copy_(params_[i].second.detach().reshape({-1}));
  comm_.all_gather(flat_.narrow(0, r * seg_max_, seg_max_), flat_);
  for (size_t i = 0; i < params_.size(); ++i) {
    if (owner_[i] == r) continue;
    auto& p = params_[i].second;
    p.detach().copy_(flat_.narrow(0, owner_[i] * seg_max_ + offset_[i], p.numel()).view(p.sizes()));
  }
}

}  // namespace ablate::dist
