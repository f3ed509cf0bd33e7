#include "core/model.h"

#include <algorithm>
#include <cmath>

#include "core/checkpointing.h"
#include "core/mixers/causal_attention.h"
#include "core/mixers/param_init.h"
#include "core/ops/cross_entropy.h"
#include "core/ops/rmsnorm.h"
#include "core/ops/rmsnorm_residual.h"
#include "core/ops/rope.h"
#include "core/ops/swiglu.h"

namespace ablate {

namespace F = torch::nn::functional;

std::pair<torch::Tensor, torch::Tensor> rope_tables(int64_t T, int64_t hd, double theta, torch::Device dev) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat64).device(torch::kCPU);
  // Built in fp64 then cast: large positions x small frequencies lose digits in fp32.
  auto inv_freq = torch::pow(theta, -torch::arange(0, hd, 2, opts) / double(hd));
  auto pos = torch::arange(T, opts);
  auto ang = torch::outer(pos, inv_freq);
  auto emb = torch::cat({ang, ang}, -1);
  return {emb.cos().to(torch::kFloat32).to(dev), emb.sin().to(torch::kFloat32).to(dev)};
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half);
  auto x2 = x.narrow(-1, half, half);
  auto rot = torch::cat({-x2, x1}, -1);
  return x * cos.to(x.scalar_type()) + rot * sin.to(x.scalar_type());
}

// ---------------------------------------------------------------- chunked linear + CE
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ChunkedCE : torch::autograd::Function<ChunkedCE> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& hidden, const torch::Tensor& weight,
                               const torch::Tensor& targets, int64_t chunk_rows) {
    const int64_t N = hidden.size(0), V = weight.size(0);
    if (chunk_rows <= 0) chunk_rows = std::max<int64_t>(256, (int64_t(1) << 24) / std::max<int64_t>(V, 1));
    const bool need_grad = hidden.requires_grad() || weight.requires_grad();
    const auto valid_mask = targets.ne(-100);
    // Denominator = count of non-ignored labels (min 1), kept on device to avoid a sync.
    const auto count = valid_mask.sum().clamp_min(1).to(torch::kFloat32);
    auto total = torch::zeros({}, hidden.options().dtype(torch::kFloat32));
    torch::Tensor grad_h, grad_w;
    if (need_grad) {
      grad_h = torch::empty_like(hidden);
      grad_w = torch::zeros(weight.sizes(), weight.options().dtype(torch::kFloat32));
    }
    for (int64_t s = 0; s < N; s += chunk_rows) {
      const int64_t n = std::min(chunk_rows, N - s);
      const auto h = hidden.narrow(0, s, n);
      const auto t = targets.narrow(0, s, n);
      const auto valid = valid_mask.narrow(0, s, n);
      const auto logits = torch::matmul(h, weight.t()).to(torch::kFloat32);  // [n, V]
      const auto lse = torch::logsumexp(logits, -1);
      const auto safe_t = torch::where(valid, t, torch::zeros_like(t));
      const auto picked = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1);
      total += ((lse - picked) * valid.to(torch::kFloat32)).sum();
      if (need_grad) {
        // d(sum CE)/d logits = softmax - onehot, zero on ignored rows; divided by count below.
        auto g = torch::softmax(logits, -1);
        g.scatter_add_(1, safe_t.unsqueeze(1), -torch::ones({n, 1}, g.options()));
        g.mul_(valid.to(torch::kFloat32).unsqueeze(1));
        const auto gc = g.to(hidden.scalar_type());
        grad_h.narrow(0, s, n).copy_(torch::matmul(gc, weight));
        grad_w.add_(torch::matmul(gc.t(), h).to(torch::kFloat32));
      }
    }
    const auto loss = total / count;
    if (need_grad) {
      ctx->save_for_backward({grad_h, grad_w, count});
    }
    ctx->saved_data["need_grad"] = need_grad;
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return loss.to(hidden.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!ctx->saved_data["need_grad"].toBool()) return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const auto scale = grads[0].to(torch::kFloat32) / saved[2];
    const auto w_dtype = static_cast<c10::ScalarType>(ctx->saved_data["w_dtype"].toInt());
    auto gh = saved[0] * scale.to(saved[0].scalar_type());
    auto gw = (saved[1] * scale).to(w_dtype);
    return {gh, gw, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor chunked_linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                           const torch::Tensor& targets, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "chunked_linear_cross_entropy: expected hidden [N, d], weight [V, d], targets [N]");
  return ChunkedCE::apply(hidden, weight, targets, chunk_rows);
}

// ---------------------------------------------------------------- modules
namespace {
torch::nn::Linear linear(int64_t in, int64_t out) { return core::make_linear(in, out, /*bias=*/false); }
}  // namespace

