"""OpenSSH's connection sharing, against the real sshd: one master per host, reused by the next
command; a master that is dead (SIGKILL), frozen (its network silent) or left over from before
a sleep of the laptop is dropped and the command still works, within the stall limit (the
host's connect_timeout); two rtrain starting at once make one master; the control directory
must be private; `rtrain hosts` says what is shared and --disconnect closes it. No timed
assertions beyond "no longer than the stall limit" (with a wide margin)."""
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from netproxy import FreezingProxy
from support import ALICE, BOB, one_error

SSH_TRANSPORTS = ("openssh",)  # conftest: these tests run on the openssh transport only
MARGIN_S = 10  # what a busy CI machine may add to a limit


@pytest.fixture
def ctl(sshd):
    """A control directory of the test's own (short: socket paths are limited)."""
    d = sshd.root / ("cm-%s" % uuid.uuid4().hex[:6])
    yield d
    from launcher.openssh import close_master
    if d.is_dir():
        for p in d.iterdir():
            if p.is_socket():
                close_master("ssh", str(p))


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    return d


def env_for(sshd, ctl, **extra):
    return sshd.env(RTRAIN_SSH_CONTROL_DIR=str(ctl), **extra)


def rt(hosts, *args, cwd, env, check=True, timeout=120):
    p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(hosts)] + [str(a) for a in args],
                       cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
    return p


def masters(ctl):
    """Pids of the OpenSSH masters serving sockets in ctl (their title: `ssh: PATH [mux]`)."""
    want = ("ssh: %s/" % ctl).encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path("/proc/%s/cmdline" % d).read_bytes().startswith(want):
                    out.append(int(d))
            except OSError:
                pass
    return sorted(out)


def wait_gone(pid, limit=10):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            st = Path("/proc/%d/stat" % pid).read_text()
            if st[st.rfind(")") + 2] in "ZX":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def tower(sshd, tmp_path, port=None, **extra):
    return sshd.hosts_yaml(tmp_path / ("hosts-%s.yaml" % uuid.uuid4().hex[:6]),
                           {"tower": (ALICE, port or sshd.port, extra)})


def test_commands_share_one_master_and_hosts_says_so(sshd, ctl, tmp_path, src):
    env = env_for(sshd, ctl)
    hosts = tower(sshd, tmp_path)
    doc = rt(hosts, "hosts", "tower", cwd=src, env=env).stdout
    assert "ok   transport  openssh, shared connection opened (closes 10m after its last use)" in doc, doc
    [pid] = masters(ctl)
    for _ in range(3):
        rt(hosts, "status", "--host", "tower", cwd=src, env=env)
    assert masters(ctl) == [pid]
    assert "openssh, shared connection up (reused" in rt(hosts, "hosts", "tower", cwd=src, env=env).stdout
    out = rt(hosts, "hosts", "--disconnect", "tower", cwd=src, env=env).stdout
    assert out == "tower: shared connection closed\n", out
    assert wait_gone(pid) and masters(ctl) == []
    assert rt(hosts, "hosts", "--disconnect", cwd=src, env=env).stdout == "tower: no shared connection\n"
    # control_persist: no -> no sharing at all
    off = tower(sshd, tmp_path, control_persist="no")
    rt(off, "status", "--host", "tower", cwd=src, env=env)
    assert masters(ctl) == []
    assert "openssh, no connection sharing" in rt(off, "hosts", "tower", cwd=src, env=env).stdout


def test_a_master_killed_between_two_commands(sshd, ctl, tmp_path, src):
    env = env_for(sshd, ctl)
    hosts = tower(sshd, tmp_path, connect_timeout=3)
    rt(hosts, "status", "--host", "tower", cwd=src, env=env)
    [pid] = masters(ctl)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    t = time.time()
    rt(hosts, "status", "--host", "tower", cwd=src, env=env)
    assert time.time() - t < 3 + MARGIN_S
    new = masters(ctl)
    assert len(new) == 1 and new != [pid]


