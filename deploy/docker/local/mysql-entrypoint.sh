#!/bin/sh
# Makes the data directory on first start, then runs MariaDB with every
# SQL file of /docker-entrypoint-initdb.d as its init file.
set -eu
datadir=/var/lib/mysql
if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --datadir="$datadir" --auth-root-authentication-method=socket \
        --skip-test-db >/dev/null
fi
init=/tmp/init.sql
cat /docker-entrypoint-initdb.d/*.sql > "$init" 2>/dev/null || : > "$init"
exec mariadbd --datadir="$datadir" --bind-address=0.0.0.0 --port=3306 \
    --socket=/run/mysqld/mysqld.sock --init-file="$init" "$@"
