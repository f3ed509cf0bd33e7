# syntax=docker/dockerfile:1.7
# ablate-scheduler (and the ablate CLI, for CronJob schedules and the migration hook): a small runtime image
# without CUDA or LibTorch. Build from the repository root:
#   docker build -f deploy/docker/scheduler.Dockerfile -t ablate-scheduler:dev .
# Base images are pinned to a Debian point release; pin the digest too in your registry mirror
# (docker buildx imagetools inspect debian:12.8-slim).

FROM debian:12.8-slim AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config ca-certificates \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libpq-dev libboost-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libcpp-httplib-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY CMakeLists.txt ./
COPY proto/ proto/
COPY scheduler/ scheduler/
COPY worker/ worker/
COPY cli/ cli/
COPY kernels/ kernels/
RUN cmake -S . -B /build -DCMAKE_BUILD_TYPE=Release -DABLATE_BUILD_ENGINE=OFF -DABLATE_BUILD_TESTS=OFF \
 && cmake --build /build -j"$(nproc)" --target ablate-scheduler ablate \
 && strip /build/bin/ablate-scheduler /build/bin/ablate

FROM debian:12.8-slim
ARG DEBIAN_FRONTEND=noninteractive
# Runtime libraries only (what ldd of the two binaries resolves to on Debian 12).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libpq5 libyaml-cpp0.7 \
      libcpp-httplib0.11 libssl3 libre2-9 libc-ares2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 ablate \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin ablate
COPY --from=build /build/bin/ablate-scheduler /build/bin/ablate /usr/local/bin/
# The database DSN comes from the environment (ABLATE_DB, from a Secret), never from the image.
ENV ABLATE_LISTEN=0.0.0.0:50051 \
    ABLATE_METRICS_LISTEN=0.0.0.0:9464
EXPOSE 50051 9464
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ablate-scheduler"]
CMD ["serve", "--no_migrate"]
