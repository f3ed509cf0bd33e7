// CUDA chunk state scan (see chunk_state_scan.h), fp32 throughout.
//
// One thread block (NT = 256 or 512 threads) per (bh, V-tile of VT columns) walks all chunks in order, keeping its state tile
// Z (K x VT) in shared memory. Per chunk the two products are small shared-memory GEMMs:
//   phase 1  X = P1 + s1 M1 Z     thread (tv, g) computes rows g*R1 .. g*R1+R1-1 (per pass) of column tv;
//   phase 2  Z = d Z + s2 M2^T X + P2   thread (tv, g) owns rows g*R2 .. g*R2+R2-1 (per pass) of column tv.
// M rows are read as float4 along K (broadcast within a warp), Z and X along the tile's columns (one bank each).
// The L x K tiles M1_c and M2_c are staged with cp.async and overlapped with the other phase: M2_c (and P2_c)
// load during phase 1, M1_{c+1} and P1_{c+1} during phase 2, so each buffer exists once. Shared memory is zeroed
// once; padding (rows K..K8 of Z, columns K..KP of M, columns nv..VT of a ragged last V-tile) stays zero, so the
// inner loops need no bounds checks and only the global stores are masked.
#include "kernels/chunk_state_scan.h"

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace ablate::kernels {
namespace {

// Per (VT, NT): G = NT / VT row groups; R1 rows of X per thread and pass (phase 1), R2 rows of Z per thread and
// pass (phase 2, a multiple of 4 for the float4 reads), sized so that one pass covers L = 64 and K = 128.
template <int VT, int NT>
struct Tiling {
  static constexpr int G = NT / VT;
  static constexpr int R1 = G >= 32 ? 2 : 4;
  static constexpr int R2 = G >= 32 ? 4 : 8;
};

struct Layout {
  int k8, kp;  // K rounded up to 8; row stride of the M tiles (K8 + 4: float4-aligned, staggers banks)
  int64_t z, p2, x, p1, m1, m2, total;  // float offsets in dynamic shared memory
};

__host__ __device__ inline Layout make_layout(int vt, int L, int K, bool has_p2) {
  Layout s;
  s.k8 = (K + 7) & ~7;
  s.kp = s.k8 + 4;
  s.z = 0;
  s.p2 = s.z + int64_t(s.k8) * vt;
  s.x = s.p2 + (has_p2 ? int64_t(s.k8) * vt : 0);
  s.p1 = s.x + int64_t(L) * vt;
  s.m1 = s.p1 + int64_t(L) * vt;
  s.m2 = s.m1 + int64_t(L) * s.kp;
  s.total = s.m2 + int64_t(L) * s.kp;
  return s;
}

// Async copy of an L x K row-major tile (contiguous in global memory) into shared rows of stride kp.
template <int NT, bool VEC>
__device__ __forceinline__ void stage_m(float* dst, const float* src, int L, int K, int kp) {
  if (VEC) {
    const int kv = K / 4, n = L * kv;
    for (int i = threadIdx.x; i < n; i += NT) {
      const int l = i / kv, j = i - l * kv;
      __pipeline_memcpy_async(dst + l * kp + j * 4, src + int64_t(i) * 4, 16);
    }
  } else {
    const int n = L * K;
    for (int i = threadIdx.x; i < n; i += NT) {
      const int l = i / K, k = i - l * K;
      __pipeline_memcpy_async(dst + l * kp + k, src + i, 4);
    }
  }
}

// Async copy of rows x [v0, v0 + nv) of a row-major (rows, V) matrix into a shared (rows, VT) tile.
template <int VT, int NT, bool VEC>
__device__ __forceinline__ void stage_cols(float* dst, const float* src, int rows, int V, int nv) {
  if (VEC) {
    constexpr int kv = VT / 4;
    const int n = rows * kv;
    for (int i = threadIdx.x; i < n; i += NT) {
      const int r = i / kv, j = i - r * kv;
      if (j * 4 < nv) __pipeline_memcpy_async(dst + r * VT + j * 4, src + int64_t(r) * V + j * 4, 16);
    }
  } else {
    const int n = rows * VT;
    for (int i = threadIdx.x; i < n; i += NT) {
      const int r = i / VT, j = i - r * VT;
      if (j < nv) __pipeline_memcpy_async(dst + r * VT + j, src + int64_t(r) * V + j, 4);
    }
  }
}

// Shared (K, VT) tile -> global rows of stride V from column v0 (already applied to dst), first nv columns.
template <int VT, int NT>
__device__ __forceinline__ void store_tile(float* dst, const float* z, int K, int V, int nv) {
  for (int i = threadIdx.x; i < K * VT; i += NT) {
    const int k = i / VT, v = i - k * VT;
    if (v < nv) dst[int64_t(k) * V + v] = z[i];
  }
}

template <int VT, int NT, bool VEC>
__global__ void __launch_bounds__(NT) chunk_scan_kernel(ChunkScanArgs a) {
  constexpr int G = Tiling<VT, NT>::G, kR1 = Tiling<VT, NT>::R1, kR2 = Tiling<VT, NT>::R2;
  extern __shared__ __align__(16) float smem[];
  const int L = static_cast<int>(a.chunk_len), K = static_cast<int>(a.dk), V = static_cast<int>(a.dv);
  const int64_t C = a.chunks;
  const bool has_p2 = a.p2 != nullptr;
  const Layout s = make_layout(VT, L, K, has_p2);
  float* z = smem + s.z;
  float* p2s = smem + s.p2;
  float* xs = smem + s.x;
  float* p1s = smem + s.p1;
  float* m1s = smem + s.m1;
  float* m2s = smem + s.m2;

  const int ntiles = (V + VT - 1) / VT;
  const int64_t b = blockIdx.x / ntiles;
  const int v0 = static_cast<int>(blockIdx.x % ntiles) * VT;
  const int nv = min(VT, V - v0);
  const int tv = threadIdx.x % VT, g = threadIdx.x / VT;

  for (int64_t i = threadIdx.x; i < s.total; i += NT) smem[i] = 0.f;
  __syncthreads();
  {
    const float* z0 = a.z0 + b * K * V + v0;
    for (int i = threadIdx.x; i < K * VT; i += NT) {
      const int k = i / VT, v = i - k * VT;
      if (v < nv) z[i] = z0[int64_t(k) * V + v];
    }
  }
  auto chunk_at = [&](int64_t step) { return a.reverse ? C - 1 - step : step; };
  {
    const int64_t bc = b * C + chunk_at(0);
    stage_m<NT, VEC>(m1s, a.m1 + bc * L * K, L, K, s.kp);
    stage_cols<VT, NT, VEC>(p1s, a.p1 + bc * L * V + v0, L, V, nv);
    __pipeline_commit();
  }

  for (int64_t step = 0; step < C; ++step) {
    const int64_t bc = b * C + chunk_at(step);
    stage_m<NT, VEC>(m2s, a.m2 + bc * L * K, L, K, s.kp);
    if (has_p2) stage_cols<VT, NT, VEC>(p2s, a.p2 + bc * K * V + v0, K, V, nv);
    __pipeline_commit();
    const float d = a.decay[bc];
    __pipeline_wait_prior(1);  // M1_c, P1_c
    __syncthreads();

    store_tile<VT, NT>(a.zout + bc * K * V + v0, z, K, V, nv);

    // Phase 1: X = P1 + s1 M1 Z.
    for (int l0 = 0; l0 < L; l0 += G * kR1) {
      const int lb = l0 + g * kR1;
      if (lb >= L) break;
      const float* mrow[kR1];
#pragma unroll
      for (int i = 0; i < kR1; ++i) mrow[i] = m1s + min(lb + i, L - 1) * s.kp;
      float acc[kR1] = {};
      for (int k = 0; k < s.k8; k += 4) {
        const float z0 = z[(k + 0) * VT + tv], z1 = z[(k + 1) * VT + tv];
        const float z2 = z[(k + 2) * VT + tv], z3 = z[(k + 3) * VT + tv];
#pragma unroll
        for (int i = 0; i < kR1; ++i) {
          const float4 m = *reinterpret_cast<const float4*>(mrow[i] + k);
          acc[i] = fmaf(m.x, z0, acc[i]);
          acc[i] = fmaf(m.y, z1, acc[i]);
          acc[i] = fmaf(m.z, z2, acc[i]);
          acc[i] = fmaf(m.w, z3, acc[i]);
        }
      }
      float* xg = a.x + bc * L * V + v0 + tv;
#pragma unroll
      for (int i = 0; i < kR1; ++i) {
        const int l = lb + i;
        if (l < L) {
          const float val = fmaf(a.s1, acc[i], p1s[l * VT + tv]);
          xs[l * VT + tv] = val;
          if (tv < nv) xg[int64_t(l) * V] = val;
        }
      }
    }
    __syncthreads();  // X complete; M1/P1 buffers free

    if (step + 1 < C) {
      const int64_t bn = b * C + chunk_at(step + 1);
      stage_m<NT, VEC>(m1s, a.m1 + bn * L * K, L, K, s.kp);
      stage_cols<VT, NT, VEC>(p1s, a.p1 + bn * L * V + v0, L, V, nv);
    }
    __pipeline_commit();
    __pipeline_wait_prior(1);  // M2_c, P2_c
    __syncthreads();

    // Phase 2: Z = d Z + s2 M2^T X + P2 (each thread reads and writes only its own Z entries).
    for (int k0 = 0; k0 < s.k8; k0 += G * kR2) {
      const int kb = k0 + g * kR2;
      if (kb >= s.k8) break;
      float acc[kR2] = {};
      for (int l = 0; l < L; ++l) {
        const float xv = xs[l * VT + tv];
        const float* mr = m2s + l * s.kp + kb;
#pragma unroll
        for (int j = 0; j < kR2; j += 4) {
          const float4 m = *reinterpret_cast<const float4*>(mr + j);
          acc[j + 0] = fmaf(m.x, xv, acc[j + 0]);
          acc[j + 1] = fmaf(m.y, xv, acc[j + 1]);
          acc[j + 2] = fmaf(m.z, xv, acc[j + 2]);
          acc[j + 3] = fmaf(m.w, xv, acc[j + 3]);
        }
      }
#pragma unroll
      for (int i = 0; i < kR2; ++i) {
        const int idx = (kb + i) * VT + tv;
        float zn = fmaf(d, z[idx], a.s2 * acc[i]);
        if (has_p2) zn += p2s[idx];
        z[idx] = zn;
      }
    }
    __syncthreads();  // Z complete; M2/P2 buffers free
  }
  store_tile<VT, NT>(a.zfinal + b * K * V + v0, z, K, V, nv);
}

int max_smem_optin() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  return v;
}

int sm_count() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return std::max(v, 1);
}