AttentionImpl::AttentionImpl(const ModelDims& m)
    : n_heads(m.n_heads), n_kv_heads(m.n_kv_heads), head_dim(m.head_dim), fused(m.fused_kernels) {
  q = register_module("q", linear(m.d, n_heads * head_dim));
  k = register_module("k", linear(m.d, n_kv_heads * head_dim));
  v = register_module("v", linear(m.d, n_kv_heads * head_dim));
  o = register_module("o", linear(n_heads * head_dim, m.d));
  if (m.attn_type == "nsa") {
    auto opt = core::NsaAttentionOptions(m.d, n_heads, n_kv_heads, head_dim)
                   .cmp_block(m.nsa_cmp_block_size)
                   .cmp_stride(m.nsa_cmp_stride)
                   .slc_block(m.nsa_block_size)
                   .num_selected(m.nsa_num_selected_blocks)
                   .window(m.nsa_window_size);
    nsa = register_module("nsa", core::NsaAttention(opt));
  }
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t B = x.size(0), T = x.size(1);
  auto qh = q(x).view({B, T, n_heads, head_dim}).transpose(1, 2);
  auto kh = k(x).view({B, T, n_kv_heads, head_dim}).transpose(1, 2);
  auto vh = v(x).view({B, T, n_kv_heads, head_dim});
  if (fused) {
    // One launch for q and k; the results are [B, H, T, hd] views of [B, T, H, hd] memory, like the inputs.
    std::tie(qh, kh) = ops::rope_qk(qh, kh, cos, sin);
  } else {
    qh = apply_rope(qh, cos, sin);
    kh = apply_rope(kh, cos, sin);
  }
  if (nsa) {
    // NSA takes (B, T, heads, hd) with q/k already RoPE'd, and the layer input for its branch gates.
    auto out = nsa->forward(qh.transpose(1, 2), kh.transpose(1, 2), vh, x);
    return o(out.reshape({B, T, n_heads * head_dim}));
  }
  // Causal SDPA (flash / cuDNN on CUDA, LibTorch's CPU kernels otherwise), GQA without K/V copies where the
  // backend allows: core/mixers/causal_attention.h.
  auto out = core::causal_attention(qh, kh, vh.transpose(1, 2));
  return o(out.transpose(1, 2).reshape({B, T, n_heads * head_dim}));
}

MLPImpl::MLPImpl(const ModelDims& m) : fused(m.fused_kernels) {
  gate = register_module("gate", linear(m.d, m.intermediate));
  up = register_module("up", linear(m.d, m.intermediate));
  down = register_module("down", linear(m.intermediate, m.d));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  return down(fused ? ops::swiglu(gate(x), up(x)) : F::silu(gate(x)) * up(x));
}

BlockImpl::BlockImpl(const ModelDims& m, char t) : type(t), fused(m.fused_kernels) {
  norm1 = register_parameter("norm1", torch::ones({m.d}));
  norm2 = register_parameter("norm2", torch::ones({m.d}));
  switch (t) {
    case 'A':
      attn = register_module("attn", Attention(m));
      break;
    case 'M':
      mamba = register_module("mamba", core::Mamba2Mixer(core::Mamba2MixerOptions(m.d)
                                                             .d_state(m.mamba_d_state)
                                                             .d_conv(m.mamba_d_conv)
                                                             .expand(m.mamba_expand)
                                                             .headdim(m.mamba_headdim)));
      break;
    case 'D':
      deltanet = register_module("deltanet", core::GatedDeltaNetMixer(core::GatedDeltaNetMixerOptions(m.d)
                                                                         .head_dim(m.gdn_head_dim)
                                                                         .expand_v(m.gdn_expand_v)
                                                                         .conv_size(m.gdn_conv_size)));
      break;
    default:
      throw ConfigError(std::string("unknown block type '") + t + "' (valid: M, D, A)");
  }
  mlp = register_module("mlp", MLP(m));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto xn = fused ? ops::rmsnorm(x, norm1, kNormEps) : ops::rmsnorm_composite(x, norm1, kNormEps);
  const auto mixed = type == 'A' ? attn(xn, cos, sin) : type == 'M' ? mamba(xn) : deltanet(xn);
  if (!fused) {
    auto h = x + mixed;
    return h + mlp(ops::rmsnorm_composite(h, norm2, kNormEps));
  }
  // Residual add + RMSNorm in one pass. Under autocast the mixer's output is bf16 while the residual stream stays
  // in the embedding's dtype (fp32): promote it first, which is exactly what x + mixed would do.
  auto [h, hn] = ops::rmsnorm_residual(mixed.to(x.scalar_type()), x, norm2, kNormEps);
  return h + mlp(hn);
}

