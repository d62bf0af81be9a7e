"""A shared tower with a careless or hostile co-tenant (docs/design.md "Leases", "Stdlib agent";
README "Sharing a tower"): another real Unix user (BOB) does what an ordinary user can in the
shared lock dir and on a shared disk, while ALICE uses rtrain over the real sshd. Nothing they
do hands a GPU out twice, runs their code as ALICE, or queues a job twice; what they leave is
named honestly."""
import json
import os
import pwd
import shutil
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import ALICE, BOB, need, one_error
from support import rtrain as rt
from support import wait_ended as wait

PY = "/usr/bin/python3"


def as_user(user, code, *args, background=False):
    """Run Python code as another real Unix user, from / (setpriv execs it in place: the
    process returned is the user's own, and ends when it is killed). A background one ends
    when its stdin closes (stop())."""
    need(os.path.exists(PY) and shutil.which("setpriv"), "setpriv and %s are needed" % PY)
    pw = pwd.getpwnam(user)
    argv = ["setpriv", "--reuid=%d" % pw.pw_uid, "--regid=%d" % pw.pw_gid, "--init-groups", PY,
            "-c", code] + [str(a) for a in args]
    env = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir}
    if background:
        return subprocess.Popen(argv, cwd="/", env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(argv, cwd="/", env=env, capture_output=True, text=True, timeout=60,
                          check=True)


def stop(p):
    p.kill()
    p.wait(10)


@pytest.fixture
def shared(sshd):
    """A folder every test user can reach (sshd.root is 0755), removed afterwards."""
    d = sshd.root / ("shared-%s" % uuid.uuid4().hex[:8])
    d.mkdir(mode=0o755)
    yield d
    shutil.rmtree(str(d), ignore_errors=True)


def _world_dir(path):
    path.mkdir(mode=0o1777)
    os.chmod(path, 0o1777)
    return path


def _state(sshd, n):
    import fakesmi
    fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json", gpus=n)
    os.chmod(sshd.bin_dir / "nvidia-smi-state.json", 0o644)
    return [g["uuid"] for g in json.loads((sshd.bin_dir / "nvidia-smi-state.json").read_text())["gpus"]]


# ------------------------------------------------------------------ GPU leases

CHAOS = r'''
import fcntl, os, sys, time
lock_dir, until, uuids = sys.argv[1], time.time() + float(sys.argv[2]), sys.argv[3:]
i = 0
while time.time() < until:
    i += 1
    for n in os.listdir(lock_dir):
        p = os.path.join(lock_dir, n)
        try:
            if n.startswith("rtrain-wake-"):          # flood every waiting daemon
                fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, b"x" * 512)
                os.close(fd)
            elif n.startswith("rtrain-gpu-"):         # unlink or rename lease files
                (os.rename(p, p + ".moved") if i % 3 == 0 else os.unlink(p))
        except OSError:
            pass
    for k, u in enumerate(uuids):                     # plant junk at lease names
        p = os.path.join(lock_dir, "rtrain-gpu-%s.lock" % u)
        try:
            kind = (i + k) % 5
            if kind == 0:
                os.mkfifo(p, 0o666)
            elif kind == 1:
                os.symlink("/etc/passwd", p)
            elif kind == 2:
                os.mkdir(p)
            elif kind == 3:
                open(p, "w").close()
                os.chmod(p, 0)
            else:                                     # hold its flock a moment
                fd = os.open(p, os.O_RDONLY | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                time.sleep(0.05)
                os.close(fd)
        except OSError:
            pass
    time.sleep(0.01)
'''

REC = ("import os, sys, time\nt0 = time.time(); time.sleep(0.25); t1 = time.time()\n"
       "open(sys.argv[1] + '/' + sys.argv[2] + '-' + os.environ['RTRAIN_JOB_ID'], 'w').write("
       "'%s %r %r' % (os.environ['CUDA_VISIBLE_DEVICES'], t0, t1))\n")


def test_nothing_a_co_tenant_does_in_the_lock_dir_hands_a_gpu_out_twice(sshd, shared, tmp_path):
    uuids = _state(sshd, 2)
    lock_dir = _world_dir(shared / "locks")
    rec = _world_dir(shared / "rec")
    worlds = []
    for user in (ALICE, BOB):
        src = tmp_path / user
        src.mkdir()
        (src / "rec.py").write_text(REC)
        worlds.append((user, src, sshd.hosts_yaml(src / "hosts.yaml", {"tower": (user, sshd.port, {
            "lock_dir": lock_dir})})))
    stopping = threading.Event()

    def tmp_cleaner():  # systemd-tmpfiles, `rm -rf /tmp/*`: root, deleting whatever is there
        while not stopping.is_set():
            for n in os.listdir(str(lock_dir)):
                p = lock_dir / n
                try:
                    (shutil.rmtree if p.is_dir() and not p.is_symlink() else os.unlink)(str(p))
                except OSError:
                    pass
            time.sleep(0.03)

    chaos = as_user(BOB, CHAOS, lock_dir, 120, *uuids, background=True)
    cleaner = threading.Thread(target=tmp_cleaner, daemon=True)
    cleaner.start()
    try:
        def go(w):
            user, src, hosts = w
            return w, rt(sshd, hosts, "submit", "-q", "--gpus", "1", "--", "python3", "rec.py", rec,
                         user, cwd=src).stdout.strip()

        with ThreadPoolExecutor(6) as ex:
            jobs = list(ex.map(go, [worlds[0]] * 10 + [worlds[1]] * 6))
        for (_, src, hosts), job in jobs:
            assert wait(sshd, hosts, job, src)["state"] == "succeeded"
        assert chaos.poll() is None, chaos.stderr.read()  # it was at it the whole time
    finally:
        stopping.set()
        stop(chaos)
    spans = {}
    for f in rec.iterdir():
        gpu, t0, t1 = f.read_text().split()
        assert gpu in uuids
        spans.setdefault(gpu, []).append((float(t0), float(t1), f.name))
    assert sum(map(len, spans.values())) == 16
    for gpu, s in spans.items():
        s.sort()
        for a, b in zip(s, s[1:]):
            assert a[1] <= b[0], "GPU %s held by %s and %s at once" % (gpu, a[2], b[2])


HOLD = r'''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
'''


def test_junk_at_lease_names_is_shown_and_blocks_nothing_a_held_flock_is_named(sshd, shared, tmp_path):
    uuids = _state(sshd, 4)
    lock_dir = _world_dir(shared / "locks")
    junk = ("import os, sys\nd, u = sys.argv[1], sys.argv[2:]\nn = lambda x: os.path.join(d, "
            "'rtrain-gpu-%s.lock' % x)\nos.mkfifo(n(u[0]), 0o666)\nos.mkdir(n(u[1]))\n"
            "os.symlink('/etc/passwd', n(u[2]))\nopen(n(u[3]), 'w').close()\nos.chmod(n(u[3]), 0)\n")
    as_user(BOB, junk, lock_dir, *uuids)
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, sshd.port, {"lock_dir": lock_dir})})
    rows = {r["uuid"]: r for r in json.loads(rt(sshd, hosts, "gpus", "--json", cwd=tmp_path).stdout)}
    assert all(r["state"] == "free" for r in rows.values()), rows
    for u, what in zip(uuids, ("a FIFO", "a directory", "a symlink", "Permission denied")):
        assert what in rows[u]["reason"] and "ignored" in rows[u]["reason"], rows[u]
    job = rt(sshd, hosts, "submit", "-q", "--gpus", "4", "--", "true", cwd=tmp_path).stdout.strip()
    assert wait(sshd, hosts, job, tmp_path)["state"] == "succeeded"  # not "0 of 4 free"
    # a co-tenant (or an older rtrain agent) holding a lease file's flock: busy, and by whom
    os.rmdir(os.path.join(str(lock_dir), "rtrain-gpu-%s.lock" % uuids[1]))  # BOB's junk folder
    holder = as_user(BOB, HOLD, os.path.join(str(lock_dir), "rtrain-gpu-%s.lock" % uuids[1]),
                     background=True)
    try:
        assert holder.stdout.readline() == b"held\n"
        rows = {r["uuid"]: r for r in json.loads(rt(sshd, hosts, "gpus", "--json", cwd=tmp_path).stdout)}
        r = rows[uuids[1]]
        assert r["state"] == "busy" and BOB in r["holder"] and "lease file is locked" in r["holder"], r
        job = rt(sshd, hosts, "submit", "-q", "--gpus", "4", "--", "true", cwd=tmp_path).stdout.strip()
        time.sleep(1)
        j = json.loads(rt(sshd, hosts, "status", "--json", job, cwd=tmp_path).stdout)
        assert j["state"] == "queued" and "3 of 4 free" in j["message"], j
    finally:
        stop(holder)
    assert wait(sshd, hosts, job, tmp_path)["state"] == "succeeded"


