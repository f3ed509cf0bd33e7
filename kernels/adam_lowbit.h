// Fused AdamW step with block-wise quantized moments (8-bit: Dettmers et al. 2022, torchao AdamW8bit;
// 4-bit: Li et al. 2023, torchao AdamW4bit). Per element i of block b, all arithmetic in fp32:
//   m, v   = qmap_m[cm_i] * sm_b, qmap_v[cv_i] * sv_b                 (dequantize, kernels/quant.h)
//   p      = p - (lr * wd) * p                                          (decoupled weight decay)
//   m      = m + (1 - beta1) * (g - m);   v = v + (1 - beta2) * (g*g - v)   (torch.lerp, weight < 0.5)
//   p      = p - lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)          (Adam with bias correction)
//   sm_b   = max(max_b |m|, 1e-12), cm_i = nearest(m / sm_b); same for v    (re-quantize the new moments)
// The update uses the unquantized new moments (torchao's "high precision copy"). n must be a multiple of
// block; codes are packed as in kernels/quant.h.
#pragma once
#include <cstdint>

#include "kernels/quant.h"

namespace ablate::kernels {

struct AdamLowbitArgs {
  float* p = nullptr;        // [n] fp32 parameter, updated in place
  const float* g = nullptr;  // [n] fp32 gradient
  uint8_t* m_codes = nullptr;
  float* m_scale = nullptr;  // [n / block]
  uint8_t* v_codes = nullptr;
  float* v_scale = nullptr;
  const float* m_qmap = nullptr;  // signed map, 2^bits entries
  const float* v_qmap = nullptr;  // unsigned map
  int64_t n = 0;
  int64_t block = 256;
  int bits = 8;
  float lr = 0.f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
  float bias_correction1 = 1.f;  // 1 - beta1^t
  float bias_correction2 = 1.f;  // 1 - beta2^t
};

void adam_lowbit_step_ref(const AdamLowbitArgs& a);

#if ABLATE_WITH_CUDA
// Per-tensor kernel: one launch per tensor, one thread block per quantization block, one element per
// thread; block must be a multiple of 32 and at most 1024.
cudaError_t adam_lowbit_step_cuda(const AdamLowbitArgs& a, cudaStream_t stream);
#endif

// ------------------------------------------------------------------------------------ multi-tensor step
// One launch updates many quantized tensors that share the hyper-parameters, the weight decay and the step
// count (so the bias corrections), e.g. every quantized CUDA parameter of one group (core/optim/adamw.cpp,
// AdamWLowBit::step_params). The arithmetic per element is the one above, operation for operation as
// adam_lowbit_step_ref and adam_lowbit_step_cuda (explicit __f*_rn intrinsics, no FMA contraction), so the
// parameters, codes and scales are bit-identical to the per-tensor kernel and to the CPU reference.
//
// Design (kernels/adam_lowbit_cuda.cu):
//  - The tensors are described by a device array of AdamLowbitTensorDesc (pointers, numel, and the global
//    index of the tensor's first quantization block: an exclusive prefix sum of n / block). The caller
//    uploads it per step without synchronizing (pinned host staging + an async copy on the launch stream).
//  - One warp per quantization block: block = 128·G elements, each lane owns G groups of 4 consecutive
//    elements (group j of lane l starts at element 4·(32·j + l)), so p and g move as float4 and the codes as
//    one 32-bit (8-bit codes) or 16-bit (4-bit codes) word per group: every warp access is contiguous.
//    Supported block sizes: 128, 256, 512 (adam_lowbit_multi_supported); others use the per-tensor kernel.
//  - The two absmax reductions are warp shuffles (no __syncthreads, no shared scratch).
//  - A thread block is 8 warps and handles 8·kRounds consecutive quantization blocks (warp w takes blocks
//    first + w, first + w + 8, ...); a warp finds its tensor once by binary search over the descriptors'
//    block_start and then only steps forward, so a tensor of one block works as well as one of thousands.
//  - Re-quantization needs no rounding step: quant_nearest_code(x) is monotone in x, so it equals the number
//    of decision thresholds U_j <= x, where U_j is the smallest fp32 x whose code is >= j (computed once per
//    map on the host by adam_lowbit_code_thresholds, exactly, from the same fp32 rounding test). For 4-bit
//    codes the kernel counts them with a 4-level branchless descent of an Eytzinger (breadth-first) copy of U
//    (8 levels for 8-bit maps without a bucket table, see below): level d
//    reads one of the consecutive entries 2^d .. 2^(d+1)-1, so the first 6 levels are free of shared-memory
//    bank conflicts, and each level is a load, a compare and a shift-add. The threshold tables and the sorted
//    qmaps (for dequantization) sit in shared memory.
//  - 8-bit codes (8 levels are about 40 SASS instructions per code) instead look the count up: a byte table
//    indexed by (sign, clamped exponent, top 7 mantissa bits) of x gives the count at the bucket's lower end,
//    and one compare against the next threshold finishes it (adam_lowbit_code_lut; the host checks that no
//    bucket holds two thresholds, which holds for both dynamic maps: 24 / 25 exponent rows, about 6 KB a map
//    in shared memory), about 20 instructions per code. Both searches were checked against
//    quant_nearest_code for all 2^32 fp32 inputs of the maps they serve (CPU, once; the unit tests sample).
//  - The step is close to instruction-issue bound rather than HBM bound: 5 IEEE divisions and a square root
//    per element (kept for bit-identity, about 70 of roughly 160 SASS instructions per element) on top of the
//    dequantization, update and search.
//  - Bytes per element are those of the per-tensor kernel (about 16 B 8-bit, 14 B 4-bit); what changes is
//    one launch instead of one per tensor, no block-wide barriers, 16-byte accesses, and fewer, mostly
//    conflict-free shared-memory reads per element.
struct AdamLowbitTensorDesc {
  float* p = nullptr;        // [n] fp32, 16-byte aligned
  const float* g = nullptr;  // [n] fp32, 16-byte aligned
  uint8_t* m_codes = nullptr;  // 4-byte aligned (8-bit) / 2-byte aligned (4-bit)
  float* m_scale = nullptr;
  uint8_t* v_codes = nullptr;
  float* v_scale = nullptr;
  int64_t n = 0;            // multiple of block, > 0
  int64_t block_start = 0;  // sum of n / block over the tensors before this one
};
static_assert(sizeof(AdamLowbitTensorDesc) == 64, "AdamLowbitTensorDesc: 64 bytes, as uploaded");

struct AdamLowbitMultiArgs {
  const AdamLowbitTensorDesc* tensors = nullptr;  // device array [num_tensors], block_start ascending
  int64_t num_tensors = 0;
  int64_t total_blocks = 0;  // block_start + n / block of the last tensor
  const float* m_qmap = nullptr;  // device, 2^bits entries (shared by all tensors)
  const float* v_qmap = nullptr;
  // Re-quantization tables, device. Without LUTs (m_lut == nullptr): m_thresh/v_thresh are the Eytzinger-ordered
  // thresholds of adam_lowbit_code_thresholds. With LUTs (8-bit; both or neither): the bucket tables of
  // adam_lowbit_code_lut, and m_thresh/v_thresh its sorted thresholds.
  const float* m_thresh = nullptr;
  const float* v_thresh = nullptr;
  const uint8_t* m_lut = nullptr;  // [2 * m_lut_rows * 128], 16-byte aligned
  const uint8_t* v_lut = nullptr;
  int m_lut_elo = 0, m_lut_rows = 0, v_lut_elo = 0, v_lut_rows = 0;
  int64_t block = 256;
  int bits = 8;
  float lr = 0.f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
  float bias_correction1 = 1.f;
  float bias_correction2 = 1.f;
};

// Whether the multi-tensor kernel handles this block size and bit width (block 128, 256 or 512; bits 8, 4).
inline bool adam_lowbit_multi_supported(int64_t block, int bits) {
  return (bits == 8 || bits == 4) && (block == 128 || block == 256 || block == 512);
}

// The decision thresholds of quant_nearest_code for a sorted map of 2^bits entries, in Eytzinger order for
// the multi-tensor kernel: out[0] = 0 (unused) and out[k], k >= 1, is U_j for the j the k-th node of the
// breadth-first layout of U_1..U_top holds, where U_j = the smallest fp32 x with quant_nearest_code(x) >= j.
// Found per gap by bisection over the fp32 values in [qmap[j-1], qmap[j]] with the rounding test of
// quant_nearest_code itself, so counting the U_j <= x reproduces quant_nearest_code(x) for every fp32 x.
void adam_lowbit_code_thresholds(const float* qmap, int bits, float* out);

// The 8-bit bucket table: code(x) = lut[bucket(x)] + (x >= sorted[lut[bucket(x)]]) for every fp32 x (NaN: 0),
// where bucket(x) is (sign, exponent row, top 7 mantissa bits): row 0 holds every |x| below 2^(elo-127) (zero,
// subnormals), rows 1..rows-2 the exponents elo..elo+rows-3, row rows-1 everything larger (inf); the first and
// last rows use column 0 only. lut[b] = quant_nearest_code of the bucket's smallest value, sorted[k] = U_{k+1}
// (sorted[top] = NaN). Returns false when the map does not fit (only bits 8; more than 32 rows; a bucket whose
// smallest and largest values' codes differ by more than one); the caller then uses the Eytzinger search.
// lut: [2 * 32 * 128] bytes (the first 2 * rows * 128 used), sorted: [2^bits].
bool adam_lowbit_code_lut(const float* qmap, int bits, uint8_t* lut, float* sorted, int* elo, int* rows);

// CPU emulation of the multi-tensor CUDA kernel (host pointers): the same thread blocks, warps, lanes, tensor
// search and per-lane code (kernels/adam_lowbit_multi.h), run serially, the warp shuffles replaced by a max
// over the 32 lanes. For the CPU tests, which check it bit-identical to adam_lowbit_step_ref per tensor.
void adam_lowbit_multi_step_emulated(const AdamLowbitMultiArgs& a);

#if ABLATE_WITH_CUDA
// Launches the multi-tensor step on `stream` (asynchronous; `tensors` must stay valid until it has run,
// which stream-ordered allocations on the same stream guarantee). cudaErrorInvalidValue for an unsupported
// block/bits.
cudaError_t adam_lowbit_multi_step_cuda(const AdamLowbitMultiArgs& a, cudaStream_t stream);
#endif

}  // namespace ablate::kernels
