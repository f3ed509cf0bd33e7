#!/usr/bin/env bash
# The ctest `cuda_build` (label build): proves that the CUDA build (-DABLATE_WITH_CUDA=ON) compiles and links on a
# machine without a GPU. Configures its own build directory (kept between runs, so a second run only rebuilds
# what changed) and builds every .cu file (ablate_kernels), every CUDA-conditional .cpp (core/ops, core/mixers,
# core/optim, core/dist's NCCL communicator, core/train.cpp; all inside ablate-train), ablate-train itself, the
# *_gpu_test executables (they skip at run time without a GPU) and the benches.
# Exit: 0 built; 1 a configure, compile or link error (the first errors are printed); 77 skipped (no nvcc, or a
# LibTorch without CUDA), with the reason.
#
#   tests/build/cuda_build.sh --source DIR --build DIR [--prefix-path 'a;b'] [--cuda-compiler NVCC]
#                             [--torch-cuda 0|1] [--arch 90] [--jobs N]
# Env: ABLATE_CUDA_BUILD_TARGETS="t1 t2 ..." builds only those targets.
set -uo pipefail

SRC="" BLD="" PREFIX="" NVCC="" TORCH_CUDA=1 ARCH=90 JOBS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --source) SRC=$2; shift 2 ;;
    --build) BLD=$2; shift 2 ;;
    --prefix-path) PREFIX=$2; shift 2 ;;
    --cuda-compiler) NVCC=$2; shift 2 ;;
    --torch-cuda) TORCH_CUDA=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    *) echo "cuda_build: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$SRC" ] && [ -n "$BLD" ] || { echo "cuda_build: --source and --build are required" >&2; exit 2; }
JOBS=${JOBS:-$(nproc)}
SKIP=77

if [ "$TORCH_CUDA" != 1 ]; then
  echo "cuda_build: SKIPPED: the LibTorch of this build has no CUDA (torch_cuda missing; a CPU-only LIBTORCH_DIR?)."
  echo "cuda_build: the CUDA build needs a CUDA LibTorch, e.g. the torch==2.11.0 cu130 wheel of scripts/setup-deps.sh."
  exit $SKIP
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  NVCC=$(command -v nvcc || true)
  [ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; }
fi
if [ -z "$NVCC" ]; then
  echo "cuda_build: SKIPPED: no nvcc (not in the main build's CMAKE_CUDA_COMPILER, on PATH, or /usr/local/cuda/bin)."
  echo "cuda_build: install the CUDA 13.0 toolkit (nvcc, cudart, NCCL) under /usr/local/cuda to run this check."
  exit $SKIP
fi

# The top CMakeLists.txt derives LibTorch's TORCH_CUDA_ARCH_LIST from ABLATE_CUDA_ARCHITECTURES unless it is set.
unset TORCH_CUDA_ARCH_LIST
# The build type stays RelWithDebInfo (the same -DNDEBUG preprocessor paths as the real CUDA build) but host C++ is
# compiled at -O0 without debug info: this checks that everything compiles and links, and takes about half the time.
# nvcc keeps its flags. Tests are discovered when ctest runs them (PRE_TEST), so no GPU binary runs at build time.
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
ARGS=("${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DABLATE_WITH_CUDA=ON -DABLATE_BUILD_CONTROL_PLANE=OFF
      -DABLATE_BUILD_TESTS=ON -DABLATE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_COMPILER="$NVCC"
      -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST
      "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O0 -DNDEBUG")
mkdir -p "$BLD"
LOG="$BLD/cuda_build.log"

# One run at a time per build directory (two ctest runs in the same tree would otherwise corrupt it).
exec 9>"$BLD/.lock"
flock 9
: >"$LOG"

# Print where it failed: the first compiler/linker errors, then the end of the log.
fail() {
  echo "cuda_build: FAILED: $1 (full log: $LOG)"
  echo "---- first errors ----"
  grep -n -E "error|Error|undefined reference|FAILED:|fatal" "$LOG" | grep -v -E "^[0-9]+:-- " | head -40
  echo "---- last 60 lines of the log ----"
  tail -n 60 "$LOG"
  exit 1
}

# Configure once; again only when the arguments changed (or the cache is gone). cmake --build reconfigures by
# itself when a CMakeLists.txt changes.
STAMP="$BLD/.cuda_build.args"
WANT=$(printf '%s\n' "$SRC" "${ARGS[@]}")
if [ ! -f "$BLD/CMakeCache.txt" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  rm -f "$STAMP"
  echo "cuda_build: configuring $BLD (${GEN[*]:-Unix Makefiles}, sm_$ARCH, nvcc $NVCC)"
  if ! cmake -S "$SRC" -B "$BLD" "${ARGS[@]}" >>"$LOG" 2>&1; then
    fail "configure"
  fi
  printf '%s' "$WANT" >"$STAMP"
fi

if [ -n "${ABLATE_CUDA_BUILD_TARGETS:-}" ]; then
  read -r -a TARGETS <<<"$ABLATE_CUDA_BUILD_TARGETS"
else
  TARGETS=(ablate_kernels ablate-train)
  # Every *_gpu_test executable and the benches this configuration defines.
  mapfile -t EXTRA < <(cmake --build "$BLD" --target help 2>/dev/null \
    | sed -E 's/^\.\.\. //; s/:.*$//' | grep -E '^[A-Za-z0-9_.-]+$' \
    | grep -E '_gpu_test$|^(kernels_bench|mixer_bench|optim_bench)$' | sort -u)
  TARGETS+=("${EXTRA[@]}")
fi
echo "cuda_build: building ${TARGETS[*]} (-j $JOBS)"
start=$(date +%s)
if ! cmake --build "$BLD" -j "$JOBS" --target "${TARGETS[@]}" >>"$LOG" 2>&1; then
  fail "build"
fi
cus=$(find "$BLD/kernels" -name '*.cu.o' | wc -l)
# Every .cu file of the repository (git's list; kernels/*.cu outside a checkout) should have its object now.
mapfile -t CUS < <(git -C "$SRC" ls-files '*.cu' 2>/dev/null || (cd "$SRC" && ls kernels/*.cu))
for cu in "${CUS[@]}"; do
  find "$BLD/$(dirname "$cu")" -name "$(basename "$cu").o" 2>/dev/null | grep -q . \
    || echo "cuda_build: WARNING: $cu is not compiled by the CUDA build (missing from its CMakeLists.txt?)"
done
echo "cuda_build: OK in $(( $(date +%s) - start )) s: ${#TARGETS[@]} targets, $cus CUDA objects (log: $LOG)"
