#!/usr/bin/env bash
# Runs on the GPU machine (the device tool): builds the engine with CUDA, runs every engine test there
# (GPU cases included), and trains the demo model on the GPU. Writes logs under $OUT (or ./gpu-out).
#   needs: .deps/*.deb (CLI11, nlohmann-json, GoogleTest, fortunes from Debian: `apt-get download` them here),
#          data/fortunes (make demo or `ablate-train prepare-data` makes it)
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/deps && for f in .deps/*.deb; do dpkg -x "$f" /tmp/deps; done
# The training tests read the real corpus at its Debian path; the GPU image has no Debian packages.
if [ ! -d /usr/share/games/fortunes ]; then mkdir -p /usr/share/games && ln -s /tmp/deps/usr/share/games/fortunes /usr/share/games/fortunes; fi
torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/summary.txt"
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DABLATE_WITH_CUDA=ON -DABLATE_BUILD_CONTROL_PLANE=OFF \
  -DABLATE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$torch_prefix;/tmp/deps/usr" > "$out/configure.log" 2>&1 \
  || { log "configure FAILED"; tail -30 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j 16 > "$out/build.log" 2>&1 || { log "build FAILED"; grep -m20 -B2 -A10 'error' "$out/build.log"; exit 1; }
log "build ok in $(( $(date +%s) - t0 ))s"
(cd build-gpu && ctest --output-on-failure -j 4 --timeout 600 ${CTEST_ARGS:-}) > "$out/ctest.log" 2>&1; rc=$?
log "ctest rc=$rc: $(grep -E 'tests passed|tests failed' "$out/ctest.log")"
grep -E 'Skipped|Failed|\*\*\*' "$out/ctest.log" | head -40 | tee -a "$out/summary.txt"
shift 0
for cmd in "$@"; do
  log "$cmd"
  bash -c "$cmd" >> "$out/extra.log" 2>&1; log "rc=$?"; tail -5 "$out/extra.log" | tee -a "$out/summary.txt"
done
