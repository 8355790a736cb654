#!/bin/sh
# Makes the data directory on first start, then runs MariaDB with every
# *.sql file of /docker-entrypoint-initdb.d as its init file (the official
# image also runs *.sh and *.sql.gz there; the lab mounts one .sql).
set -eu
datadir=/var/lib/mysql
# The marker is written only once the install has finished: a first start
# that failed halfway is redone, not mistaken for a ready data directory.
if [ ! -f "$datadir/.lab-installed" ]; then
    rm -rf "${datadir:?}"/*
    mariadb-install-db --datadir="$datadir" --auth-root-authentication-method=socket \
        --skip-test-db >/dev/null
    touch "$datadir/.lab-installed"
fi
init=/tmp/init.sql
: > "$init"
for sql in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$sql" ] || continue
    # An unreadable file stops the start here, loudly: without it the server
    # would come up without the lab's user.
    cat "$sql" >> "$init"
done
exec mariadbd --datadir="$datadir" --bind-address=0.0.0.0 --port=3306 \
    --socket=/run/mysqld/mysqld.sock --init-file="$init" "$@"