# ------------------------------------------------------------------ homes on a shared disk

def test_a_home_a_co_tenant_made_or_can_write_is_refused_and_nothing_of_theirs_runs(sshd, shared, tmp_path):
    from launcher import agentpkg
    _state(sshd, 1)
    scratch = _world_dir(shared / "scratch")        # a /scratch everybody may write to (sticky)
    marks = _world_dir(shared / "marks")
    h16 = agentpkg.build()[1][:16]
    plant = r'''
import os, sys, zipfile
home, h16, mark = sys.argv[1:]
os.makedirs(home + "/agent/agent-%s.d/rtrain_agent" % h16)
code = "open(%r, 'w').write(str(os.getuid()))\n" % mark
with zipfile.ZipFile(home + "/agent/agent-%s.pyz" % h16, "w") as z:
    z.writestr("__main__.py", "import os\n" + code)
d = home + "/agent/agent-%s.d/rtrain_agent/" % h16
open(d + "__init__.py", "w").write("")
open(d + "main.py", "w").write("import os\ndef main():\n    " + code)
for root, dirs, files in os.walk(home):
    for n in [root] + [os.path.join(root, f) for f in files]:
        os.chmod(n, 0o777)
'''
    home = scratch / "alice-rtrain"
    mark = marks / "ran"
    as_user(BOB, plant, home, h16, mark)
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, sshd.port, {"home": home})})
    for cmd in (["status"], ["submit", "--", "true"]):
        p = rt(sshd, hosts, *cmd, cwd=tmp_path, check=False)
        one_error(p, str(home), "belongs to %s" % BOB)
        assert "home:" in p.stderr
    assert not mark.exists(), "the co-tenant's code ran as %s" % mark.read_text()
    doc = rt(sshd, hosts, "hosts", cwd=tmp_path, check=False)
    assert doc.returncode == 1 and "FAIL home" in " ".join(doc.stdout.split()), doc.stdout
    # a home of ALICE's own that others can write to: refused, with the chmod that fixes it
    mine = scratch / "alice-own"
    as_user(ALICE, "import os, sys; os.mkdir(sys.argv[1]); os.chmod(sys.argv[1], 0o777)", mine)
    hosts = sshd.hosts_yaml(tmp_path / "hosts2.yaml", {"tower": (ALICE, sshd.port, {"home": mine})})
    p = rt(sshd, hosts, "status", cwd=tmp_path, check=False)
    one_error(p, str(mine), "can be written by other users")
    assert "chmod go-w %s" % mine in p.stderr
    as_user(ALICE, "import os, sys; os.chmod(sys.argv[1], 0o700)", mine)
    job = rt(sshd, hosts, "submit", "-q", "--", "true", cwd=tmp_path).stdout.strip()
    assert wait(sshd, hosts, job, tmp_path)["state"] == "succeeded"
    assert not mark.exists()


