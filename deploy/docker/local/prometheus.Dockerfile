# Stand-in for prom/prometheus, from Debian's prometheus. docker-compose.yml
# passes only flags, as to the official image's entrypoint, and checks
# readiness with wget.
ARG DEBIAN_VERSION=bookworm
FROM debian:${DEBIAN_VERSION}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
# As in the official image.
VOLUME /prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus", "--storage.tsdb.path=/prometheus"]
