# syntax=docker/dockerfile:1
#
# Release images of the four services, built from one workspace:
#   docker build --target order-service -t outbox/order-service .
#   docker build --target relay -t outbox/relay .
#   docker build --target inventory-consumer -t outbox/inventory-consumer .
#   docker build --target order-feed -t outbox/order-feed .
# The default (last) stage holds all four binaries.
#
# No database is needed at build time: statements are checked against the descriptions in
# .sqlx/ (SQLX_OFFLINE; see scripts/sqlx-prepare), and migrations are embedded from
# migrations/ by `sqlx::migrate!`.

# The builder and the runtime must share a Debian release, or the binaries may need a newer
# glibc than the runtime has.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /app
# Debug info is for local profiling; images ship without it (symbols stay for backtraces).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_TERM_COLOR=never \
    SQLX_OFFLINE=true

# The recipe only lists manifests and the lock file, so it (and the dependency layer below)
# changes only when dependencies do. Copying the whole context keeps new workspace members
# (crates/, services/, tools/, ...) in the build without editing this file.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
# Dependencies only, for the same binaries as below: another selection would resolve other
# features and rebuild shared dependencies in the next step.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    --bin order-service --bin relay --bin inventory-consumer --bin order-feed
COPY . .
RUN cargo build --release --locked --bin order-service --bin relay --bin inventory-consumer --bin order-feed \
 && mkdir -p /out \
 && cp target/release/order-service target/release/relay target/release/inventory-consumer \
       target/release/order-feed /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# curl is what the compose health checks use to probe /readyz. Packages are not pinned: the
# release's security updates should land with each rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
# Numeric, so orchestrators can verify the user is not root without reading /etc/passwd.
USER 10001:10001
ENV RUST_LOG=info \
    LOG_FORMAT=text

FROM runtime AS order-service
COPY --from=builder /out/order-service /usr/local/bin/order-service
ENV HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/order-service"]

FROM runtime AS relay
COPY --from=builder /out/relay /usr/local/bin/relay
ENV HTTP_ADDR=0.0.0.0:9100
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/relay"]

FROM runtime AS inventory-consumer
COPY --from=builder /out/inventory-consumer /usr/local/bin/inventory-consumer
ENV HTTP_ADDR=0.0.0.0:8081
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/inventory-consumer"]

FROM runtime AS order-feed
COPY --from=builder /out/order-feed /usr/local/bin/order-feed
ENV HTTP_ADDR=0.0.0.0:8082
EXPOSE 8082
ENTRYPOINT ["/usr/local/bin/order-feed"]

FROM runtime AS all
COPY --from=builder /out/ /usr/local/bin/
