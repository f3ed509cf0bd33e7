// A tensor stored block-wise quantized (kernels/quant.h): uint8 codes (4-bit packed two per byte) plus one
// fp32 absmax scale per block, on the device of the tensor it replaces. CPU tensors go through the plain
// C++ reference, CUDA tensors through the CUDA kernels (ABLATE_WITH_CUDA builds).
#pragma once

#include <torch/torch.h>

#include "kernels/quant.h"

namespace ablate::core::optim {

// The lookup map as an fp32 tensor on `device` (cached per map and device).
torch::Tensor quant_map_tensor(kernels::QuantMap map, const torch::Device& device);

class QuantizedTensor {
 public:
  QuantizedTensor() = default;
  // All codes and scales zero, so decode() returns zeros until the first encode().
  QuantizedTensor(int64_t numel, kernels::QuantMap map, int64_t block, const torch::Device& device);

  bool defined() const { return codes_.defined(); }
  // x: any shape with numel() elements, any floating dtype, same device.
  void encode(const torch::Tensor& x);
  // fp32, flat [numel].
  torch::Tensor decode() const;
  int64_t bytes() const { return codes_.numel() + scale_.numel() * 4; }

  int64_t numel() const { return numel_; }
  int64_t block() const { return block_; }
  int bits() const { return kernels::quant_map_bits(map_); }
  kernels::QuantMap map() const { return map_; }
  torch::Tensor& codes() { return codes_; }
  torch::Tensor& scale() { return scale_; }
  const torch::Tensor& codes() const { return codes_; }
  const torch::Tensor& scale() const { return scale_; }
  const torch::Tensor& qmap() const { return qmap_; }

 private:
  int64_t numel_ = 0;
  int64_t block_ = 0;
  kernels::QuantMap map_ = kernels::QuantMap::kDynamicSigned8;
  torch::Tensor codes_;  // uint8 [numel] or [(numel + 1) / 2]
  torch::Tensor scale_;  // fp32 [ceil(numel / block)]
  torch::Tensor qmap_;   // fp32 [2^bits], shared constant
};

}  // namespace ablate::core::optim
