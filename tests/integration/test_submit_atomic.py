"""A submit is atomic (docs/design.md "Atomic submit"): a connection cut at any point of it leaves
no job, no half job and nothing in tmp/ that could become one; submitting again works and the
job runs on the complete snapshot.

The client reaches the real sshd of conftest.py through a loopback TCP proxy that drops the
connection after N bytes from the client, for N across the handshake, the agent call, the
request and the blob upload. A last case cuts after the whole request, before the agent queues the
job: the agent is frozen (SIGSTOP) there, the connection dropped, and once sshd has let
go of it the agent goes on and must see that its client is gone. No timed assertions: waits are
polls with generous limits."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from support import ALICE

USER = ALICE
TERMINAL = ("succeeded", "failed", "cancelled", "lost")


class CutProxy:
    """127.0.0.1:port -> sshd. Each connection is dropped (both sides closed) once the client
    has sent `cut_after` bytes (None: never); `sent` counts the client's bytes of the last one."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.cut_after = None
        self.sent = 0
        self.cuts = 0
        self._live = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            pair = (c, s)
            with self._lock:
                self._live.append(pair)
                self.sent = 0
            threading.Thread(target=self._pump, args=(c, s, pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, pair, False), daemon=True).start()

    def _pump(self, src, dst, pair, upstream):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        limit = self.cut_after
                        if limit is not None and self.sent + len(data) >= limit:
                            data = data[:max(0, limit - self.sent)]
                            self.sent += len(data)
                            dst.sendall(data)
                            self.cuts += 1
                            raise ConnectionAbortedError("cut")
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        self._drop(pair)

    def _drop(self, pair):
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        with self._lock:
            if pair in self._live:
                self._live.remove(pair)

    def cut_now(self):
        with self._lock:
            live = list(self._live)
        for pair in live:
            self._drop(pair)

    def close(self):
        self.lsock.close()
        self.cut_now()


@pytest.fixture
def world(sshd, tmp_path):
    proxy = CutProxy(sshd.port)
    key = " ".join(sshd.host_key.with_suffix(".pub").read_text().split()[:2])
    kh = tmp_path / "known_hosts"
    kh.write_text("[127.0.0.1]:%d %s\n[127.0.0.1]:%d %s\n" % (sshd.port, key, proxy.port, key))
    home = ".rtrain-atomic-%s" % uuid.uuid4().hex[:8]

    def hosts(port, name):
        p = tmp_path / name
        # no connection sharing: each call its own connection, cut at byte N of it
        p.write_text("hosts:\n  tower:\n    ssh: %s@127.0.0.1:%d\n    identity_file: %s\n"
                     "    home: ~/%s\n    lock_dir: %s\n    connect_timeout: 10\n"
                     "    transport: %s\n    control_persist: no\n" % (
                         USER, port, sshd.user_key, home, sshd.lock_dir, sshd.transport))
        return p

    src = tmp_path / "src"
    src.mkdir()
    (src / "check.py").write_text(
        "import hashlib, os\n"
        "for d, dirs, files in sorted(os.walk('.')):\n"
        "    dirs.sort()\n"
        "    for f in sorted(files):\n"
        "        p = os.path.join(d, f)[2:]\n"
        "        print(hashlib.sha256(open(p, 'rb').read()).hexdigest(), p)\n")
    for i in range(300):  # enough files that building the work dir takes a moment
        (src / ("pkg%d" % (i % 7))).mkdir(exist_ok=True)
        (src / ("pkg%d" % (i % 7)) / ("m%03d.py" % i)).write_text("x = %d\n" % i)
    w = {"proxy": proxy, "direct": hosts(sshd.port, "direct.yaml"), "cut": hosts(proxy.port, "cut.yaml"),
         "env": sshd.env(known_hosts=kh), "src": src, "home": "/home/%s/%s" % (USER, home)}
    yield w
    proxy.close()
    for pid in _agent_pids(w["home"], any_verb=True):
        _kill(pid, signal.SIGCONT)
        _kill(pid)
    shutil.rmtree(w["home"], ignore_errors=True)


def _kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def rt(w, hosts, *args, check=True, timeout=120):
    p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(w[hosts])] + [str(a) for a in args],
                       cwd=str(w["src"]), env=w["env"], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
    return p


def new_content(w):
    """Fresh bytes in a large and a small file, so every submit has blobs to send."""
    (w["src"] / "data.bin").write_bytes(os.urandom(3 << 20))
    (w["src"] / "pkg0" / "changed.py").write_text("token = %r\n" % uuid.uuid4().hex)


