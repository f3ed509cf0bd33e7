// Block-wise quantization of optimizer state: a sorted lookup map ("qmap") of 2^bits fp32 values, one
// absmax scale per block, and the code of the nearest map entry per element.
//   encode: s_b = max(max_{i in b} |x_i|, 1e-12);  code_i = argmin_k |x_i / s_b - qmap[k]|
//   decode: y_i = qmap[code_i] * s_b
// 8-bit codes take one byte each; 4-bit codes are packed two per byte, element 2k in the high nibble and
// element 2k+1 in the low nibble (torchao OptimState4bit layout). n need not be a multiple of the block
// size: the last block is partial and keeps its own scale. Buffers are contiguous; x, y, scale, qmap fp32.
#pragma once
#include <cstdint>

#if ABLATE_WITH_CUDA
#include <cuda_runtime.h>
#endif

#if defined(__CUDACC__)
#define ABLATE_HOST_DEVICE __host__ __device__
#else
#define ABLATE_HOST_DEVICE
#endif

namespace ablate::kernels {

// The maps. All are sorted ascending and have exactly 2^bits entries.
enum class QuantMap : int {
  // bitsandbytes / torchao `create_dynamic_map(signed=True)`: 8 bits, up to 7 exponent bits (Adam m).
  kDynamicSigned8 = 0,
  // `create_dynamic_map(signed=False)` (Adam v).
  kDynamicUnsigned8 = 1,
  // `create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)` (torchao AdamW4bit m).
  kDynamicSigned4 = 2,
  // torchao AdamW4bit v: linspace(0, 1, 17)[1:], i.e. k/16 for k = 1..16 (linear, zero excluded).
  kLinearUnsigned4 = 3,
  // "Linear-2" (linear-square) signed map of 4-bit Shampoo (Wang et al. 2024, eq. for T_b):
  // x_i = -1 + 2i/(2^b - 1), entry = sign(x_i) x_i^2, i = 0..2^b-1 (symmetric, zero excluded).
  kLinearSquareSigned4 = 4,
  kLinearSquareSigned8 = 5,
};

inline constexpr int quant_map_bits(QuantMap m) {
  return (m == QuantMap::kDynamicSigned8 || m == QuantMap::kDynamicUnsigned8 ||
          m == QuantMap::kLinearSquareSigned8)
             ? 8
             : 4;
}

// Writes the 2^bits entries of `map` into out (capacity >= 256) and returns the count. The dynamic maps
// reproduce torchao's construction in fp32 arithmetic (torch.linspace's fp32 algorithm, fp32 means and
// products), so the values are bit-identical to torchao's qmap tensors.
int quant_map_build(QuantMap map, float* out);

struct QuantEncodeArgs {
  const float* x = nullptr;     // [n]
  uint8_t* codes = nullptr;     // [n] (8-bit) or [(n + 1) / 2] (4-bit)
  float* scale = nullptr;       // [ceil(n / block)]
  const float* qmap = nullptr;  // [2^bits], ascending
  int64_t n = 0;
  int64_t block = 256;  // even for 4-bit
  int bits = 8;         // 8 or 4
};

struct QuantDecodeArgs {
  const uint8_t* codes = nullptr;
  const float* scale = nullptr;
  const float* qmap = nullptr;
  float* y = nullptr;  // [n]
  int64_t n = 0;
  int64_t block = 256;
  int bits = 8;
};

// Nearest map entry to xn (already divided by the block scale). A branchless binary search finds the
// largest k with xn >= qmap[k] (k = 0 if none), then rounds up when the residual is at least half the gap
// to qmap[k+1]. This is torchao's `quantize_{8,4}bit_with_qmap` operation for operation.
ABLATE_HOST_DEVICE inline uint32_t quant_nearest_code(float xn, const float* qmap, int bits) {
  const uint32_t top = (1u << bits) - 1u;
  uint32_t c = 0;
  for (uint32_t step = 1u << (bits - 1); step > 0; step >>= 1)
    if (xn >= qmap[c + step]) c += step;  // c + step <= top by construction
  const uint32_t up = c + 1 > top ? top : c + 1;
  const float down_v = qmap[c], up_v = qmap[up];
  return (xn - down_v >= (up_v - down_v) * 0.5f) ? up : c;
}

// Reads code i from a packed (4-bit) or byte (8-bit) buffer.
ABLATE_HOST_DEVICE inline uint32_t quant_code_at(const uint8_t* codes, int64_t i, int bits) {
  if (bits == 8) return codes[i];
  const uint8_t b = codes[i >> 1];
  return (i & 1) ? (b & 0x0Fu) : (b >> 4);
}

// CPU reference: obvious loops over blocks, fp32 arithmetic identical to the CUDA kernels.
void quant_encode_ref(const QuantEncodeArgs& a);
void quant_decode_ref(const QuantDecodeArgs& a);

#if ABLATE_WITH_CUDA
// One thread block per quantization block (block <= 1024 elements, a multiple of 32; 4-bit: even).
cudaError_t quant_encode_cuda(const QuantEncodeArgs& a, cudaStream_t stream);
cudaError_t quant_decode_cuda(const QuantDecodeArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