size_t smem_bytes(int vt, int64_t L, int64_t K, bool has_p2) {
  return sizeof(float) * static_cast<size_t>(make_layout(vt, static_cast<int>(L), static_cast<int>(K), has_p2).total);
}

template <int VT, int NT, bool VEC>
cudaError_t launch_typed(const ChunkScanArgs& a, size_t bytes, cudaStream_t stream) {
  const auto kernel = chunk_scan_kernel<VT, NT, VEC>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  const int64_t blocks = a.bh * ((a.dv + VT - 1) / VT);
  kernel<<<static_cast<unsigned>(blocks), NT, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <int VT, int NT>
cudaError_t launch_vt(const ChunkScanArgs& a, size_t bytes, cudaStream_t stream) {
  const auto aligned = [](const float* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; };
  const bool vec = a.dk % 4 == 0 && a.dv % 4 == 0 && aligned(a.m1) && aligned(a.m2) && aligned(a.p1) && aligned(a.p2);
  return vec ? launch_typed<VT, NT, true>(a, bytes, stream) : launch_typed<VT, NT, false>(a, bytes, stream);
}

}  // namespace

bool chunk_state_scan_cuda_supported(int64_t chunk_len, int64_t dk) {
  if (chunk_len <= 0 || dk <= 0 || chunk_len > (1 << 16) || dk > (1 << 16)) return false;
  return smem_bytes(16, chunk_len, dk, /*has_p2=*/true) <= static_cast<size_t>(max_smem_optin());
}