def _agent_pids(home, any_verb=False):
    """Agent processes of this home: `python3 HOME/agent/agent-*.pyz submit`."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        argv = [a.decode("utf-8", "replace") for a in argv if a]
        if len(argv) >= 3 and argv[-2].startswith(home + "/agent/agent-") and \
                (any_verb or argv[-1] == "submit"):
            out.append(int(pid))
    return out


def _poll(cond, what, limit=60.0):
    deadline = time.time() + limit
    while not cond():
        if time.time() > deadline:
            raise AssertionError("gave up waiting: %s" % what)
        time.sleep(0.02)


def job_ids(w):
    return sorted(j["id"] for j in json.loads(rt(w, "direct", "status", "--json", "--all").stdout))


def assert_nothing_half_made(w, known):
    """Once the agent of the cut submit is gone: no new job, tmp/ empty, jobs/ holds the known
    jobs only, and no temp blob left in the store."""
    _poll(lambda: not _agent_pids(w["home"]), "the cut submit's agent to exit")
    assert job_ids(w) == known
    home = w["home"]
    assert os.listdir(os.path.join(home, "tmp")) == []
    assert sorted(os.listdir(os.path.join(home, "jobs")), key=int) == known
    assert [n for n in os.listdir(os.path.join(home, "store")) if n.startswith(".tmp")] == []


def wait_job(w, job):
    _poll(lambda: json.loads(rt(w, "direct", "status", "--json", job).stdout)["state"] in TERMINAL,
          "job %s to end" % job, limit=120)
    return json.loads(rt(w, "direct", "status", "--json", job).stdout)


def expected_listing(src):
    lines = []
    for d, dirs, files in sorted(os.walk(str(src))):
        dirs.sort()
        for f in sorted(files):
            p = os.path.relpath(os.path.join(d, f), str(src))
            lines.append("%s %s" % (hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest(), p))
    return sorted(lines)


def submit_and_check_snapshot(w, known):
    job = rt(w, "cut", "submit", "-q", "--", "python3", "check.py").stdout.strip()
    assert job.isdigit() and job not in known
    j = wait_job(w, job)
    assert j["state"] == "succeeded", j
    log = rt(w, "direct", "logs", job).stdout
    assert sorted(log.splitlines()) == expected_listing(w["src"])
    return job


def test_connection_cut_mid_submit_leaves_no_job(sshd, world):
    w = world
    proxy = w["proxy"]
    # a clean submit ships the agent and makes the home; a second one, with new content,
    # measures how many bytes the client sends in a whole submit
    first = submit_and_check_snapshot(w, [])
    new_content(w)
    second = submit_and_check_snapshot(w, [first])
    total = proxy.sent
    assert total > 3 << 20  # the upload went through the proxy
    known = sorted([first, second], key=int)
    # handshake and auth, the agent call and its request, then across the blob upload, up to
    # its last bytes (after the upload the client sends nothing until the agent's reply)
    points = [40, 1200, 3000, 5000, 8000] + [int(total * f) for f in (0.01, 0.2, 0.5, 0.8, 0.95)] \
        + [total - 3000]
    for n in points:
        new_content(w)
        proxy.cut_after = n
        cuts = proxy.cuts
        p = rt(w, "cut", "submit", "-q", "--", "python3", "check.py", check=False)
        proxy.cut_after = None
        assert proxy.cuts == cuts + 1, "the connection was not cut at byte %d" % n
        assert p.returncode != 0, "cut at byte %d of %d, yet: %s" % (n, total, p.stdout)
        assert "Traceback" not in p.stderr, p.stderr
        assert_nothing_half_made(w, known)
    # and submitting again works, on the complete snapshot
    known.append(submit_and_check_snapshot(w, known))


def _stat(pid):
    """(comm, ppid, state) of pid, or None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
        rest = data[data.rfind(")") + 2:].split()
        return data[data.index("(") + 1:data.rfind(")")], int(rest[1]), rest[0]
    except (OSError, ValueError, IndexError):
        return None


def _sshd_of(pid):
    """The sshd process that serves pid's session (it holds the other end of pid's stdin)."""
    for _ in range(10):
        st = _stat(pid)
        if st is None:
            return None
        pid = st[1]
        up = _stat(pid)
        if up is not None and up[0].startswith("sshd"):
            return pid
    return None


def _gone(pid):
    st = _stat(pid)
    return st is None or st[2] in ("Z", "X")


def test_cut_after_the_request_before_the_agent_queues_the_job(sshd, world):
    """Everything was sent (nothing to upload: the blobs are there), then the connection drops
    before the agent has queued the job. The agent is frozen (SIGSTOP) as soon as it appears,
    the connection cut, sshd lets go; the agent then reads a whole request from a closed stdin
    and must queue nothing: nobody would ever hear of that job."""
    w = world
    proxy = w["proxy"]
    sub = w["src"] / "pkg0"  # a small tree: the whole request sits in the agent's stdin pipe
    (sub / "check.py").write_text((w["src"] / "check.py").read_text())
    args = ("submit", "-C", str(sub), "-q", "--", "python3", "check.py")
    known = [rt(w, "cut", *args).stdout.strip()]  # its blobs are on the host from now on
    wait_job(w, known[0])
    jobs_dir = os.path.join(w["home"], "jobs")
    for _ in range(20):
        before = sorted(os.listdir(jobs_dir))
        client = subprocess.Popen(
            [sys.executable, "-m", "launcher", "--hosts", str(w["cut"])] + list(args),
            cwd=str(w["src"]), env=w["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        agent = None
        deadline = time.time() + 60
        while agent is None and time.time() < deadline and client.poll() is None:
            pids = _agent_pids(w["home"])
            if pids:
                agent = pids[0]
                _kill(agent, signal.SIGSTOP)
        if agent is None or sorted(os.listdir(jobs_dir)) != before:
            # too late: the job may be queued already (which is right): once more
            if agent is not None:
                _kill(agent, signal.SIGCONT)
            out, _ = client.communicate(timeout=120)
            if client.returncode == 0:
                known.append(out.strip())
            continue
        server = _sshd_of(agent)
        assert server is not None
        proxy.cut_now()
        out, err = client.communicate(timeout=120)
        assert client.returncode != 0, out
        assert "Traceback" not in err, err
        _poll(lambda server=server: _gone(server), "sshd to end the cut session")
        _kill(agent, signal.SIGCONT)
        assert_nothing_half_made(w, sorted(known, key=int))
        break
    else:
        pytest.fail("never caught the agent before it queued the job")
    known.append(rt(w, "cut", *args).stdout.strip())  # and submitting again works
    assert wait_job(w, known[-1])["state"] == "succeeded"
