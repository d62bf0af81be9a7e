#!/bin/bash
# Everything the tests need on a fresh Debian/Ubuntu machine (run as root, or with sudo):
# OpenSSH's sshd and client, iptables (a ProxyJump chain test) for the integration tests, git,
# rsync and task-spooler for the benchmarks,
# and rtrain itself with its Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=""
for pair in sshd:openssh-server ssh:openssh-client git:git rsync:rsync tsp:task-spooler iptables:iptables unshare:util-linux; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need="$need $pkg"
done
if [ -n "$need" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq $need >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