cudaError_t chunk_state_scan_cuda(const ChunkScanArgs& a, cudaStream_t stream) {
  if (a.bh == 0 || a.dv == 0) return cudaSuccess;
  if (a.chunks <= 0 || a.dv < 0 || a.dv > (1 << 20) || !chunk_state_scan_cuda_supported(a.chunk_len, a.dk))
    return cudaErrorInvalidValue;
  const bool has_p2 = a.p2 != nullptr;
  const size_t optin = static_cast<size_t>(max_smem_optin());
  const int sms = sm_count();
  int vt = a.tile_v, nt = a.threads;
  if (vt == 0) {
    // The widest V-tile that still gives every SM a block (wider tiles re-read M1/M2 fewer times), else the
    // narrowest (most blocks); never wider than V needs.
    vt = 16;
    for (const int cand : {64, 32}) {
      if (a.dv <= cand / 2) continue;
      if (a.bh * ((a.dv + cand - 1) / cand) >= sms && smem_bytes(cand, a.chunk_len, a.dk, has_p2) <= optin) {
        vt = cand;
        break;
      }
    }
  }
  // At most one block per SM: twice the warps per block to hide the shared-memory latency of the sequential walk.
  if (nt == 0) nt = a.bh * ((a.dv + vt - 1) / vt) <= sms ? 512 : 256;
  if ((vt != 16 && vt != 32 && vt != 64) || (nt != 256 && nt != 512)) return cudaErrorInvalidValue;
  const size_t bytes = smem_bytes(vt, a.chunk_len, a.dk, has_p2);
  if (bytes > optin) return cudaErrorInvalidValue;
  switch (vt * 1000 + nt) {
    case 64256:
      return launch_vt<64, 256>(a, bytes, stream);
    case 64512:
      return launch_vt<64, 512>(a, bytes, stream);
    case 32256:
      return launch_vt<32, 256>(a, bytes, stream);
    case 32512:
      return launch_vt<32, 512>(a, bytes, stream);
    case 16256:
      return launch_vt<16, 256>(a, bytes, stream);
    default:
      return launch_vt<16, 512>(a, bytes, stream);
  }
}

}  // namespace ablate::kernels
