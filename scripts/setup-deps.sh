#!/usr/bin/env bash
# Installs what Ablate needs on a Debian 12 machine, and nothing that is already there.
#   - Debian packages: compilers, CMake, gRPC/protobuf, libpq + PostgreSQL server, Boost, yaml-cpp,
#     GoogleTest, nlohmann-json, CLI11, cpp-httplib, the text corpus (fortunes) used for training;
#     for the deployment tests a real Prometheus (+ promtool) and headless Chromium.
#   - Python venv .venv/ with LibTorch 2.11.0 (the torch==2.11.0 wheel; its CMake files are the C++ LibTorch)
#     and the deployment checkers (pyyaml, jsonschema, kubernetes-validate: offline Kubernetes schemas).
#     Set LIBTORCH_DIR to use your own LibTorch instead of the wheel.
# Idempotent: a second run checks, installs nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
DEB_PACKAGES=(
  build-essential cmake pkg-config git ca-certificates python3 python3-venv
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libpq-dev postgresql postgresql-contrib
  libboost-dev libyaml-cpp-dev libgtest-dev libgmock-dev nlohmann-json3-dev libcli11-dev libcpp-httplib-dev
  libssl-dev libsentencepiece-dev curl
  fortunes fortunes-min
  # deployment tests (tests/deploy)
  prometheus chromium fonts-dejavu-core
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-deps: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The Debian postgresql and prometheus packages may start system services; Ablate runs private instances.
else
  echo "setup-deps: Debian packages present"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup-deps: creating .venv"
  python3 -m venv .venv
fi
if [ -n "${LIBTORCH_DIR:-}" ]; then
  echo "setup-deps: using LIBTORCH_DIR=$LIBTORCH_DIR (no torch wheel)"
elif ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "setup-deps: installing torch==$TORCH_VERSION into .venv (LibTorch for the C++ build; large download)"
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet "torch==$TORCH_VERSION" numpy
  echo "setup-deps: LibTorch CMake prefix: $(.venv/bin/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
else
  echo "setup-deps: torch $TORCH_VERSION present in .venv"
fi
if ! .venv/bin/python -c "import yaml, jsonschema, kubernetes_validate" 2>/dev/null; then
  echo "setup-deps: installing pyyaml, jsonschema, kubernetes-validate into .venv (deploy checks)"
  .venv/bin/pip install --quiet pyyaml jsonschema kubernetes-validate
else
  echo "setup-deps: deploy check tools present"
fi

# CUDA toolkit (nvcc, cudart, nvrtc, NCCL...; no GPU needed). The torch wheel's CMake config (Caffe2Config.cmake)
# is a CUDA 13.0 build: it stops with "Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries"
# without the toolkit, even for the CPU build; and the ctest cuda_build compiles the CUDA build with its nvcc (it is
# skipped when there is none). Not installed here: NVIDIA's packages come from NVIDIA's own apt repository.
torch_has_cuda=0
if [ -n "${LIBTORCH_DIR:-}" ]; then
  ls "$LIBTORCH_DIR"/lib/libtorch_cuda.so >/dev/null 2>&1 && torch_has_cuda=1
elif .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  torch_has_cuda=1
fi
nvcc_found=""
for c in "${CUDACXX:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then nvcc_found=$c; break; fi
done
if [ -n "$nvcc_found" ]; then
  echo "setup-deps: CUDA toolkit present ($nvcc_found)"
elif [ "$torch_has_cuda" = 1 ]; then
  cat >&2 <<'MSG'
setup-deps: WARNING: no CUDA toolkit (no nvcc in $CUDACXX, $CUDA_HOME/bin, /usr/local/cuda/bin or PATH).
  LibTorch 2.11.0+cu130's CMake config needs CUDA 13.0 (nvcc, cudart, nvrtc, nvtx, cuBLAS/cuFFT/cuRAND/cuSOLVER/
  cuSPARSE) even for the CPU build, and the ctest cuda_build needs it and NCCL. On Debian 12, as root:
    curl -fsSLO https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb
    dpkg -i cuda-keyring_1.1-1_all.deb && apt-get update
    apt-get install -y cuda-toolkit-13-0 libnccl-dev    # installs to /usr/local/cuda
  or point LIBTORCH_DIR at a CPU-only LibTorch (the CUDA build check is then skipped).
MSG
else
  echo "setup-deps: no CUDA toolkit and a CPU-only LibTorch: the CUDA build check (ctest cuda_build) will be skipped"
fi
