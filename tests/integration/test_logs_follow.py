"""`rtrain logs -f` over a real sshd on 127.0.0.1 while the network misbehaves.

The connection is cut by killing the sshd process that serves the client's TCP connection (what
a dropped network looks like to both ends), or frozen by a loopback proxy that stops forwarding
without closing anything (a network that dies silently). What the client printed must equal the
job's log file byte for byte, and it must exit with the job's exit code.
No timed assertions: every wait is for progress, with a generous timeout."""
import json
import os
import pwd
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from netproxy import FreezingProxy
from support import stop_agent

JOB = r'''
import os, sys, time
stop, code = sys.argv[1], int(sys.argv[2])
out = sys.stdout.buffer
i = 0
while i < 60 or not os.path.exists(stop):
    i += 1
    out.write(b"line %06d\n" % i)
    if i % 7 == 0:
        out.write(b"latin-1 caf\xe9 and broken utf-8 \xff\xfe\x80\xc3(\n")
    if i % 11 == 0:
        out.write(b"progress  10%|#   |\rprogress  50%|##  |\rprogress 100%|####|\n")
    if i % 150 == 40:
        # a 200 KB line without a newline, written in pieces so that a cut can land inside it
        for k in range(20):
            out.write(bytes([65 + k]) * 10000)
            out.flush()
            time.sleep(0.01)
        out.write(b"\n")
    out.flush()
    time.sleep(0.01)
out.write(b"Z" * 200000)  # and the log ends inside a long line: no final newline
out.flush()
sys.exit(code)
'''


# ------------------------------------------------------------------ helpers

def rt_cmd(hosts, *args):
    return [sys.executable, "-m", "launcher", "--hosts", str(hosts)] + [str(a) for a in args]


def rt(sshd, hosts, *args, cwd, env=None, check=True, timeout=120):
    p = subprocess.run(rt_cmd(hosts, *args), cwd=str(cwd), env=env or sshd.env(),
                       capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
    return p


def status(sshd, hosts, job, cwd, env=None):
    return json.loads(rt(sshd, hosts, "status", "--json", job, cwd=cwd, env=env).stdout)


def wait_for(what, cond, timeout=90, interval=0.05, follower=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError("timed out after %ss waiting for %s%s" % (
        timeout, what, "" if follower is None else "\nclient's stderr:\n" + follower.stderr()[-3000:]))


def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _socket_inodes(pid):
    found = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            t = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if t.startswith("socket:["):
            found.add(int(t[8:-1]))
    return found


def _tcp_table():
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            rows.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3], int(f[9])))
    return rows  # (local port, remote port, state, inode)


def _client_pids(pid):
    """pid, its descendants, and the OpenSSH masters (`ssh: PATH [mux]`, daemons of their own):
    whoever may hold the client's end of its connection."""
    parent, out = {}, {pid}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path("/proc/%s/stat" % d).read_text()
            parent[int(d)] = int(stat[stat.rfind(")") + 2:].split()[1])
            if Path("/proc/%s/cmdline" % d).read_bytes().startswith(b"ssh: ") and \
                    b"[mux]" in Path("/proc/%s/cmdline" % d).read_bytes():
                out.add(int(d))
        except (OSError, ValueError, IndexError):
            pass
    grew = True
    while grew:
        more = {p for p, pp in parent.items() if pp in out} - out
        grew = bool(more)
        out |= more
    return out


def serving_sshd(client_pid, ssh_port):
    """Pids of the sshd processes that serve the client's established connection(s) to ssh_port
    as the user of these tests (a master of an earlier test may be up too): the connection's
    other end is the socket whose peer port is the client's local port."""
    mine = set()
    for pid in _client_pids(client_pid):
        try:
            mine |= _socket_inodes(pid)
        except OSError:
            pass
    table = _tcp_table()
    client_ports = {lp for lp, rp, st, ino in table if ino in mine and rp == ssh_port and st == "01"}
    server = {ino for lp, rp, st, ino in table if lp == ssh_port and rp in client_ports and ino}
    holders = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == client_pid:
            continue
        try:
            for ino in _socket_inodes(int(d)) & server:
                holders.setdefault(ino, []).append(int(d))
        except OSError:
            pass
    uid = pwd.getpwnam(USER).pw_uid
    system = {0}
    for name in ("sshd", "nobody"):  # sshd's privilege-separation user, before authentication
        try:
            system.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    pids = []
    for ps in holders.values():
        owners = set()
        for p in ps:
            try:
                owners.add(os.stat("/proc/%d" % p).st_uid)
            except OSError:
                pass
        if uid in owners or not owners - system:  # ours, or still in its handshake
            pids += ps
    return pids


