"""Shared by the tests: where things are, and skip-locally-but-fail-in-CI."""
import errno
import json
import os
import signal
import socket
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


def stop_agent(home):
    """SIGKILL, by pid, the daemon and every job process of the agent whose RTRAIN_HOME is
    `home` (a Path): what a test leaves running."""
    targets = []
    try:
        targets.append((int((home / "daemon.lock").read_text().strip()), False))
    except (OSError, ValueError):
        pass
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
