# Stand-in for the official haproxy image, from Debian's haproxy (the one
# `labctl up` runs natively). docker-compose.yml mounts the config under
# /usr/local/etc/haproxy and checks health with bash.
ARG DEBIAN_VERSION=bookworm
FROM debian:${DEBIAN_VERSION}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/*
USER haproxy