def kill_connection(client_pid, ssh_port):
    pids = wait_for("the sshd child serving the client", lambda: serving_sshd(client_pid, ssh_port))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# A user of these tests' own: other test sessions on this machine end by killing every process
# of the shared test users (conftest's sshd fixture), which would take our jobs with them.
USER = "rtrain-logs"


def _ensure_user(sshd):
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], capture_output=True)
        subprocess.run(["usermod", "-p", "*", USER], check=True, capture_output=True)
    keys = Path(sshd.root) / "authkeys" / USER
    keys.write_text(sshd.user_key.with_suffix(".pub").read_text())
    os.chmod(keys, 0o644)


def _homes(hosts_file):
    return [Path("/home/%s/%s" % (USER, line.split("~/", 1)[1].strip()))
            for line in Path(hosts_file).read_text().splitlines() if line.strip().startswith("home: ~/")]


def _clean_home(home):
    """Stop what a test left on the host, by pid (daemon, jobs), and remove its RTRAIN_HOME."""
    stop_agent(home)
    import shutil
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def setup(sshd, tmp_path):
    import fakesmi
    _ensure_user(sshd)
    fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json", gpus=4)
    os.chmod(sshd.bin_dir / "nvidia-smi-state.json", 0o644)
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (USER, sshd.port)})
    src = tmp_path / "src"
    src.mkdir()
    (src / "job.py").write_text(JOB)
    # a place the job (another unix user) can see and the test can write: stop files
    flags = Path(sshd.root) / ("flags-" + uuid.uuid4().hex[:8])
    flags.mkdir(mode=0o755)
    os.chmod(flags, 0o755)
    yield hosts, src, flags
    for f in tmp_path.glob("*.yaml"):
        for home in _homes(f):
            _clean_home(home)


class Follower:
    """`rtrain logs ... -f` as a subprocess, its stdout and stderr going to files."""

    def __init__(self, sshd, hosts, src, tmp, *args, env=None):
        self.out_path = Path(tmp) / ("out-%s" % uuid.uuid4().hex[:6])
        self.err_path = self.out_path.with_suffix(".err")
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.p = subprocess.Popen(rt_cmd(hosts, *args), cwd=str(src), env=env or sshd.env(),
                                  stdout=self.out, stderr=self.err)

    def size(self):
        return size(self.out_path)

    def stdout(self):
        return self.out_path.read_bytes()

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout=120):
        try:
            return self.p.wait(timeout)
        finally:
            self.out.close()
            self.err.close()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


# ------------------------------------------------------------------ tests

def test_follow_survives_killed_connections_byte_for_byte(sshd, setup, tmp_path):
    hosts, src, flags = setup
    stop = flags / "stop-1"
    job = rt(sshd, hosts, "submit", "-q", "--", "python3", "job.py", stop, 3, cwd=src).stdout.decode().strip()
    f = Follower(sshd, hosts, src, tmp_path, "logs", job, "-f")
    try:
        kills = 5
        for k in range(kills):
            # wait until bytes flow on the current connection, then cut it
            seen = f.size()
            wait_for("output from the client (round %d)" % k, lambda seen=seen: f.size() > seen + 2000, follower=f)
            assert f.p.poll() is None, f.stderr()
            before = f.stderr().count("reconnecting")
            kill_connection(f.p.pid, sshd.port)
            wait_for("the client to notice the cut (round %d)" % k,
                     lambda before=before: f.stderr().count("reconnecting") > before or f.p.poll() is not None,
                     follower=f)
        # and cuts while it connects again: in the SSH handshake, the authentication, the agent's start
        rnd = random.Random(4)
        for k in range(3):
            pids = wait_for("a new connection (round %d)" % k, lambda: serving_sshd(f.p.pid, sshd.port),
                            interval=0.002, follower=f)
            time.sleep(rnd.uniform(0, 0.3))
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        seen = f.size()
        wait_for("output after the last reconnect", lambda: f.size() > seen + 2000, follower=f)
        stop.touch()
        rc = f.wait(180)
    finally:
        f.kill()
        stop.touch()
    st = status(sshd, hosts, job, src)
    assert st["state"] == "failed" and st["exit_code"] == 3, st
    remote = Path(st["log"]).read_bytes()
    got = f.stdout()
    err = f.stderr()
    assert len(remote) > 400000 and remote.endswith(b"Z" * 1000)
    assert b"\xff\xfe\x80" in remote and b"\r" in remote
    if got != remote:
        n = next((i for i, (a, b) in enumerate(zip(got, remote)) if a != b), min(len(got), len(remote)))
        raise AssertionError("client printed %d bytes, log has %d; first difference at byte %d: "
                             "got %r, log %r\nstderr:\n%s" % (len(got), len(remote), n, got[n - 40:n + 40],
                                                              remote[n - 40:n + 40], err))
    assert err.count("reconnecting") >= kills, err
    assert "Traceback" not in err, err
    assert rc == 3, err


