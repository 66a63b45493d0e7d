# The worker as an image: built in the official Rust image, run by an
# unprivileged user in a slim Debian of the same release (the same glibc)
# with nothing beside the binary but CA certificates.
#
#   docker build -t training-credits .
#   docker run --rm -p 9090:9090 -e AMQP_URL=amqp://guest:guest@HOST:5672/%2f training-credits
#
# `docker compose --profile system up` builds it too (docker-compose.yml).

# Edition 2024 needs Rust 1.85 or later.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /build

# The dependencies first, in a layer of their own, built against an empty
# crate: it is built again only when Cargo.toml or Cargo.lock change, not on
# every change of the sources. `.cargo/config.toml` holds the flags the
# bundled SQLite is compiled with.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin training-credits \
    && rm -rf src

# What the crate compiles in: the sources, the JSON Schemas, the email
# templates, the migrations and the OpenAPI document.
COPY src src
COPY schemas schemas
COPY templates templates
COPY migrations migrations
COPY openapi.json ./
# COPY keeps the files' times, older than the empty crate's build: without
# the touch, cargo judges that build fresh and ships an empty program.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin training-credits \
    && cp target/release/training-credits /usr/local/bin/training-credits

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates follows the release's security updates rather than a pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 training-credits \
    && useradd --system --uid 10001 --gid 10001 --no-log-init \
        --home-dir /var/lib/training-credits --create-home --shell /usr/sbin/nologin \
        training-credits
COPY --from=builder /usr/local/bin/training-credits /usr/local/bin/training-credits

USER 10001:10001
WORKDIR /var/lib/training-credits
# Defaults for a container: listen on every interface, keep the SQLite
# ledger, the .eml files and the reports in the volume. AMQP_URL (and
# DATABASE_URL for PostgreSQL, SMTP_URL for a mail server) come from the
# deployment; see the README's table of variables.
ENV HTTP_ADDR=0.0.0.0:9090 \
    DATABASE_URL=sqlite:///var/lib/training-credits/training-credits.db \
    MAIL_DIR=/var/lib/training-credits/mail \
    REPORTS_DIR=/var/lib/training-credits/reports \
    LOG_FORMAT=json \
    RUST_LOG=info
VOLUME ["/var/lib/training-credits"]
EXPOSE 9090

# Ready: the database answers, the broker is connected, the consumer runs
# (`GET /readyz`). Bash's /dev/tcp asks, so the image needs no HTTP client.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>\"/dev/tcp/127.0.0.1/${HTTP_ADDR##*:}\" && printf 'GET /readyz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# SIGTERM (docker stop) makes the worker finish the batch in hand and stop.
ENTRYPOINT ["training-credits"]
CMD ["run"]
