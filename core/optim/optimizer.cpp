#include "core/optim/optimizer.h"

#include <algorithm>
#include <cctype>

#include "core/optim/adamw.h"
#include "core/optim/shampoo.h"
#include "core/optim/soap.h"

namespace ablate::core::optim {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

NamedParams to_named(const torch::OrderedDict<std::string, torch::Tensor>& d) {
  NamedParams out;
  for (const auto& item : d) out.emplace_back(item.key(), item.value());
  return out;
}

}  // namespace

bool is_no_decay(const std::string& name, const torch::Tensor& p) {
  const std::string n = lower(name);
  const bool bias = n.size() >= 5 && n.compare(n.size() - 5, 5, ".bias") == 0;
  return p.dim() <= 1 || bias || n.find("norm") != std::string::npos || n.find("embed") != std::string::npos;
}

std::vector<ParamGroup> make_param_groups(const NamedParams& named_parameters, double weight_decay) {
  ParamGroup decay, no_decay;
  decay.weight_decay = weight_decay;
  no_decay.weight_decay = 0.0;
  for (const auto& [name, p] : named_parameters) {
    if (!p.requires_grad()) continue;
    ParamGroup& g = is_no_decay(name, p) ? no_decay : decay;
    g.names.push_back(name);
    g.params.push_back(p);
  }
  std::vector<ParamGroup> out;
  if (!decay.params.empty()) out.push_back(std::move(decay));
  if (!no_decay.params.empty()) out.push_back(std::move(no_decay));
  return out;
}

std::vector<ParamGroup> make_param_groups(const torch::OrderedDict<std::string, torch::Tensor>& named_parameters,
                                          double weight_decay) {
  return make_param_groups(to_named(named_parameters), weight_decay);
}

Optimizer::Optimizer(std::vector<ParamGroup> groups, double lr) : groups_(std::move(groups)), lr_(lr) {
  for (size_t gi = 0; gi < groups_.size(); ++gi) {
    const ParamGroup& g = groups_[gi];
    TORCH_CHECK(g.names.empty() || g.names.size() == g.params.size(), "ParamGroup ", gi, ": expected ",
                g.params.size(), " names (or none), got ", g.names.size());
    for (size_t k = 0; k < g.params.size(); ++k) {
      const torch::Tensor& p = g.params[k];
      TORCH_CHECK(p.defined() && p.is_floating_point(), "ParamGroup ", gi, " parameter ", k,
                  ": expected a defined floating-point tensor");
      params_.push_back(p);
      names_.push_back(g.names.empty() ? "param" + std::to_string(params_.size() - 1) : g.names[k]);
      weight_decay_.push_back(g.weight_decay);
      steps_.push_back(0);
    }
  }
}

void Optimizer::step() {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> idx;
  std::vector<torch::Tensor> grads;
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor& g = params_[i].grad();
    if (!g.defined()) continue;
    TORCH_CHECK(g.sizes() == params_[i].sizes(), name(), ": grad of ", names_[i], " has shape ", g.sizes(),
                ", expected ", params_[i].sizes());
    ++steps_[i];
    idx.push_back(static_cast<int64_t>(i));
    grads.push_back(g.to(torch::kFloat));
  }
  step_params(idx, grads);
}

void Optimizer::step_params(const std::vector<int64_t>& idx, const std::vector<torch::Tensor>& grads_fp32) {
  for (size_t k = 0; k < idx.size(); ++k) step_param(idx[k], grads_fp32[k], weight_decay_[idx[k]]);
}

void Optimizer::zero_grad(bool set_to_none) {
  for (auto& p : params_) {
    if (!p.grad().defined()) continue;
    if (set_to_none) {
      p.mutable_grad() = torch::Tensor();
    } else {
      p.mutable_grad().detach_();
      p.mutable_grad().zero_();
    }
  }
}

void Optimizer::write_param(const torch::Tensor& p, const torch::Tensor& value_fp32) {
  if (p.scalar_type() == torch::kFloat && p.is_same(value_fp32)) return;
  p.copy_(value_fp32);
}

void Optimizer::save(torch::serialize::OutputArchive& archive) const {
  archive.write("optim/name", c10::IValue(name()));
  archive.write("optim/lr", c10::IValue(lr_));
  archive.write("optim/num_params", c10::IValue(static_cast<int64_t>(params_.size())));
  auto* self = const_cast<Optimizer*>(this);  // visit_state is shared with load; save only reads
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string prefix = "p" + std::to_string(i) + "/";
    archive.write(prefix + "step", c10::IValue(steps_[i]));
    archive.write(prefix + "numel", c10::IValue(params_[i].numel()));
    self->visit_state(static_cast<int64_t>(i), [&](const std::string& key, torch::Tensor& t) {
      // A host copy (one device-to-host copy on CUDA, a clone on the CPU): the archive is a snapshot that a
      // background checkpoint writer may serialize while training goes on.
      archive.write(prefix + key, t.is_cpu() ? t.detach().clone() : t.detach().to(torch::kCPU));
    });
  }
}

