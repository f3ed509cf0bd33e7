# Thin wrapper over CMake/CTest: the README's two commands.
#   make demo   install what is missing, build, start a local stack, run examples/demo-sweep.yaml
#   make test   install what is missing, build, run every test (ctest)
BUILD_DIR  ?= build
JOBS       ?= $(shell nproc)
CMAKE_ARGS ?=
CTEST_ARGS ?=

TORCH_PREFIX = $(if $(LIBTORCH_DIR),$(LIBTORCH_DIR),$(shell [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch;print(torch.utils.cmake_prefix_path)' 2>/dev/null))

.PHONY: all deps configure build test demo clean cuda-build

all: build

deps:
	@scripts/setup-deps.sh

configure: deps
	@cmake -S . -B $(BUILD_DIR) -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" $(CMAKE_ARGS) > $(BUILD_DIR).configure.log 2>&1 \
	  || (cat $(BUILD_DIR).configure.log; exit 1)

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure $(CTEST_ARGS)

demo: build
	@scripts/demo.sh $(BUILD_DIR)

# The CUDA build (compiles on machines without a GPU when nvcc is present).
cuda-build: deps
	@cmake -S . -B build-cuda -DABLATE_WITH_CUDA=ON -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" $(CMAKE_ARGS)
	@cmake --build build-cuda -j $(JOBS)

clean:
	rm -rf $(BUILD_DIR) build-cuda $(BUILD_DIR).configure.log
