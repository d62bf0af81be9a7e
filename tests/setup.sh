#!/bin/bash
# Everything the tests need on a fresh Debian/Ubuntu machine (run as root, or with sudo):
# OpenSSH's sshd and client and iptables (a ProxyJump chain test) for the integration tests, git,
# rsync and task-spooler for the benchmarks,
# Slurm (slurmctld, slurmd, its client commands) and munge for the Slurm tests, container engines
# (docker, rootless podman, mmdebstrap for the base image) for the container tests, and rtrain
# itself with its Python dependencies (and ruff, the linter .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=""
for pair in sshd:openssh-server ssh:openssh-client git:git rsync:rsync tsp:task-spooler \
            iptables:iptables unshare:util-linux \
            slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need="$need $pkg"
done
# rtrain.yaml's `setup:` makes venvs with the host's `python3 -m venv` (Debian: python3-venv)
python3_sys=$(PATH=/usr/local/bin:/usr/bin:/bin command -v python3 || true)
[ -z "$python3_sys" ] || "$python3_sys" -c 'import ensurepip' 2>/dev/null || need="$need python3-venv"
# The container tests (tests/integration/containers): a private dockerd (docker.io, which brings
# runc and tini), rootless podman (podman + uidmap; with runc already there it takes no crun),
# and mmdebstrap to make their Debian base image without a registry. No recommends: they would
# bring apparmor, buildah, slirp4netns... that the tests do not use.
ctr=""
for pair in dockerd:docker.io podman:podman newuidmap:uidmap mmdebstrap:mmdebstrap eatmydata:eatmydata; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || ctr="$ctr $pkg"
done
if [ -n "$need$ctr" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  [ -z "$need" ] || $SUDO apt-get install -y -qq $need >/dev/null
  [ -z "$ctr" ] || $SUDO apt-get install -y -qq --no-install-recommends $ctr >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