def test_a_frozen_master_is_dropped_within_the_stall_limit(sshd, ctl, tmp_path, src):
    """The network of the master goes silent (no reset): the next command must not hang on it."""
    proxy = FreezingProxy(sshd.port)
    try:
        kh = tmp_path / "kh"
        kh.write_text("[127.0.0.1]:%d %s\n" % (proxy.port, " ".join(
            sshd.host_key.with_suffix(".pub").read_text().split()[:2])))
        env = env_for(sshd, ctl, RTRAIN_KNOWN_HOSTS=str(kh))
        hosts = tower(sshd, tmp_path, port=proxy.port, connect_timeout=3)
        (src / "a.py").write_text("print('ran')\n")
        job = rt(hosts, "submit", "-q", "--", "python3", "a.py", cwd=src, env=env).stdout.strip()
        [pid] = masters(ctl)
        assert proxy.freeze() == 1
        t = time.time()
        st = rt(hosts, "status", "--host", "tower", cwd=src, env=env)
        print("status after the freeze: %.2fs" % (time.time() - t))
        assert time.time() - t < 3 + MARGIN_S
        assert job in st.stdout
        assert wait_gone(pid)
        assert len(masters(ctl)) == 1 and masters(ctl) != [pid]
        # the job is the one submitted through the master that froze; the new master serves
        deadline = time.time() + 60
        while "succeeded" not in rt(hosts, "status", job, cwd=src, env=env).stdout:
            assert time.time() < deadline
            time.sleep(0.2)
        assert rt(hosts, "logs", job, cwd=src, env=env).stdout == "ran\n"
    finally:
        proxy.close()


def test_a_master_from_before_a_sleep_is_not_trusted(sshd, ctl, tmp_path, src):
    """The laptop slept: the wall clock ran on, the monotonic clock did not. The master left from
    before is dropped unused (its TCP connection is most likely dead), and a new one made."""
    env = env_for(sshd, ctl)
    hosts = tower(sshd, tmp_path)
    rt(hosts, "status", "--host", "tower", cwd=src, env=env)
    [pid] = masters(ctl)
    [stamp] = [p for p in ctl.iterdir() if p.name.endswith(".t")]
    stamp.write_text("%f %f\n" % (time.time() - 3600, time.monotonic() - 60))  # slept ~59 minutes
    rt(hosts, "status", "--host", "tower", cwd=src, env=env)
    assert wait_gone(pid)
    assert len(masters(ctl)) == 1 and masters(ctl) != [pid]
    # a master used since (no sleep) is kept
    [pid] = masters(ctl)
    rt(hosts, "status", "--host", "tower", cwd=src, env=env)
    assert masters(ctl) == [pid]


def test_two_rtrain_starting_at_once_make_one_master(sshd, ctl, tmp_path, src):
    env = env_for(sshd, ctl)
    hosts = tower(sshd, tmp_path)
    rt(hosts, "status", "--host", "tower", cwd=src, env=env)  # the agent is shipped
    for _ in range(3):
        rt(hosts, "hosts", "--disconnect", cwd=src, env=env)
        assert masters(ctl) == []
        procs = [subprocess.Popen([sys.executable, "-m", "launcher", "--hosts", str(hosts), "status",
                                   "--host", "tower"], cwd=str(src), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all(o[1] == "" for o in outs), outs
        assert len(masters(ctl)) == 1


def test_a_control_dir_of_another_user_or_writable_by_others_is_refused(sshd, tmp_path, src):
    hosts = tower(sshd, tmp_path)
    theirs = sshd.root / ("cm-%s" % uuid.uuid4().hex[:6])
    theirs.mkdir(mode=0o700)
    shutil.chown(str(theirs), BOB, BOB)
    p = rt(hosts, "status", "--host", "tower", cwd=src, env=env_for(sshd, theirs), check=False)
    one_error(p, "tower: the SSH control directory %s is owned by another user" % theirs)
    assert "RTRAIN_SSH_CONTROL_DIR" in p.stderr
    open_dir = sshd.root / ("cm-%s" % uuid.uuid4().hex[:6])
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    p = rt(hosts, "status", "--host", "tower", cwd=src, env=env_for(sshd, open_dir), check=False)
    one_error(p, "tower: the SSH control directory %s can be written by other users" % open_dir)
    assert list(open_dir.iterdir()) == [] and list(theirs.iterdir()) == []


def test_a_command_over_openssh_imports_no_paramiko(sshd, ctl, tmp_path, src):
    env = env_for(sshd, ctl)
    hosts = tower(sshd, tmp_path)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher", "--hosts", str(hosts),
                        "status", "--host", "tower"], cwd=str(src), env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines()
                if line.startswith("import time:")}
    assert "json" in imported  # the probe sees imports
    assert not imported & {"paramiko", "fabric", "invoke", "cryptography", "nacl", "bcrypt"}, imported


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["status"]])
def test_commands_without_a_host_import_no_ssh_library(tmp_path, args):
    """--version, --help and `status` of the local host (no hosts file) load neither paramiko nor
    fabric: seen by `python -X importtime`."""
    from support import REPO
    env = dict(os.environ, PYTHONPATH=str(REPO), RTRAIN_HOME=str(tmp_path / "home"),
               HOME=str(tmp_path / "userhome"))
    env.pop("RTRAIN_HOSTS", None)
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher"] + args, cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines()
                if line.startswith("import time:")}
    assert "launcher" in imported
    assert not imported & {"paramiko", "fabric", "invoke"}, sorted(imported)
