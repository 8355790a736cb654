# Stand-in for the official mysql image, from Debian's MariaDB (the server
# `labctl up` runs natively). It keeps the contract docker-compose.yml uses:
# port 3306, mysqladmin for the healthcheck, and the SQL files mounted in
# /docker-entrypoint-initdb.d — run here at every start with --init-file,
# as `labctl up` does (init.sql is written to be run again); other kinds
# of init file the official image takes (*.sh, *.sql.gz) are not run. Root has no
# password and is reachable only through the container's own socket;
# MYSQL_ROOT_PASSWORD is ignored.
ARG DEBIAN_VERSION=bookworm
FROM debian:${DEBIAN_VERSION}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends mariadb-server mariadb-client \
    && rm -rf /var/lib/apt/lists/* /var/lib/mysql/* \
    && mkdir -p /docker-entrypoint-initdb.d /run/mysqld \
    && chown mysql:mysql /var/lib/mysql /run/mysqld
COPY deploy/docker/local/mysql-entrypoint.sh /usr/local/bin/mysql-entrypoint.sh
USER mysql
# As in the official image: the data outlives a recreated container until
# `down -v`.
VOLUME /var/lib/mysql
EXPOSE 3306
ENTRYPOINT ["/usr/local/bin/mysql-entrypoint.sh"]
