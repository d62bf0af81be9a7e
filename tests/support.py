"""Shared by the tests: where things are, and skip-locally-but-fail-in-CI."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The Unix users of the integration tests. RTRAIN_TEST_USER_TAG (a few letters) gives another
# checkout its own users, so two test runs on one machine never kill each other's processes.
USER_TAG = os.environ.get("RTRAIN_TEST_USER_TAG", "")
ALICE = "rtrain-alice" + USER_TAG
BOB = "rtrain-bob" + USER_TAG
NOPY = "rtrain-nopy" + USER_TAG


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition, reason):
    """Skip locally when a real part can't be started; fail in CI, where it must be there."""
    if not condition:
        if in_ci():
            pytest.fail("CI=true but " + reason)
        pytest.skip(reason)


def daemon_pid(home, lock="daemon.lock"):
    """The pid of the daemon (or the monitor, or the notification sender: `lock`) that last held
    its lock file in RTRAIN_HOME ({"pid", ...})."""
    try:
        return int(json.loads((Path(str(home)) / lock).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stop_agent(home):
    """SIGKILL, by pid, the daemon and every job process of the agent whose RTRAIN_HOME is
    `home` (a Path): what a test leaves running."""
    targets = [(daemon_pid(home, lock), False) for lock in ("daemon.lock", "monitor.lock", "notify.lock")]
    for f in home.glob("jobs/*/pid.json"):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        targets += [(info.get("pgid"), True), (info.get("wrapper_pid"), False)]
    for pid, group in targets:
        try:
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass


def closed_port():
    """A loopback port nobody listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def fill_disk(d, leave=0):
    """Fill the file system holding folder d, leaving about `leave` bytes free; returns the
    filler file (delete it to free the space)."""
    filler = Path(str(d)) / "filler"
    with open(filler, "ab") as f:
        while True:
            st = os.statvfs(str(d))
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            try:
                f.write(b"\0" * min(room, 1 << 16))
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return filler


def one_error(p, *needles, anywhere=False):
    """The run failed with exit 1 and said so in one `rtrain: error:` line plus at most one
    hint line, no traceback (notes of a submit's retries aside). Each needle must be in the
    error line (anywhere=True: in the error or the hint). Returns the lines."""
    err = "".join(x for x in p.stderr.splitlines(True) if not x.startswith("rtrain: connection lost ("))
    assert p.returncode == 1, "exit %d\nstdout: %s\nstderr: %s" % (p.returncode, p.stdout, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("rtrain: error: "), err
    assert len(lines) <= 2 and all(x.startswith("  hint: ") for x in lines[1:]), err
    where = err if anywhere else lines[0]
    for n in needles:
        assert n in where, "%r not in %r" % (n, where)
    return lines


def path_without(names, where):
    """A PATH on which the programs `names` are not found, whatever this machine has installed
    (a real or stray nvidia-smi in /usr/local/bin, say): a folder under `where` holding a link
    to every other program of $PATH, first one of each name wins, as a lookup would."""
    d = Path(str(where)) / ("path-without-%s" % "-".join(sorted(names)))
    d.mkdir(parents=True, exist_ok=True)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for name in entries:
            full = os.path.join(folder, name)
            if name in names or (d / name).exists() or not os.access(full, os.X_OK):
                continue
            try:
                os.symlink(full, str(d / name))
            except OSError:
                pass
    return str(d)


def blob_bytes(st, h):
    """A blob's bytes as a job gets them: materialized into a work dir of its own."""
    import shutil
    import tempfile
    from launcher.agent.materialize import materialize
    d = tempfile.mkdtemp()
    try:
        materialize(st, [{"path": "f", "type": "file", "hash": h, "size": None, "exec": False}], d)
        with open(os.path.join(d, "f"), "rb") as f:
            return f.read()
    finally:
        shutil.rmtree(d)


def store_blobs(root):
    """Every blob in the store at root, sorted: loose files and pack index rows."""
    import sqlite3
    out = set()
    for name in os.listdir(str(root)):
        d = os.path.join(str(root), name)
        if len(name) == 2 and os.path.isdir(d):
            out.update(name + rest for rest in os.listdir(d))
    con = sqlite3.connect(os.path.join(str(root), "index.sqlite"))
    out.update(h for (h,) in con.execute("SELECT hash FROM packed"))
    con.close()
    return sorted(out)


def rtrain(sshd, hosts, *args, cwd, env=None, check=True, timeout=120):
    """Run this checkout's rtrain CLI in cwd with `--hosts hosts` (none when hosts is None), as
    the sshd fixture's client (env: sshd.env() unless given). With check, a failure raises with
    its exit code and output."""
    argv = [sys.executable, "-m", "launcher"] + (["--hosts", str(hosts)] if hosts else [])
    p = subprocess.run(argv + [str(a) for a in args], cwd=str(cwd), env=env or sshd.env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
    return p


def wait_ended(sshd, hosts, job, cwd, env=None, timeout=120):
    """The job (`status --json`) once it is neither queued nor running; raises after timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = json.loads(rtrain(sshd, hosts, "status", "--json", job, cwd=cwd, env=env).stdout)
        if j["state"] not in ("queued", "running"):
            return j
        time.sleep(0.2)
    raise AssertionError("job %s did not end" % job)