def test_tail_starts_n_lines_back(sshd, setup, tmp_path):
    hosts, src, flags = setup
    stop = flags / "stop-tail"
    (src / "tail.py").write_text(
        "import os, sys, time\nfor i in range(1, 101):\n    print('row %d' % i)\n"
        "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.05)\nprint('after')\n")
    job = rt(sshd, hosts, "submit", "-q", "--", "python3", "tail.py", stop, cwd=src).stdout.decode().strip()
    try:
        log = Path(wait_for("the job to start", lambda: status(sshd, hosts, job, src).get("log")))
        wait_for("100 rows in the log", lambda: log.exists() and log.read_bytes().endswith(b"row 100\n"))
        p = rt(sshd, hosts, "logs", job, "--tail", 5, cwd=src)
        assert p.stdout == b"".join(b"row %d\n" % i for i in range(96, 101)), p.stdout
        assert rt(sshd, hosts, "logs", job, "--tail", 0, cwd=src).stdout == b""
        assert rt(sshd, hosts, "logs", job, "--tail", 1000, cwd=src).stdout == log.read_bytes()
        f = Follower(sshd, hosts, src, tmp_path, "logs", job, "-f", "--tail", 3)
        try:
            want = b"row 98\nrow 99\nrow 100\n"
            wait_for("the last 3 rows", lambda: f.size() >= len(want), follower=f)
            assert f.stdout() == want
            stop.touch()
            rc = f.wait(120)
        finally:
            f.kill()
        assert rc == 0, f.stderr()
        assert f.stdout() == want + b"after\n"
    finally:
        stop.touch()


def test_ctrl_c_detaches_and_the_job_goes_on(sshd, setup, tmp_path):
    hosts, src, flags = setup
    stop = flags / "stop-int"
    job = rt(sshd, hosts, "submit", "-q", "--", "python3", "job.py", stop, 0, cwd=src).stdout.decode().strip()
    try:
        f = Follower(sshd, hosts, src, tmp_path, "logs", job, "-f")
        try:
            wait_for("output", lambda: f.size() > 100, follower=f)
            f.p.send_signal(signal.SIGINT)
            rc = f.wait(60)
        finally:
            f.kill()
        assert rc == 130, f.stderr()
        assert "detached" in f.stderr() and "Traceback" not in f.stderr(), f.stderr()
        assert status(sshd, hosts, job, src)["state"] == "running"
        log = Path(status(sshd, hosts, job, src)["log"])
        n = size(log)
        wait_for("the job to keep writing", lambda: size(log) > n + 1000)
    finally:
        stop.touch()

    def ended():
        s = status(sshd, hosts, job, src)
        return s if s["state"] not in ("queued", "running") else None

    st = wait_for("the job to end", ended)
    assert st["state"] == "succeeded"


