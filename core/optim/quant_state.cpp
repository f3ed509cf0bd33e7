#include "core/optim/quant_state.h"

#include <map>
#include <mutex>

#if ABLATE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace ablate::core::optim {

torch::Tensor quant_map_tensor(kernels::QuantMap map, const torch::Device& device) {
  static std::mutex mu;
  static std::map<std::pair<int, std::string>, torch::Tensor> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(static_cast<int>(map), device.str());
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  float values[256];
  const int n = kernels::quant_map_build(map, values);
  torch::Tensor t = torch::from_blob(values, {n}, torch::kFloat).clone().to(device);
  cache.emplace(key, t);
  return t;
}

QuantizedTensor::QuantizedTensor(int64_t numel, kernels::QuantMap map, int64_t block, const torch::Device& device)
    : numel_(numel), block_(block), map_(map) {
  TORCH_CHECK(numel >= 0, "QuantizedTensor: expected numel >= 0, got ", numel);
  TORCH_CHECK(block > 0 && (kernels::quant_map_bits(map) == 8 || block % 2 == 0),
              "QuantizedTensor: expected a positive (for 4-bit: even) block size, got ", block);
  const int64_t ncodes = bits() == 8 ? numel : (numel + 1) / 2;
  codes_ = torch::zeros({ncodes}, torch::TensorOptions().dtype(torch::kUInt8).device(device));
  scale_ = torch::zeros({(numel + block - 1) / block}, torch::TensorOptions().dtype(torch::kFloat).device(device));
  qmap_ = quant_map_tensor(map, device);
}

void QuantizedTensor::encode(const torch::Tensor& x) {
  TORCH_CHECK(defined(), "QuantizedTensor::encode: tensor was default-constructed");
  TORCH_CHECK(x.numel() == numel_, "QuantizedTensor::encode: expected ", numel_, " elements, got ", x.numel());
  TORCH_CHECK(x.device() == codes_.device(), "QuantizedTensor::encode: expected device ", codes_.device(),
              ", got ", x.device());
  const torch::Tensor xc = x.to(torch::kFloat).contiguous();
  kernels::QuantEncodeArgs a;
  a.x = xc.data_ptr<float>();
  a.codes = codes_.data_ptr<uint8_t>();
  a.scale = scale_.data_ptr<float>();
  a.qmap = qmap_.data_ptr<float>();
  a.n = numel_;
  a.block = block_;
  a.bits = bits();
  if (xc.is_cuda()) {
#if ABLATE_WITH_CUDA
    const cudaError_t e = kernels::quant_encode_cuda(a, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(e == cudaSuccess, "quant_encode_cuda failed: ", cudaGetErrorString(e));
#else
    TORCH_CHECK(false, "QuantizedTensor::encode: got a CUDA tensor but Ablate was built without ABLATE_WITH_CUDA");
#endif
  } else {
    kernels::quant_encode_ref(a);
  }
}

torch::Tensor QuantizedTensor::decode() const {
  TORCH_CHECK(defined(), "QuantizedTensor::decode: tensor was default-constructed");
  torch::Tensor y = torch::empty({numel_}, scale_.options());
  kernels::QuantDecodeArgs a;
  a.codes = codes_.data_ptr<uint8_t>();
  a.scale = scale_.data_ptr<float>();
  a.qmap = qmap_.data_ptr<float>();
  a.y = y.data_ptr<float>();
  a.n = numel_;
  a.block = block_;
  a.bits = bits();
  if (y.is_cuda()) {
#if ABLATE_WITH_CUDA
    const cudaError_t e = kernels::quant_decode_cuda(a, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(e == cudaSuccess, "quant_decode_cuda failed: ", cudaGetErrorString(e));
#else
    TORCH_CHECK(false, "QuantizedTensor::decode: got a CUDA tensor but Ablate was built without ABLATE_WITH_CUDA");
#endif
  } else {
    kernels::quant_decode_ref(a);
  }
  return y;
}

}  // namespace ablate::core::optim
