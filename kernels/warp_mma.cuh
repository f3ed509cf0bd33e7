// Warp-level "16 x N" matrix products with operands in shared memory, shared by the fused attention-like kernels
// (kernels/nsa_compress_cuda.cu, kernels/ssd_intra_cuda.cu). A warp owns 16 rows of an accumulator of N fp32 columns:
// for bf16/fp16 operands the product runs on tensor cores (wmma 16x16x16, fp32 accumulate, sm_80+); for fp32 operands
// on FMA with a 4 x N/8 register tile per lane. One kernel body thus serves the three dtypes. The wmma fragment layout
// is opaque, so elementwise work goes through shared memory (store / load). Operand rows are padded by kPad<E>
// elements (16 bytes) so tile pointers stay 32-byte aligned and rows fall in distinct bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>

namespace ablate::kernels::warp_mma {

namespace wmma = nvcuda::wmma;

template <typename E>
constexpr bool kTC = sizeof(E) == 2;  // bf16 / fp16: tensor cores
template <typename E>
constexpr int kPad = kTC<E> ? 8 : 4;  // row padding, in elements (16 bytes)

constexpr size_t align128(size_t x) { return (x + 127) & ~size_t(127); }

// Opts a kernel into more than the default 48 KB of dynamic shared memory (no-op below that).
template <typename K>
cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ABLATE_WARP_MMA_WMMA 1
#else
#define ABLATE_WARP_MMA_WMMA 0
#endif

// Component i of a float4 (the FMA path reads operands four at a time).
__device__ __forceinline__ float comp(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// ---- warp-level 16 x N products (operands in shared memory, accumulator per warp) ----

template <typename E, int N, bool TC = kTC<E>>
struct WarpAcc;

// Tensor cores: N / 16 wmma accumulators. A, B tile pointers must be 32-byte aligned, lda/ldb multiples of 8.
template <typename E, int N>
struct WarpAcc<E, N, true> {
  static_assert(N % 16 == 0, "N must be a multiple of 16");
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> f[N / 16];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < N / 16; ++i) wmma::fill_fragment(f[i], 0.f);
  }
  __device__ __forceinline__ void load(const float* src, int ld) {
#pragma unroll
    for (int i = 0; i < N / 16; ++i) wmma::load_matrix_sync(f[i], src + 16 * i, ld, wmma::mem_row_major);
  }
  __device__ __forceinline__ void store(float* dst, int ld) {
#pragma unroll
    for (int i = 0; i < N / 16; ++i) wmma::store_matrix_sync(dst + 16 * i, f[i], ld, wmma::mem_row_major);
  }
  // += A B^T: A [16][K] (row stride lda), B [N][K] (row stride ldb).
  template <int K>
  __device__ __forceinline__ void abt(const E* A, int lda, const E* B, int ldb) {
#if ABLATE_WARP_MMA_WMMA
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, A + 16 * ks, lda);
#pragma unroll
      for (int nt = 0; nt < N / 16; ++nt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> b;  // B^T: (k, n) at B[n * ldb + k]
        wmma::load_matrix_sync(b, B + (16 * nt) * ldb + 16 * ks, ldb);
        wmma::mma_sync(f[nt], a, b, f[nt]);
      }
    }
#else
    __trap();
#endif
  }
  // += A B: A [16][K] (row stride lda), B [K][N] (row stride ldb).
  template <int K>
  __device__ __forceinline__ void ab(const E* A, int lda, const E* B, int ldb) {
#if ABLATE_WARP_MMA_WMMA
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, A + 16 * ks, lda);
#pragma unroll
      for (int nt = 0; nt < N / 16; ++nt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> b;
        wmma::load_matrix_sync(b, B + (16 * ks) * ldb + 16 * nt, ldb);
        wmma::mma_sync(f[nt], a, b, f[nt]);
      }
    }
#else
    __trap();
#endif
  }
  // Row i *= alpha[i] (16 values), through this warp's fp32 scratch (16 rows of stride ld).
  __device__ __forceinline__ void scale_rows(const float* alpha, float* scratch, int ld) {
    store(scratch, ld);
    __syncwarp();
    for (int e = static_cast<int>(threadIdx.x & 31); e < 16 * N; e += 32) scratch[(e / N) * ld + e % N] *= alpha[e / N];
    __syncwarp();
    load(scratch, ld);
  }
};

// FMA (fp32 operands): lane owns rows 4 * (lane / 8) + i (i < 4) and columns lane % 8 + 8 * jj (jj < N / 8).
// Operand rows must be 16-byte aligned (lda, ldb multiples of 4).
template <int N>
struct WarpAcc<float, N, false> {
  static_assert(N % 8 == 0, "N must be a multiple of 8");
  static constexpr int NC = N / 8;
  float c[4][NC];

  __device__ __forceinline__ static int row0() { return 4 * static_cast<int>((threadIdx.x & 31) >> 3); }
  __device__ __forceinline__ static int col0() { return static_cast<int>(threadIdx.x & 7); }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < NC; ++jj) c[i][jj] = 0.f;
  }
  __device__ __forceinline__ void load(const float* src, int ld) {
    const int r0 = row0(), c0 = col0();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < NC; ++jj) c[i][jj] = src[(r0 + i) * ld + c0 + 8 * jj];
  }
  __device__ __forceinline__ void store(float* dst, int ld) {
    const int r0 = row0(), c0 = col0();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int jj = 0; jj < NC; ++jj) dst[(r0 + i) * ld + c0 + 8 * jj] = c[i][jj];
  }
  template <int K>
  __device__ __forceinline__ void abt(const float* A, int lda, const float* B, int ldb) {
    static_assert(K % 4 == 0, "K must be a multiple of 4");
    const int r0 = row0(), c0 = col0();
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      float4 a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(A + (r0 + i) * lda + k);
#pragma unroll
      for (int jj = 0; jj < NC; ++jj) {
        const float4 b = *reinterpret_cast<const float4*>(B + (c0 + 8 * jj) * ldb + k);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          c[i][jj] = fmaf(a[i].x, b.x, c[i][jj]);
          c[i][jj] = fmaf(a[i].y, b.y, c[i][jj]);
          c[i][jj] = fmaf(a[i].z, b.z, c[i][jj]);
          c[i][jj] = fmaf(a[i].w, b.w, c[i][jj]);
        }
      }
    }
  }
  template <int K>
  __device__ __forceinline__ void ab(const float* A, int lda, const float* B, int ldb) {
    static_assert(K % 4 == 0, "K must be a multiple of 4");
    const int r0 = row0(), c0 = col0();
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      float4 a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(A + (r0 + i) * lda + k);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        float b[NC];
#pragma unroll
        for (int jj = 0; jj < NC; ++jj) b[jj] = B[(k + kk) * ldb + c0 + 8 * jj];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float av = comp(a[i], kk);
#pragma unroll
          for (int jj = 0; jj < NC; ++jj) c[i][jj] = fmaf(av, b[jj], c[i][jj]);
        }
      }
    }
  }
  __device__ __forceinline__ void scale_rows(const float* alpha, float*, int) {
    const int r0 = row0();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float s = alpha[r0 + i];
#pragma unroll
      for (int jj = 0; jj < NC; ++jj) c[i][jj] *= s;
    }
  }
};

}  // namespace ablate::kernels::warp_mma