LanguageModelImpl::LanguageModelImpl(const ModelDims& m, double theta) : dims(m), rope_theta(theta) {
  TORCH_CHECK(m.d > 0 && m.n_layers > 0 && !m.pattern.empty(), "bad model dims: ", m.to_string());
  if (m.pattern.find('A') != std::string::npos)
    TORCH_CHECK(m.n_heads * m.head_dim == m.d && m.n_heads % m.n_kv_heads == 0 && m.head_dim % 2 == 0,
                "bad attention dims: ", m.to_string());
  // Every Linear and the embedding are filled once, in init_weights (core/mixers/param_init.h).
  core::DeferLinearInit defer;
  embed = register_module("embed", core::make_embedding(m.padded_vocab, m.d));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < m.n_layers; ++i) blocks->push_back(Block(m, m.layer_type(i)));
  final_norm = register_parameter("final_norm", torch::ones({m.d}));
  head = register_module("head", linear(m.d, m.padded_vocab));
  init_weights();
}

void LanguageModelImpl::init_weights() {
  torch::NoGradGuard ng;
  const double base = 0.02, n = double(dims.n_layers);
  // One seed per tensor, in a fixed order, from the global seed (torch::manual_seed); filled in parallel.
  const uint64_t seed0 = at::detail::getDefaultCPUGenerator().current_seed();
  uint64_t tensor_index = 0;
  auto fill = [&](torch::Tensor& w, double std) { core::normal_parallel_(w, 0.0, std, core::mix_seed(seed0, tensor_index++)); };
  for (const auto& b : *blocks) {
    auto* blk = b->as<Block>();
    // Hybrid scaled init (seed 6.4) hits the layers whose names contain o_proj/down_proj there: the attention
    // output, the GDN output and the MLP down projection; Mamba2's out_proj is deliberately not among them.
    std::vector<const torch::nn::Module*> scaled = {blk->mlp->down.get()};
    if (blk->attn) scaled.push_back(blk->attn->o.get());
    if (blk->deltanet) scaled.push_back(blk->deltanet->o_proj.get());
    for (const auto& mod : blk->modules(/*include_self=*/false)) {
      auto* lin = mod->as<torch::nn::Linear>();
      if (!lin) continue;
      const bool scale = dims.hybrid_init &&
                         std::find(scaled.begin(), scaled.end(), static_cast<const torch::nn::Module*>(lin)) != scaled.end();
      fill(lin->weight, scale ? base / std::sqrt(2.0 * n) : base);
      if (lin->bias.defined()) lin->bias.zero_();
    }
  }
  fill(embed->weight, base);
  fill(head->weight, dims.hybrid_init ? base / std::sqrt(n) : base);
}

torch::Tensor LanguageModelImpl::hidden_states(const torch::Tensor& ids) {
  const int64_t T = ids.size(1);
  torch::Tensor cos, sin;
  if (dims.pattern.find('A') != std::string::npos) {
    if (!cos_.defined() || cos_.size(0) < T || cos_.device() != ids.device()) {
      std::tie(cos_, sin_) = rope_tables(T, dims.head_dim, rope_theta, ids.device());
    }
    cos = cos_.narrow(0, 0, T);
    sin = sin_.narrow(0, 0, T);
  }
  auto x = embed(ids);
  const bool ckpt = gradient_checkpointing && is_training() && torch::GradMode::is_enabled();
  for (const auto& b : *blocks) {
    auto blk = b->as<Block>();
    if (ckpt) {
      // The block's activations are recomputed in backward; only its input stays alive.
      x = checkpoint([blk, cos, sin](const torch::Tensor& in) { return blk->forward(in, cos, sin); }, x,
                     blk->parameters());
    } else {
      x = blk->forward(x, cos, sin);
    }
  }
  return dims.fused_kernels ? ops::rmsnorm(x, final_norm, kNormEps) : ops::rmsnorm_composite(x, final_norm, kNormEps);
}

torch::Tensor LanguageModelImpl::logits(const torch::Tensor& ids) { return head(hidden_states(ids)); }

torch::Tensor LanguageModelImpl::loss(const torch::Tensor& ids, const torch::Tensor& targets) {
  auto h = hidden_states(ids);
  if (dims.fused_loss) return ops::linear_cross_entropy(h.reshape({-1, dims.d}), head->weight, targets.reshape({-1}));
  return chunked_linear_cross_entropy(h.reshape({-1, dims.d}), head->weight, targets.reshape({-1}));
}

std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> LanguageModelImpl::decay_groups() {
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : named_parameters()) {
    if (p.value().dim() < 2 || p.key().rfind("embed.", 0) == 0) no_decay.push_back(p.value());
    else decay.push_back(p.value());
  }
  return {decay, no_decay};
}

}  // namespace ablate
