# syntax=docker/dockerfile:1
#
# api-key-server on Cloud Run: a two-stage build.
#
# The builder is Debian 13 (trixie), the same glibc as the runtime image
# (distroless/cc-debian13): a binary linked against a newer glibc would not start there.
# The runtime image holds the binary, glibc, libgcc and the CA certificates, nothing
# else: no shell, no package manager, and it runs as the unprivileged `nonroot` user
# (uid 65532). Keys arrive as environment variables from Secret Manager at deploy time;
# nothing secret is ever copied into either stage.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-trixie AS build
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. The placeholder sources are removed with
# their build outputs so the real crate is always compiled afresh below.
# The manifest also names the benchmark targets (benches/, bench/loadgen.rs); cargo
# refuses a manifest whose targets are missing, so they get placeholders that stay for
# both builds (only the binary is built).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches bench \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/hot_path.rs \
 && echo 'fn main() {}' > bench/loadgen.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src \
      target/release/api-key-server* \
      target/release/.fingerprint/api-key-server-* \
      target/release/deps/api_key_server-* \
      target/release/deps/libapi_key_server-*

# The crate itself. `touch` because COPY keeps the sources' modification times, which
# can be older than the placeholder build and would make cargo skip the real one.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -m 0755 target/release/api-key-server /api-key-server
# (The release profile strips symbols: `strip = true` in Cargo.toml.)

FROM gcr.io/distroless/cc-debian13:nonroot

COPY --from=build /api-key-server /usr/local/bin/api-key-server

# Cloud Run sets PORT itself; the default here is for `docker run` elsewhere.
ENV PORT=8080
EXPOSE 8080
USER nonroot:nonroot

# Exec form: the binary is PID 1 and receives SIGTERM directly (there is no shell).
ENTRYPOINT ["/usr/local/bin/api-key-server"]
CMD ["serve"]
