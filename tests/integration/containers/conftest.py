"""Session fixtures for the container tests: a private dockerd, the locally made Debian 12 base
image (tests/containers.py), rootless podman as a test user, and the try-it tower image of
docker/ built from that base. Each one that cannot start skips locally and fails in CI."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import containers as ct
from support import REPO, USER_TAG, need

TOWER_IMAGE = "rtrain-test/tower:latest"


@pytest.fixture(scope="session")
def dockerd():
    need(ct.dockerd_missing() is None, str(ct.dockerd_missing()))
    # a short path: the socket's must fit in 108 bytes
    d = ct.Dockerd(tempfile.mkdtemp(prefix="rtrain-dk-", dir="/tmp"))
    try:
        d.start()
    except RuntimeError as e:
        d.stop()
        need(False, "cannot start a private dockerd: %s" % e)
    yield d
    d.stop()


@pytest.fixture(scope="session")
def base_rootfs():
    need(ct.mmdebstrap_missing() is None, str(ct.mmdebstrap_missing()))
    try:
        return ct.base_rootfs()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        need(False, "cannot make the Debian base image with mmdebstrap: %s" % e)


@pytest.fixture(scope="session")
def base_image(dockerd, base_rootfs):
    """The Debian 12 + python3 image, in the private dockerd."""
    return dockerd.import_rootfs(base_rootfs, ct.BASE_IMAGE)


@pytest.fixture(scope="session")
def podman(base_rootfs):
    """Rootless podman as the test user ct.PODMAN_USER, with the base image."""
    need(ct.podman_missing() is None, str(ct.podman_missing()))
    try:
        pm = ct.make_podman()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        need(False, "cannot set up rootless podman: %s" % e)
    try:
        pm.image = pm.import_rootfs(base_rootfs, ct.BASE_IMAGE)
        probe = pm.cli("run", "--rm", "--pull=never", "--network=host", pm.image, "true", check=False)
        need(probe.returncode == 0, "rootless podman cannot run a container here: %s" % probe.stderr.strip())
    except BaseException:
        pm.stop()
        raise
    yield pm
    pm.stop()


@pytest.fixture
def cdi_gpus(podman):
    """Two fake GPUs for podman through a test CDI spec: each maps a device node (a copy of
    /dev/null under a test-only name) and says its UUID in the environment. Podman 4.3 reads
    specs only from /etc/cdi and /var/run/cdi (no cdi_spec_dirs), so the spec goes to the
    latter under a name of this run, and is removed after."""
    tag = "%s%d" % (USER_TAG, os.getpid())
    uuids = ["GPU-fa4e%04x-0000-4000-8000-%012d" % (os.getpid() & 0xffff, i) for i in range(2)]
    nodes = ["/dev/rtrain-test-gpu-%s-%d" % (tag, i) for i in range(2)]
    for n in nodes:
        subprocess.run(["mknod", "-m", "0666", n, "c", "1", "3"], check=True)
    spec = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
            "devices": [{"name": u, "containerEdits": {"deviceNodes": [{"path": n}],
                                                      "env": ["RTRAIN_TEST_GPU_%d=%s" % (i, u)]}}
                        for i, (u, n) in enumerate(zip(uuids, nodes))]}
    os.makedirs("/var/run/cdi", exist_ok=True)
    path = Path("/var/run/cdi/rtrain-test-%s.json" % tag)
    path.write_text(json.dumps(spec))
    yield uuids, nodes
    path.unlink()
    for n in nodes:
        os.unlink(n)


@pytest.fixture(scope="session")
def tower_image(dockerd, base_image):
    """docker/'s image, built from the local base (BASE=...), offline, repo root as context."""
    client = dockerd.client()
    client.images.build(path=str(REPO), dockerfile="docker/Dockerfile", tag=TOWER_IMAGE,
                        buildargs={"BASE": base_image}, pull=False, rm=True, forcerm=True,
                        network_mode="none")
    return TOWER_IMAGE


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Towers:
    """Try-it tower containers on loopback ports (host network), reached over ssh as `dev`."""

    def __init__(self, dockerd, image, root):
        self.dockerd = dockerd
        self.image = image
        self.root = Path(root)
        self.key = self.root / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.known_hosts = self.root / "known_hosts"
        self.ssh_config = self.root / "ssh_config"
        self.ssh_config.write_text("")
        host_key = dockerd.client().containers.run(
            image, ["cat", "/etc/ssh/ssh_host_ed25519_key.pub"], remove=True, network_mode="none")
        self.host_key = " ".join(host_key.decode().split()[:2])  # pinned from the image
        self.ports = {}
        self.containers = {}

    def start(self, name, gpus_json=None):
        port = free_port()
        volumes = {}
        if gpus_json is not None:
            volumes[str(gpus_json)] = {"bind": "/etc/rtrain-tower/gpus.json", "mode": "ro"}
        c = self.dockerd.client().containers.run(
            self.image, detach=True, name="rtrain-test-%s-%d-%s" % (name, os.getpid(), port),
            hostname=name, network_mode="host", init=True, volumes=volumes,
            environment={"PORT": str(port), "LISTEN": "127.0.0.1",
                         "AUTHORIZED_KEYS": self.key.with_suffix(".pub").read_text().strip()})
        self.ports[name], self.containers[name] = port, c
        with open(self.known_hosts, "a") as f:
            f.write("[127.0.0.1]:%d %s\n" % (port, self.host_key))
        deadline = time.time() + 20
        while time.time() < deadline:
            p = subprocess.run(["ssh", "-F", str(self.ssh_config), "-i", str(self.key), "-p", str(port),
                                "-o", "UserKnownHostsFile=%s" % self.known_hosts, "-o", "BatchMode=yes",
                                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=2",
                                "dev@127.0.0.1", "true"], capture_output=True, timeout=20)
            if p.returncode == 0:
                return port
            c.reload()
            if c.status == "exited":
                raise RuntimeError("tower %s exited: %s" % (name, c.logs().decode()[-2000:]))
            time.sleep(0.1)
        raise RuntimeError("tower %s: no ssh after 20 s: %s" % (name, p.stderr.decode()[-500:]))

    def hosts_yaml(self, path, default=None):
        lines = ["default: %s" % default] if default else []
        lines.append("hosts:")
        for name, port in self.ports.items():
            lines += ["  %s:" % name, "    ssh: dev@127.0.0.1:%d" % port,
                      "    identity_file: %s" % self.key, "    connect_timeout: 10"]
        Path(path).write_text("\n".join(lines) + "\n")
        return Path(path)

    def env(self, local_home):
        env = dict(os.environ)
        env.pop("RTRAIN_HOSTS", None)
        env.update({"RTRAIN_KNOWN_HOSTS": str(self.known_hosts), "RTRAIN_SSH_CONFIG": str(self.ssh_config),
                    "PYTHONPATH": str(REPO), "RTRAIN_HOME": str(local_home), "SSH_AUTH_SOCK": ""})
        return env

    def stop(self):
        for c in self.containers.values():
            try:
                c.remove(force=True)
            except Exception:  # noqa: BLE001 - dockerd's teardown removes it anyway
                pass


@pytest.fixture(scope="session")
def towers(dockerd, tower_image):
    """Two towers: tower1 with docker/gpus.json (4 idle GPUs), tower2 with docker/gpus-2.json
    (2 GPUs, one busy with someone else's process)."""
    need(shutil.which("ssh") is not None, "the OpenSSH client is not installed")
    root = tempfile.mkdtemp(prefix="rtrain-towers-")
    t = Towers(dockerd, tower_image, root)
    try:
        t.start("tower1")
        t.start("tower2", REPO / "docker" / "gpus-2.json")
    except BaseException:
        t.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    yield t
    t.stop()
    shutil.rmtree(root, ignore_errors=True)
