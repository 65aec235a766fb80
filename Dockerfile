# syntax=docker/dockerfile:1
# The operator's image: a release build in the Rust image, copied into distroless (glibc for
# aws-lc, Mozilla's CA roots in /etc/ssl/certs for the AWS endpoints and HTTPS sinks, no shell,
# no package manager). Runs as uid/gid 65532, which the chart and deploy/ also set.
#
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t thing-operator:0.1.0 .
#
# tests/container.rs checks what can be checked without a container engine.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Named in `thing-operator version` and the thing_operator_build_info metric.
ARG GIT_COMMIT=unknown
ENV THING_OPERATOR_GIT_COMMIT=${GIT_COMMIT}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin thing-operator \
    && install -D -m 0755 target/release/thing-operator /out/thing-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/thing-operator /usr/local/bin/thing-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/thing-operator"]
CMD ["run"]