def test_silent_network_death_turns_into_a_reconnect(sshd, setup, tmp_path):
    hosts, src, flags = setup
    proxy = FreezingProxy(sshd.port)
    stop = flags / "stop-silent"
    try:
        kh = tmp_path / "kh"
        key = sshd.host_key.with_suffix(".pub").read_text().split()[:2]
        kh.write_text(sshd.known_hosts.read_text() + "[127.0.0.1]:%d %s\n" % (proxy.port, " ".join(key)))
        # a short stall limit keeps the test quick; the default is for real networks
        env = sshd.env(known_hosts=kh, RTRAIN_LOGS_STALL_S="4")
        phosts = sshd.hosts_yaml(tmp_path / "proxied.yaml", {"tower": (USER, proxy.port)})
        # the hosts file gives each host its own home: submit through the proxy too
        job = rt(sshd, phosts, "submit", "-q", "--", "python3", "job.py", stop, 4, cwd=src,
                 env=env).stdout.decode().strip()
        f = Follower(sshd, phosts, src, tmp_path, "logs", job, "-f", env=env)
        try:
            for k in range(2):
                seen = f.size()
                wait_for("output (round %d)" % k, lambda seen=seen: f.size() > seen + 2000, follower=f)
                before = f.stderr().count("reconnecting")
                assert proxy.freeze() >= 1
                wait_for("the client to notice the silence (round %d)" % k,
                         lambda before=before: f.stderr().count("reconnecting") > before or f.p.poll() is not None,
                         timeout=120, follower=f)
            seen = f.size()
            wait_for("output after the reconnect", lambda: f.size() > seen + 2000, follower=f)
            stop.touch()
            rc = f.wait(180)
        finally:
            f.kill()
            stop.touch()
        st = status(sshd, phosts, job, src, env=env)
        assert st["exit_code"] == 4, st
        assert f.stdout() == Path(st["log"]).read_bytes(), f.stderr()
        assert "reconnecting" in f.stderr() and rc == 4, f.stderr()
    finally:
        proxy.close()


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_local_follow_byte_for_byte_both_ways_of_waiting(world_factory, mode):
    """The agent waits for the log on inotify where it can, else it polls: both give every byte,
    the end of the job, and its exit code (local host: the same agent, no ssh)."""
    world = world_factory()
    (world.cwd / "job.py").write_text(
        "import sys, time\nw = sys.stdout.buffer\n"
        "for i in range(200):\n"
        "    w.write(b'n %d \\xff\\xfe\\r' % i + (b'L' * 70000 if i == 100 else b'') + b'\\n')\n"
        "    w.flush()\n    time.sleep(0.005 if i % 50 else 0.3)\n"
        "w.write(b'no newline at the end'); w.flush(); sys.exit(3)\n")
    job = world.submit("python3", "job.py")
    env = world.env(**({"RTRAIN_AGENT_NO_INOTIFY": "1"} if mode == "poll" else {}))
    p = subprocess.run([sys.executable, "-m", "launcher", "logs", job, "-f"], cwd=str(world.cwd), env=env,
                       capture_output=True, timeout=120)
    st = world.status(job)
    assert p.returncode == 3, p.stderr
    assert p.stdout == Path(st["log"]).read_bytes()
    assert p.stdout.endswith(b"no newline at the end") and b"L" * 70000 in p.stdout


def test_follow_ends_when_the_job_and_the_daemon_are_killed(world_factory):
    """kill -9 of the job's wrapper, its command and the daemon (what `pkill -9 -u user` does)
    leaves no exit status: `logs -f` must not wait forever, but restart the daemon, which finds
    the job lost, and exit 1."""
    world = world_factory()
    job = world.submit("sh", "-c", "echo started; sleep 1000")
    f = subprocess.Popen([sys.executable, "-m", "launcher", "logs", job, "-f"], cwd=str(world.cwd),
                         env=world.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert f.stdout.readline() == b"started\n"
        info = json.loads((world.home / "jobs" / job / "pid.json").read_text())
        os.kill(world.daemon_pid(), signal.SIGKILL)
        os.kill(info["wrapper_pid"], signal.SIGKILL)
        os.killpg(info["pgid"], signal.SIGKILL)
        out, err = f.communicate(timeout=120)
    finally:
        if f.poll() is None:
            f.kill()
    assert f.returncode == 1, err
    assert b"job lost" in out and b"lost" in err, (out, err)
    assert world.status(job)["state"] == "lost"
