#!/bin/sh
# Start the try-it tower's sshd in the foreground (see docker/Dockerfile).
set -eu
if [ -n "${AUTHORIZED_KEYS:-}" ]; then
  printf '%s\n' "$AUTHORIZED_KEYS" > "/etc/ssh/authkeys/$TOWER_USER"
  chmod 0644 "/etc/ssh/authkeys/$TOWER_USER"
fi
exec /usr/sbin/sshd -D -e -p "$PORT" -o "ListenAddress=$LISTEN"
