# syntax=docker/dockerfile:1.7
# ablate-worker + ablate-train on NVIDIA's PyTorch container (CUDA, cuDNN, NCCL and LibTorch included); the
# engine is built against that image's LibTorch (torch.utils.cmake_prefix_path), not a pip wheel.
# 25.01 is Ubuntu 24.04: the same gRPC 1.51 / protobuf 3.21 as Debian 12. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t ablate-worker:dev .
# Pin the digest too in your registry mirror (docker buildx imagetools inspect nvcr.io/nvidia/pytorch:25.01-py3).

FROM nvcr.io/nvidia/pytorch:25.01-py3 AS build
ARG DEBIAN_FRONTEND=noninteractive
ARG CUDA_ARCHS="80;90"
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      cmake pkg-config libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libboost-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libcpp-httplib-dev libssl-dev libpq-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY proto/ proto/
COPY scheduler/ scheduler/
COPY worker/ worker/
COPY cli/ cli/
COPY core/ core/
COPY kernels/ kernels/
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DABLATE_WITH_CUDA=ON \
      -DABLATE_CUDA_ARCHITECTURES="${CUDA_ARCHS}" -DABLATE_BUILD_TESTS=OFF \
      -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
 && cmake --build /build -j"$(nproc)" --target ablate-worker ablate-train \
 && strip /build/bin/ablate-worker

FROM nvcr.io/nvidia/pytorch:25.01-py3
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libgrpc++1.51t64 libprotobuf32t64 libabsl20220623t64 libyaml-cpp0.8 libcpp-httplib0.14 fortunes-min \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 ablate \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/ablate --shell /usr/sbin/nologin ablate \
 && mkdir -p /var/lib/ablate/data /var/lib/ablate/work \
 && chown -R 65532:65532 /var/lib/ablate
COPY --from=build /build/bin/ablate-worker /build/bin/ablate-train /usr/local/bin/
EXPOSE 9465
USER 65532:65532
WORKDIR /var/lib/ablate
ENTRYPOINT ["/usr/local/bin/ablate-worker"]
CMD ["--data_root", "/var/lib/ablate/data", "--work_dir", "/var/lib/ablate/work", "--metrics_listen", "0.0.0.0:9465"]
