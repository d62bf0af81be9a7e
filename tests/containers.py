"""Real container engines for the tests, started by the tests (fixtures in
tests/integration/containers/conftest.py use these):

- Dockerd: a private dockerd (own data-root, exec-root and socket under a temp dir, no
  iptables, no bridge: containers use the host's network or none, never a private range).
- base_rootfs(): a Debian 12 root file system with python3, sshd and rsync, made locally with
  mmdebstrap (no registry is needed) and cached under CACHE, keyed by everything that defines
  it, so only the first run on a machine pays for it (~30 s).
- Podman: rootless podman run by an ordinary test user, its storage and config private.

Everything here is for tests; the product's own engine code is launcher/agent/containers.py.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support import USER_TAG

CACHE = Path(os.environ.get("RTRAIN_TEST_IMAGE_CACHE", "/var/cache/rtrain-test-images"))
SUITE = "bookworm"
PACKAGES = ("python3", "openssh-server", "rsync")
HOOKS = "/usr/share/mmdebstrap/hooks"
# Bump when the way the rootfs is made changes in a way the argv does not show.
RECIPE_VERSION = 1
BASE_IMAGE = "rtrain-test/base:py3"
PODMAN_USER = "rtrain-carol" + USER_TAG


def _run(argv, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(argv, **kw)


# ------------------------------------------------------------------ the base root file system

def debian_mirror():
    """The Debian mirror this machine's apt uses (a CI machine may have a local one)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        try:
            text = path.read_text()
        except OSError:
            continue
        for block in text.split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines()
                          if ":" in line and not line.startswith("#") and not line.startswith(" "))
            uris = fields.get("URIs", "").split()
            if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split() \
                    and uris and "security" not in uris[0]:
                return uris[0].rstrip("/")
    try:
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE and "[" not in parts[1]:
                return parts[1].rstrip("/")
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def mmdebstrap_argv(out):
    """The command that makes the rootfs tar `out`. merged-usr hook: else usrmerge drags in perl;
    docs are deleted in a hook (a dpkg path-exclude would pipe every .deb through a filter)."""
    return ["mmdebstrap", "--quiet", "--format=tar", "--variant=essential",
            "--include=" + ",".join(PACKAGES),
            "--hook-dir=%s/merged-usr" % HOOKS, "--hook-dir=%s/eatmydata" % HOOKS,
            "--customize-hook=rm -rf \"$1\"/usr/share/doc/* \"$1\"/usr/share/man/* "
            "\"$1\"/usr/share/locale/* \"$1\"/usr/share/info/*",
            SUITE, str(out), debian_mirror()]


def rootfs_key():
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    text = json.dumps([RECIPE_VERSION, mmdebstrap_argv("OUT"), arch])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mmdebstrap_missing():
    """None when mmdebstrap can run here, else why not."""
    for tool in ("mmdebstrap", "eatmydata"):
        if not shutil.which(tool):
            return "%s is not installed (bash tests/setup.sh installs it)" % tool
    if not os.path.isdir(HOOKS + "/merged-usr"):
        return "mmdebstrap has no merged-usr hook (%s)" % HOOKS
    return None


def base_rootfs():
    """Path of the cached rootfs tar, made on first use (one maker at a time: flock)."""
    tar = CACHE / ("base-%s.tar" % rootfs_key())
    if tar.is_file():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tar.is_file():
            return tar
        part = tar.with_suffix(".part%d" % os.getpid())
        log = CACHE / (tar.stem + ".log")
        p = _run(mmdebstrap_argv(part), timeout=600)
        log.write_text(p.stdout + p.stderr)
        if p.returncode != 0 or not part.is_file():
            with contextlib.suppress(OSError):
                part.unlink()
            raise RuntimeError("mmdebstrap failed (%d), see %s:\n%s" % (
                p.returncode, log, (p.stdout + p.stderr)[-2000:]))
        os.chmod(part, 0o644)
        os.replace(part, tar)
    return tar


# ------------------------------------------------------------------ a private dockerd