# ------------------------------------------------------------------ a held job database

HOLD_DB = r'''
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("ROLLBACK")
'''


def test_a_submit_held_up_by_the_job_database_is_never_queued_twice(sshd, tmp_path):
    home = os.path.join(pwd.getpwnam(ALICE).pw_dir, ".rtrain-held-%s" % uuid.uuid4().hex[:8])
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, sshd.port, {
        "home": home, "io_timeout": 2})})
    (tmp_path / "train.py").write_text("print('once')\n")
    rt(sshd, hosts, "status", cwd=tmp_path)  # the home and its job database exist
    holder = as_user(ALICE, HOLD_DB, home + "/jobs.sqlite", 9, background=True)
    try:
        assert holder.stdout.readline() == b"held\n"
        p = rt(sshd, hosts, "submit", "-q", "--", "python3", "train.py", cwd=tmp_path, check=False)
        lines = one_error(p, "may still be queued", anywhere=True)
        assert "rtrain status" in lines[-1] and "not by submitting again" in lines[-1], p.stderr
        assert "not queued" not in p.stderr.replace("may still be queued", "")
    finally:
        holder.wait(30)
    # once the lock is let go, the held agent finds its client gone: it queues nothing
    deadline = time.time() + 30
    while time.time() < deadline:
        jobs = json.loads(rt(sshd, hosts, "status", "--json", "--all", cwd=tmp_path).stdout)
        agents = subprocess.run(["pgrep", "-u", ALICE, "-f", home + "/agent/agent-.*submit"],
                                capture_output=True).stdout.split()
        if not agents:
            break
        time.sleep(0.2)
    assert jobs == [] and not agents
    job = rt(sshd, hosts, "submit", "-q", "--", "python3", "train.py", cwd=tmp_path).stdout.strip()
    assert wait(sshd, hosts, job, tmp_path)["state"] == "succeeded"
    assert [j["id"] for j in json.loads(rt(sshd, hosts, "status", "--json", "--all", cwd=tmp_path).stdout)] == [job]