std::string Optimizer::first_nonfinite_state() const {
  torch::NoGradGuard no_grad;
  auto* self = const_cast<Optimizer*>(this);  // visit_state only reads here
  std::vector<std::string> keys;
  std::vector<torch::Tensor> ok;
  for (size_t i = 0; i < params_.size(); ++i)
    self->visit_state(static_cast<int64_t>(i), [&](const std::string& key, torch::Tensor& t) {
      if (!t.defined() || !t.is_floating_point() || t.numel() == 0) return;
      keys.push_back("p" + std::to_string(i) + "/" + key);
      ok.push_back(torch::isfinite(t).all().reshape({1}));
    });
  if (ok.empty() || torch::cat(ok).all().item<bool>()) return "";
  const auto flags = torch::cat(ok).to(torch::kCPU);
  for (size_t k = 0; k < keys.size(); ++k)
    if (!flags[static_cast<int64_t>(k)].item<bool>()) return keys[k];
  return "";
}

void Optimizer::load(torch::serialize::InputArchive& archive) {
  torch::NoGradGuard no_grad;
  c10::IValue v;
  archive.read("optim/name", v);
  TORCH_CHECK(v.toStringRef() == name(), "Optimizer::load: checkpoint holds optimizer '", v.toStringRef(),
              "', this optimizer is '", name(), "'");
  archive.read("optim/num_params", v);
  TORCH_CHECK(v.toInt() == static_cast<int64_t>(params_.size()), "Optimizer::load: checkpoint has ", v.toInt(),
              " parameters, this optimizer has ", params_.size());
  archive.read("optim/lr", v);
  lr_ = v.toDouble();
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string prefix = "p" + std::to_string(i) + "/";
    archive.read(prefix + "numel", v);
    TORCH_CHECK(v.toInt() == params_[i].numel(), "Optimizer::load: parameter ", i, " (", names_[i], ") has ",
                params_[i].numel(), " elements, the checkpoint ", v.toInt());
    archive.read(prefix + "step", v);
    steps_[i] = v.toInt();
    visit_state(static_cast<int64_t>(i), [&](const std::string& key, torch::Tensor& t) {
      torch::Tensor saved;
      archive.read(prefix + key, saved);
      TORCH_CHECK(saved.sizes() == t.sizes() && saved.scalar_type() == t.scalar_type(), "Optimizer::load: state ",
                  prefix + key, " expected shape ", t.sizes(), " dtype ", t.scalar_type(), ", checkpoint has ",
                  saved.sizes(), " ", saved.scalar_type());
      t.copy_(saved);
    });
  }
}

const std::vector<std::string>& optimizer_names() {
  static const std::vector<std::string> names = {"adamw",    "adamw8bit", "adamw4bit", "soap",
                                                 "soap8bit", "soap4bit",  "shampoo"};
  return names;
}

std::unique_ptr<Optimizer> make_optimizer(const std::string& name, const NamedParams& named_parameters,
                                          const OptimConfig& config) {
  auto groups = make_param_groups(named_parameters, config.weight_decay);
  const std::string n = lower(name);
  if (n == "adamw") return std::make_unique<AdamW>(std::move(groups), config);
  if (n == "adamw8bit") return std::make_unique<AdamWLowBit>(std::move(groups), config, 8);
  if (n == "adamw4bit") return std::make_unique<AdamWLowBit>(std::move(groups), config, 4);
  if (n == "soap") return std::make_unique<SOAP>(std::move(groups), config, 32);
  if (n == "soap8bit") return std::make_unique<SOAP>(std::move(groups), config, 8);
  if (n == "soap4bit") return std::make_unique<SOAP>(std::move(groups), config, 4);
  if (n == "shampoo") return std::make_unique<Shampoo>(std::move(groups), config);
  std::string valid;
  for (const auto& s : optimizer_names()) valid += (valid.empty() ? "" : ", ") + s;
  TORCH_CHECK(false, "make_optimizer: unknown optimizer '", name, "', expected one of: ", valid);
}

std::unique_ptr<Optimizer> make_optimizer(const std::string& name,
                                          const torch::OrderedDict<std::string, torch::Tensor>& named_parameters,
                                          const OptimConfig& config) {
  return make_optimizer(name, to_named(named_parameters), config);
}

}  // namespace ablate::core::optim