class Dockerd:
    """dockerd with its own roots and socket under `root`, no iptables, no bridge."""

    def __init__(self, root):
        self.root = Path(root)
        os.chmod(self.root, 0o711)  # test users reach the socket (root:docker 0660) through it
        self.sock = self.root / "docker.sock"
        self.url = "unix://%s" % self.sock
        self.log = self.root / "dockerd.log"
        self.proc = None
        self._client = None

    def start(self, timeout=60):
        argv = [shutil.which("dockerd") or "/usr/sbin/dockerd",
                "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "dockerd.pid"), "-H", self.url,
                "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-masq=false",
                "--storage-driver=overlay2",
                # the hard limits here are low: containers must not ask for more
                "--default-ulimit", "nofile=1024:1024", "--default-ulimit", "nproc=4096:4096",
                "--containerd-namespace", "rtrain-test%s-%d" % (USER_TAG, os.getpid()),
                "--exec-opt", "native.cgroupdriver=cgroupfs"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("dockerd exited %d:\n%s" % (self.proc.returncode, self.log.read_text()[-3000:]))
            if self.sock.exists():
                try:
                    self.client().ping()
                    return self
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            time.sleep(0.1)
        raise RuntimeError("dockerd did not answer within %ds:\n%s" % (timeout, self.log.read_text()[-3000:]))

    def client(self):
        if self._client is None:
            import docker
            self._client = docker.DockerClient(base_url=self.url, timeout=120)
        return self._client

    def env(self, **extra):
        """An environment whose docker CLI talks to this dockerd."""
        env = dict(os.environ, DOCKER_HOST=self.url)
        env.update(extra)
        return env

    def cli(self, *args, check=True, timeout=120):
        p = _run([docker_cli()] + [str(a) for a in args], env=self.env(), timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError("docker %s -> %d: %s" % (" ".join(map(str, args)), p.returncode, p.stderr))
        return p

    def import_rootfs(self, tar, image):
        """`docker import` (no registry: the image is made from the tar)."""
        c = self.client()
        repo, _, tag = image.partition(":")
        with contextlib.suppress(Exception):
            c.images.get(image)
            return image
        c.api.import_image_from_file(str(tar), repository=repo, tag=tag or "latest")
        c.images.get(image)
        return image

    def stop(self):
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            for ct in self.client().containers.list(all=True):
                ct.remove(force=True)
        with contextlib.suppress(Exception):
            self.client().close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # dockerd leaves mounts behind (exec/netns/default, overlay layers): rmtree needs them gone
        mounts = []
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mounts").read_text().splitlines():
                where = line.split()[1].replace("\\040", " ")
                if where == str(self.root) or where.startswith(str(self.root) + "/"):
                    mounts.append(where)
        for m in sorted(mounts, key=len, reverse=True):
            _run(["umount", "-l", m])
        shutil.rmtree(self.root, ignore_errors=True)


def docker_cli():
    for p in (shutil.which("docker"), "/usr/local/bin/docker", "/usr/bin/docker"):
        if p and os.access(p, os.X_OK):
            return p
    return None


def dockerd_missing():
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    if not (shutil.which("dockerd") or os.path.exists("/usr/sbin/dockerd")):
        return "dockerd is not installed (bash tests/setup.sh installs docker.io)"
    if docker_cli() is None:
        return "the docker CLI is not installed"
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker Python SDK is not installed (pip install -e '.[test]')"
    return None


# ------------------------------------------------------------------ rootless podman

def ensure_user(name):
    """A test user with a subordinate uid/gid range (what rootless podman needs; useradd gives
    one where login.defs asks for it, else one is added after the highest range in use)."""
    if _run(["id", name]).returncode != 0:
        _run(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        _run(["usermod", "-p", "*", name], check=True)
    ranges = {}
    for f in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(f) as fh:
                ranges[f] = [line.strip().split(":") for line in fh if line.count(":") == 2]
        except OSError:
            ranges[f] = []
    if not all(any(r[0] == name for r in ranges[f]) for f in ranges):
        start = max([100000] + [int(r[1]) + int(r[2]) for f in ranges for r in ranges[f]
                                if r[1].isdigit() and r[2].isdigit()])
        span = "%d-%d" % (start, start + 65535)
        if _run(["usermod", "--add-subuids", span, "--add-subgids", span, name]).returncode != 0:
            return None
    return pwd.getpwnam(name)


def init_path():
    """What podman's --init can use here: its own catatonit, else tini-static (docker.io's)."""
    for p in ("/usr/libexec/podman/catatonit", "/usr/bin/catatonit"):
        if os.path.exists(p):
            return None
    for p in ("/usr/bin/tini-static", "/usr/bin/tini"):
        if os.path.exists(p):
            return p
    return None


class Podman:
    """Rootless podman as `user`, all its state under `root`: storage on native overlay (the
    default would be vfs here: a copy of the rootfs per container), cgroupfs, file events,
    CDI specs from root/cdi. The settings travel as files named by XDG_CONFIG_HOME, so any
    `podman` the user runs with env() (the agent's engine calls included) gets them."""

    def __init__(self, root, user):
        self.root = Path(root)
        self.user = user
        self.pw = pwd.getpwnam(user)
        self.cdi_dir = self.root / "cdi"
        cfg = self.root / "cfg" / "containers"
        for d in (self.root / "xdg", cfg, self.root / "data", self.cdi_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "xdg", 0o700)
        (cfg / "storage.conf").write_text(
            '[storage]\ndriver = "overlay"\ngraphroot = "%s/storage"\nrunroot = "%s/xdg/containers"\n'
            % (self.root, self.root))
        (cfg / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            'cdi_spec_dirs = ["%s"]\n' % self.cdi_dir)
        for dirpath, dirs, files in os.walk(self.root):
            for n in dirs + files:
                os.chown(os.path.join(dirpath, n), self.pw.pw_uid, self.pw.pw_gid)
        os.chown(self.root, self.pw.pw_uid, self.pw.pw_gid)
        os.chmod(self.root, 0o755)

    def env(self, **extra):
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": self.pw.pw_dir,
               "USER": self.user, "LOGNAME": self.user,
               "XDG_RUNTIME_DIR": str(self.root / "xdg"), "XDG_CONFIG_HOME": str(self.root / "cfg"),
               "XDG_DATA_HOME": str(self.root / "data")}
        env.update(extra)
        return env

    def as_user(self, argv, env=None, **kw):
        """argv run as the user (runuser keeps the cwd: use one the user can enter)."""
        kw.setdefault("cwd", "/")
        return _run(["runuser", "-u", self.user, "--", "env", "-i"] +
                    ["%s=%s" % kv for kv in sorted((env or self.env()).items())] + list(argv), **kw)

    def cli(self, *args, check=True, timeout=120):
        p = self.as_user(["podman"] + [str(a) for a in args], timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError("podman %s -> %d: %s" % (" ".join(map(str, args)), p.returncode, p.stderr))
        return p

    def import_rootfs(self, tar, image):
        name = "localhost/" + image
        if self.cli("image", "exists", name, check=False).returncode != 0:
            self.cli("import", "-q", str(tar), name, timeout=300)
        return name

    def stop(self):
        self.cli("rm", "-a", "-f", "-t", "1", check=False, timeout=60)
        # rootless podman leaves a "podman pause" process holding the user namespace
        pid_file = self.root / "xdg" / "libpod" / "tmp" / "pause.pid"
        # (its mounts live in the user's own mount namespace, gone with it: root can then
        # remove the storage, whose files belong to the user's subordinate uids)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def podman_missing():
    if os.geteuid() != 0:
        return "starting rootless podman as a test user needs root"
    for tool in ("podman", "newuidmap", "runuser"):
        if not shutil.which(tool):
            return "%s is not installed (bash tests/setup.sh installs podman and uidmap)" % tool
    return None


def make_podman(user=PODMAN_USER):
    pw = ensure_user(user)
    if pw is None:
        raise RuntimeError("user %s has no /etc/subuid or /etc/subgid range" % user)
    root = tempfile.mkdtemp(prefix="rtrain-pm-")
    return Podman(root, user)
