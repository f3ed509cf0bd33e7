// Optional per-step profile of a training run (--profile_steps N): LibTorch's Kineto profiler (CUPTI on CUDA)
// over N optimizer steps, then a table of where the time went and a Chrome trace.
//   <run_dir>/profile/trace.json   open in chrome://tracing or https://ui.perfetto.dev
//   <run_dir>/profile/summary.txt  the table printed to the log: CUDA kernels (or CPU ops on CPU) by total time,
//                                  with the device-busy fraction of the profiled wall time
// Profiling slows the profiled steps a little (CUPTI callbacks); their tokens/s is not representative.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <ostream>
#include <string>

namespace ablate::core {

class StepProfiler {
 public:
  // Profiles steps [first_step, first_step + num_steps); num_steps <= 0 disables it.
  StepProfiler(int64_t first_step, int64_t num_steps, std::filesystem::path out_dir, bool cuda);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  void before_step(int64_t step);
  // At the last profiled step: waits for the device, stops, writes the trace and prints the summary to `out`.
  void after_step(int64_t step, std::ostream& out);

 private:
  void finish(std::ostream& out);
  int64_t first_, last_;
  std::filesystem::path dir_;
  bool cuda_;
  bool active_ = false;
  double start_s_ = 0;
};

}  // namespace ablate::core
