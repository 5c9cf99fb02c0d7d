#!/bin/sh
# Like the official image's entrypoint: on the first start (empty $PGDATA) create the cluster
# with POSTGRES_USER as its superuser, password POSTGRES_PASSWORD (scram-sha-256 over TCP),
# and the database POSTGRES_DB; then run the command as the postgres user.
set -eu
if [ "${1:-}" = postgres ]; then
    if [ "$(id -u)" = 0 ]; then
        install -d -o postgres -g postgres -m 0700 "$PGDATA"
        install -d -o postgres -g postgres -m 2775 /var/run/postgresql
        exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
    fi
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
        user=${POSTGRES_USER:-postgres}
        db=${POSTGRES_DB:-$user}
        pwfile=$(mktemp)
        printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
        initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=scram-sha-256 >/dev/null
        rm -f "$pwfile"
        echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
        echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
        if [ "$db" != postgres ]; then
            printf 'CREATE DATABASE "%s";\n' "$db" | postgres --single -j -D "$PGDATA" postgres >/dev/null
        fi
        echo "postgres-entrypoint: cluster created in $PGDATA (user $user, database $db)"
    fi
fi
exec "$@"
