# Tollgate container image: build with the production profile, run as a non-root user with the
# config and the store on volumes.
#   docker build -t tollgate .
#   docker run -p 8080:8080 -p 9090:9090 -v tollgate-data:/var/lib/tollgate tollgate   # the demo
# Your own config: -v "$PWD/tollgate.toml:/etc/tollgate/tollgate.toml:ro", with
# [store] path = "/var/lib/tollgate", [docs] dir = "/usr/share/tollgate/docs" and listen
# addresses on 0.0.0.0. The demo config's users have published passwords: not for production.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY vendor ./vendor
RUN cargo build --profile production --locked --bin tollgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/tollgate --shell /usr/sbin/nologin tollgate \
    && mkdir -p /etc/tollgate /var/lib/tollgate /usr/share/tollgate/docs \
    && chown tollgate:tollgate /var/lib/tollgate && chmod 0700 /var/lib/tollgate
COPY --from=build /src/target/production/tollgate /usr/local/bin/tollgate
COPY config/default.toml /etc/tollgate/tollgate.toml
COPY docs/ /usr/share/tollgate/docs/
# The image's default config keeps the demo setup but puts the store and docs where the
# volumes are and listens on all interfaces; mount your own /etc/tollgate/tollgate.toml.
RUN sed -i -e 's#^path = "../data"#path = "/var/lib/tollgate"#' \
           -e 's#^dir = "../docs"#dir = "/usr/share/tollgate/docs"#' \
           -e 's#^listen = "127.0.0.1:8080"#listen = "0.0.0.0:8080"#' \
           -e 's#^listen = "127.0.0.1:9090"#listen = "0.0.0.0:9090"#' /etc/tollgate/tollgate.toml
USER tollgate
VOLUME ["/etc/tollgate", "/var/lib/tollgate"]
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
