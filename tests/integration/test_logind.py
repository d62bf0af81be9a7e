"""logind and the user manager (agent/logind.py): `rtrain hosts` says when jobs would die at
logout and how to fix it, and the daemon moves into a user-manager scope where one answers.
These machines run no systemd, so loginctl and systemd-run are stand-ins (tests/fakes/) that
answer as the real ones do; everything else is real."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

FAKES = Path(__file__).resolve().parents[1] / "fakes"


def _install(world, name):
    shutil.copyfile(str(FAKES / name), str(world.bin_dir / name))
    os.chmod(str(world.bin_dir / name), 0o755)


@pytest.mark.parametrize("logind,ok", [("KillUserProcesses=yes Linger=no", False),
                                       ("KillUserProcesses=yes Linger=yes", True),
                                       ("KillUserProcesses=no Linger=no", None)])
def test_hosts_says_when_logind_would_end_jobs_and_the_fix(world, logind, ok):
    _install(world, "loginctl")
    p = world.run("hosts", check=False, env=world.env(FAKE_LOGIND=logind))
    line = [x for x in p.stdout.splitlines() if " logind " in x]
    if ok is None:
        assert not line and p.returncode == 0, p.stdout
        return
    assert len(line) == 1, p.stdout
    if ok:
        assert line[0].split()[0] == "ok" and p.returncode == 0, p.stdout
    else:
        assert line[0].split()[0] == "FAIL" and "KillUserProcesses=yes" in line[0], p.stdout
        assert "fix: loginctl enable-linger root" in p.stdout and p.returncode == 1, p.stdout


def _daemon_environ(world):
    from support import daemon_pid
    deadline = time.time() + 10
    while time.time() < deadline:
        pid = daemon_pid(world.home)
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                return dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        except (OSError, TypeError):
            time.sleep(0.05)
    raise AssertionError("no daemon")


@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_the_daemon_moves_into_a_user_manager_scope_where_one_answers(world, tmp_path, mode):
    _install(world, "systemd-run")
    runtime = tmp_path / "runtime"
    (runtime / "systemd").mkdir(parents=True)
    (runtime / "systemd" / "private").write_text("")  # the user manager's socket, as stat sees it
    log = tmp_path / "systemd-run.log"
    env = world.env(XDG_RUNTIME_DIR=str(runtime), FAKE_SYSTEMD_RUN_LOG=str(log),
                    FAKE_SYSTEMD_RUN=mode)
    job = world.run("submit", "-q", "--", "echo", "ran", env=env).stdout.strip()
    deadline = time.time() + 20
    while time.time() < deadline:
        j = json.loads(world.run("status", "--json", job, env=env).stdout)
        if j["state"] == "succeeded":
            break
        time.sleep(0.1)
    assert j["state"] == "succeeded", j
    args = log.read_text().split()
    assert args[:3] == ["--user", "--scope", "--quiet"] and "--property=Delegate=yes" in args
    assert args[-1] == "daemon" and any(a.startswith("--unit=rtrain-daemon-") for a in args)
    env_of_daemon = _daemon_environ(world)
    if mode == "ok":  # the daemon serving is the one started through systemd-run
        assert env_of_daemon.get(b"RTRAIN_DAEMON_SCOPE") == b"1"
    else:             # refused: the daemon says so in its log and serves from the session
        assert b"RTRAIN_DAEMON_SCOPE" not in env_of_daemon
        assert "could not start the daemon in a systemd user scope" in \
            (world.home / "daemon.log").read_text()
