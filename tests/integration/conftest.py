"""A real OpenSSH sshd on 127.0.0.1 (free port, own host key and config, key-only auth) for the
integration tests, with test users and a simulated nvidia-smi first on their PATH."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from support import ALICE, BOB, NOPY, REPO, need

USERS = (ALICE, BOB, NOPY)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _sshd_binary():
    for p in ("/usr/sbin/sshd", shutil.which("sshd") or ""):
        if p and os.access(p, os.X_OK):
            return p
    return None


class Sshd:
    def __init__(self, root):
        self.root = Path(root)
        self.procs = []
        self.transport = None  # the `transport:` hosts_yaml writes (the ssh_transport fixture sets it)
        self.bin_dir = self.root / "bin"          # first on every test user's PATH
        self.nopy_dir = self.root / "nopy-bin"    # the PATH of a host without python3
        self.lock_dir = self.root / "locks"
        self.user_key = self.root / "id_ed25519"
        self.other_key = self.root / "id_other"
        self.ssh_config = self.root / "ssh_config"
        self.ssh_config.write_text("")
        for d in (self.bin_dir, self.nopy_dir, self.root / "authkeys"):
            d.mkdir()
        self.lock_dir.mkdir(mode=0o1777)
        os.chmod(self.lock_dir, 0o1777)
        for k in (self.user_key, self.other_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        for u in ("root",) + USERS:
            (self.root / "authkeys" / u).write_text(self.user_key.with_suffix(".pub").read_text())
            os.chmod(self.root / "authkeys" / u, 0o644)
        for p in (self.root, self.bin_dir, self.nopy_dir, self.root / "authkeys"):
            os.chmod(p, 0o755)
        self.port, self.host_key, self.known_hosts = self.start("main")

    def start(self, name, set_env=None):
        """Start one sshd; returns (port, host key path, a known_hosts file naming it).
        set_env: more variables of every session (PATH replaces the default), e.g. SLURM_CONF."""
        port = free_port()
        base, n = name, 1
        while (self.root / ("host_%s" % name)).exists():  # a test run once per transport
            n += 1
            name = "%s%d" % (base, n)
        key = self.root / ("host_%s" % name)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        conf = self.root / ("sshd_%s.conf" % name)
        conf.write_text("\n".join([
            "Port %d" % port, "ListenAddress 127.0.0.1", "HostKey %s" % key,
            "PidFile %s/sshd_%s.pid" % (self.root, name),
            "AuthorizedKeysFile %s/authkeys/%%u" % self.root,
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "UsePAM yes", "StrictModes no",
            "Subsystem sftp internal-sftp", "MaxStartups 200:30:300", "MaxSessions 100",
            "AllowTcpForwarding yes", "LogLevel ERROR",
            "SetEnv " + " ".join("%s=%s" % kv for kv in sorted(dict(
                {"PATH": "%s:/usr/local/bin:/usr/bin:/bin" % self.bin_dir}, **(set_env or {})).items())),
            "Match User %s" % NOPY, "  SetEnv PATH=%s" % self.nopy_dir, ""]))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        p = subprocess.Popen([_sshd_binary(), "-D", "-e", "-f", str(conf)],
                             stdout=subprocess.DEVNULL, stderr=open(self.root / ("sshd_%s.log" % name), "w"))
        self.procs.append(p)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if p.poll() is not None:
                    raise RuntimeError("sshd exited: %s" % (self.root / ("sshd_%s.log" % name)).read_text())
                time.sleep(0.05)
        kh = self.root / ("known_hosts_%s" % name)
        kh.write_text("[127.0.0.1]:%d %s\n" % (port, " ".join(key.with_suffix(".pub").read_text().split()[:2])))
        return port, key, kh

    def hosts_yaml(self, path, hosts, default=None):
        """hosts: {name: (user, port) or (user, port, extra dict)}; each gets a private home and
        the transport under test (self.transport), unless extra names one."""
        lines = ["default: %s" % default] if default else []
        lines.append("hosts:")
        for name, spec in hosts.items():
            user, port = spec[0], spec[1]
            extra = spec[2] if len(spec) > 2 else {}
            lines += ["  %s:" % name, "    ssh: %s@127.0.0.1:%d" % (user, port),
                      "    identity_file: %s" % extra.get("identity_file", self.user_key),
                      "    home: %s" % extra.get("home", "~/.rtrain-%s" % uuid.uuid4().hex[:8]),
                      "    lock_dir: %s" % extra.get("lock_dir", self.lock_dir),
                      "    connect_timeout: %s" % extra.get("connect_timeout", 5)]
            if self.transport and "transport" not in extra:
                lines.append("    transport: %s" % self.transport)
            for k, v in extra.items():
                if k not in ("identity_file", "lock_dir", "connect_timeout", "home"):
                    lines.append("    %s: %s" % (k, v))
        Path(path).write_text("\n".join(lines) + "\n")
        return path

    def env(self, known_hosts=None, **extra):
        env = dict(os.environ)
        # `local` is always a host too: keep its state out of this machine's ~/.rtrain
        env.update({"RTRAIN_KNOWN_HOSTS": str(known_hosts or self.known_hosts),
                    "RTRAIN_SSH_CONFIG": str(self.ssh_config), "PYTHONPATH": str(REPO),
                    "RTRAIN_HOME": str(self.root / "local-home"), "SSH_AUTH_SOCK": "",
                    "XDG_CACHE_HOME": str(self.root / "client-cache")})
        env.update(extra)
        return env

    def close_masters(self):
        """Close the OpenSSH master connections the tests left (their sockets are under root)."""
        import stat
        import sys
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from launcher.openssh import close_master
        for d, _, files in os.walk(str(self.root)):
            for f in files:
                p = os.path.join(d, f)
                try:
                    if stat.S_ISSOCK(os.lstat(p).st_mode):
                        close_master("ssh", p)
                except OSError:
                    pass

    def stop(self):
        self.close_masters()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def _ensure_users():
    for u in USERS:
        if subprocess.run(["id", u], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", u], check=True, capture_output=True)
            subprocess.run(["usermod", "-p", "*", u], check=True, capture_output=True)


SSH_TRANSPORTS = ("openssh", "paramiko")


def pytest_generate_tests(metafunc):
    """Every test that talks to the sshd runs once per SSH transport."""
    if "sshd" in metafunc.fixturenames and "ssh_transport" in metafunc.fixturenames:
        # a module may narrow it (test_openssh.py: connection sharing is OpenSSH's alone), or
        # say () when it drives ssh itself, not rtrain's transports (test_slurm.py)
        transports = getattr(metafunc.module, "SSH_TRANSPORTS", SSH_TRANSPORTS)
        if transports:
            metafunc.parametrize("ssh_transport", transports, indirect=True)


@pytest.fixture(autouse=True)
def ssh_transport(request):
    """The transport under test ("openssh" or "paramiko"), written into every hosts.yaml that
    sshd.hosts_yaml makes; None for tests without the sshd."""
    t = getattr(request, "param", None)
    if t is None:
        yield None
        return
    s = request.getfixturevalue("sshd")
    s.transport = t
    yield t
    s.transport = None


@pytest.fixture(scope="session")
def sshd():
    need(_sshd_binary() is not None, "OpenSSH sshd is not installed (apt-get install openssh-server)")
    need(os.geteuid() == 0, "starting sshd for test users needs root")
    _ensure_users()
    root = tempfile.mkdtemp(prefix="rtrain-sshd-")
    s = Sshd(root)
    import fakesmi
    fakesmi.install(s.bin_dir)
    yield s
    s.stop()
    subprocess.run(["pkill", "-9", "-u", ",".join(USERS)], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