# ------------------------------------------------------------------ a job's cgroup

ESCAPE = ("setsid env -i /bin/sleep 300 < /dev/null > /dev/null 2>&1 & echo $! >> pids\n"
          "setsid sleep 301 < /dev/null > /dev/null 2>&1 & echo $! >> pids\n"
          "while [ \"$(wc -l < pids)\" -lt 2 ]; do sleep 0.05; done\nsleep 300\n")


def test_cancel_ends_even_a_child_that_dropped_every_marker_in_a_delegated_cgroup(sshd, tmp_path):
    """ALICE's sessions run in a cgroup v2 subtree delegated to her (as systemd's Delegate=yes
    gives one): each job gets a cgroup of its own, and cancel ends a child that called setsid
    and cleared its environment, which only the cgroup still knows."""
    from launcher.agent import jobprocs
    mount = jobprocs._cgroup2_mount()
    need(mount is not None and os.geteuid() == 0 and os.path.exists(mount + "/cgroup.procs"),
         "a writable cgroup v2 hierarchy (root) is needed to delegate one")
    me = open("/proc/self/cgroup").read().split("0::", 1)[1].split()[0]
    cg = mount + me.rstrip("/") + "/rtrain-test-%s" % uuid.uuid4().hex[:8]
    os.mkdir(cg)
    uid = pwd.getpwnam(ALICE).pw_uid
    for n in ("", "/cgroup.procs", "/cgroup.threads", "/cgroup.subtree_control"):
        os.chown(cg + n, uid, -1)
    port = None
    try:
        with open(cg + "/cgroup.procs", "w") as f:   # an sshd born in it: every session is
            f.write("%d\n" % os.getpid())
        try:
            port, _key, kh = sshd.start("cg-%s" % uuid.uuid4().hex[:6])
        finally:
            with open(mount + me + "/cgroup.procs", "w") as f:
                f.write("%d\n" % os.getpid())
        env = sshd.env(known_hosts=kh)
        hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, port)})
        (tmp_path / "escape.sh").write_text(ESCAPE)
        job = rt(sshd, hosts, "submit", "-q", "--", "sh", "escape.sh", cwd=tmp_path, env=env).stdout.strip()
        def sleepers():  # the job's sleeps (its two escapes and its own), from its cgroup
            jobdirs = [d for d in os.listdir(cg) if d.startswith("rtrain-")]
            out = {}
            for p in (jobprocs.cgroup_pids(os.path.join(cg, jobdirs[0])) if jobdirs else ()):
                try:
                    if open("/proc/%d/comm" % p).read().strip() == "sleep":
                        out[p] = open("/proc/%d/environ" % p, "rb").read()
                except OSError:
                    continue
            return out

        deadline = time.time() + 20
        found = {}
        while time.time() < deadline and len(found) < 3:
            found = sleepers()
            time.sleep(0.1)
        assert len(found) == 3, "the job's cgroup in %s holds %s" % (cg, found)
        assert sum(b"RTRAIN_JOB_TAG" not in e for e in found.values()) == 1  # one dropped it
        wrapper_free = list(found)
        rt(sshd, hosts, "cancel", job, cwd=tmp_path, env=env)
        assert wait(sshd, hosts, job, tmp_path, env=env)["state"] == "cancelled"
        deadline = time.time() + 10
        while time.time() < deadline and any(os.path.exists("/proc/%d" % p) for p in wrapper_free):
            time.sleep(0.05)
        assert not [p for p in wrapper_free if os.path.exists("/proc/%d" % p)]
        assert not [d for d in os.listdir(cg) if d.startswith("rtrain-")]  # and its cgroup is gone
    finally:
        if port is not None:
            sshd.procs[-1].terminate()
            sshd.procs[-1].wait(10)
        for d, _dirs, _ in sorted(os.walk(cg), key=lambda x: -len(x[0])):
            try:
                with open(d + "/cgroup.kill", "w") as f:
                    f.write("1\n")
            except OSError:
                pass
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.1)
