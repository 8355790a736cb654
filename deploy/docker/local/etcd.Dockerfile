# Stand-in for quay.io/coreos/etcd, from Debian's etcd-server and
# etcd-client (3.4: the v3 API the lab uses, and the flags
# docker-compose.yml passes).
ARG DEBIAN_VERSION=bookworm
FROM debian:${DEBIAN_VERSION}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends etcd-server etcd-client \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /etcd-data && chown 10002:10002 /etcd-data
USER 10002:10002
EXPOSE 2379
