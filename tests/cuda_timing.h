// The GPU tests' Timing* cases: median milliseconds of a callable, timed with CUDA events on the current stream.
#pragma once
#if ABLATE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

namespace ablate::gpu_test {

// Median of fn's time over reps runs, after `warmup` untimed runs (first-call allocations, autotuning).
inline double median_cuda_ms(const std::function<void()>& fn, int reps = 20, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(e0, stream);
    fn();
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float t = 0.f;
    cudaEventElapsedTime(&t, e0, e1);
    ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace ablate::gpu_test
#endif
