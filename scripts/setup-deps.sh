#!/usr/bin/env bash
# Installs what Ablate needs on a Debian 12 machine, and nothing that is already there.
#   - Debian packages: compilers, CMake, gRPC/protobuf, libpq + PostgreSQL server, Boost, yaml-cpp,
#     GoogleTest, nlohmann-json, CLI11, cpp-httplib, the text corpus (fortunes) used for training.
#   - LibTorch 2.11.0: from the torch==2.11.0 wheel into the project-local virtualenv .venv/.
#     Set LIBTORCH_DIR (or put a LibTorch in CMAKE_PREFIX_PATH) to use your own instead.
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
  # The Debian postgresql package starts a system cluster; Ablate runs its own private clusters instead.
else
  echo "setup-deps: Debian packages present"
fi

if [ -n "${LIBTORCH_DIR:-}" ]; then
  echo "setup-deps: using LIBTORCH_DIR=$LIBTORCH_DIR"
  exit 0
fi

PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup-deps: creating .venv"
  # Prefer a system python with venv; pyenv pythons work too.
  $PY -m venv .venv
fi
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "setup-deps: installing torch==$TORCH_VERSION into .venv (LibTorch for the C++ build; large download)"
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet "torch==$TORCH_VERSION" numpy
else
  echo "setup-deps: torch $TORCH_VERSION present in .venv"
fi
echo "setup-deps: LibTorch CMake prefix: $(.venv/bin/python -c 'import torch;print(torch.utils.cmake_prefix_path)')"

# --- Deployment checks (tests/deploy): a real Prometheus + promtool, headless Chromium for the report screenshot,
# and Python checkers in .venv (pyyaml, jsonschema, kubernetes-validate: offline Kubernetes schemas).
DEPLOY_DEB_PACKAGES=(prometheus chromium fonts-dejavu-core)
missing=()
for p in "${DEPLOY_DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-deps: installing Debian packages for the deploy tests: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! .venv/bin/python -c "import yaml, jsonschema, kubernetes_validate" 2>/dev/null; then
  echo "setup-deps: installing pyyaml, jsonschema, kubernetes-validate into .venv (deploy checks)"
  .venv/bin/pip install --quiet pyyaml jsonschema kubernetes-validate
else
  echo "setup-deps: deploy check tools present"
fi
