# syntax=docker/dockerfile:1
# memOS: one binary, `memos`, built from the workspace (package -p memos).
#   docker build -t memos:dev .        (docker-compose.yml does this for you)

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# rdkafka builds librdkafka from source: needs make and a C toolchain (already
# in the rust image) plus zlib and OpenSSL headers (SASL/SCRAM and TLS) and pkg-config.
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config zlib1g-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out of the cached target dir within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p memos \
 && install -D -m 0755 target/release/memos /out/memos

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin memos
COPY --from=builder /out/memos /usr/local/bin/memos
USER memos
ENV MEMOS_KAFKA_BROKERS=kafka:9092 \
    DATABASE_URL=postgres://memos@postgres:5432/memos \
    REDIS_URL=redis://redis:6379/ \
    MEMOS__HTTP__BIND=0.0.0.0:8080
EXPOSE 8080
CMD ["memos", "run", "all"]
