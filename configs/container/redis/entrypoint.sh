#!/bin/sh
# Like the official image: other containers reach Redis on the compose network, so protected
# mode (loopback only while no password is set) is off unless the command sets it; the server
# runs as the redis user, owning /data.
set -eu
if [ "${1:-}" = redis-server ]; then
    case " $* " in
        *" --protected-mode "*) ;;
        *) set -- "$@" --protected-mode no ;;
    esac
    if [ "$(id -u)" = 0 ]; then
        chown redis:redis /data
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
