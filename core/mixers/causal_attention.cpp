#include "core/mixers/causal_attention.h"

#include <ATen/ATen.h>

namespace ablate::core {

torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t H = q.size(1), KV = k.size(1);
  TORCH_CHECK(KV > 0 && H % KV == 0, "causal_attention: ", H, " query heads are not a multiple of ", KV, " KV heads");
  if (H == KV) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
  const bool half = q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf;
  if (!q.is_cuda() || half) {
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, std::nullopt, /*enable_gqa=*/true);
  }
  return at::scaled_dot_product_attention(q, k.repeat_interleave(H / KV, 1), v.repeat_interleave(H / KV, 1), {}, 0.0,
                                          /*is_causal=*/true);
}

}  // namespace ablate::core
