"""One tower, two real Unix users (ALICE, BOB), each with rtrain over a real sshd and a daemon
of their own (docs/design.md "Sharing a GPU", "Fair share between users", "Tower policy"):
jobs sharing a GPU never mix with whole-GPU jobs; a freed GPU goes to the user holding the
fewest; the admin's tower.yaml hides, orders, caps and reserves GPUs, and is ignored when a
user could have written it."""
import json
import os
import pwd
import subprocess
import sys
import time
import uuid

import pytest

from support import ALICE, BOB

DEFER_S = 20  # how long a daemon leaves a free GPU to a user ahead (fairshare.py): long here, so
# that only a wrong decision, never a slow machine, hands a GPU to the wrong user

HOLD = ("import os, sys, time\nd, who = sys.argv[1], sys.argv[2]\nj = os.environ['RTRAIN_JOB_ID']\n"
        "t0 = time.time()\nopen('%s/.start-%s-%s' % (d, who, j), 'w').write('%s %r' % ("
        "os.environ['CUDA_VISIBLE_DEVICES'], t0))\n"
        "os.rename('%s/.start-%s-%s' % (d, who, j), '%s/start-%s-%s' % (d, who, j))\n"
        "hold = float(sys.argv[3]) if len(sys.argv) > 3 else None\n"
        "while (time.time() - t0 < hold) if hold is not None else not os.path.exists("
        "'%s/release-%s-%s' % (d, who, j)):\n    time.sleep(0.02)\n"
        "open('%s/.end-%s-%s' % (d, who, j), 'w').write(repr(time.time()))\n"
        "os.rename('%s/.end-%s-%s' % (d, who, j), '%s/end-%s-%s' % (d, who, j))\n")


@pytest.fixture(scope="module")
def tower(sshd):
    """A second sshd whose sessions point rtrain at a tower policy file of this test (absent
    until a test writes it) and wait long for fair share."""
    policy_dir = sshd.root / "policy"
    policy_dir.mkdir(mode=0o755)
    os.chmod(str(policy_dir), 0o755)
    port, _key, kh = sshd.start("tower-%s" % uuid.uuid4().hex[:6], set_env={
        "RTRAIN_TOWER_POLICY": str(policy_dir / "tower.yaml"), "RTRAIN_FAIRSHARE_DEFER_S": str(DEFER_S)})
    return {"port": port, "known_hosts": kh, "policy": policy_dir / "tower.yaml"}


class World:
    """Both users' hosts.yaml (one lease dir), their sources, a folder where jobs leave records."""

    def __init__(self, sshd, tower, tmp_path, gpus=4, lock_dir=True):
        import fakesmi
        self.uuids = [g["uuid"] for g in fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json",
                                                              gpus=gpus)["gpus"]]
        os.chmod(sshd.bin_dir / "nvidia-smi-state.json", 0o644)
        self.sshd, self.tower = sshd, tower
        self.shared = sshd.root / ("t12-%s" % uuid.uuid4().hex[:8])
        for d in (self.shared, self.shared / "locks", self.shared / "rec"):
            d.mkdir()
            os.chmod(str(d), 0o1777)
        self.lock_dir = self.shared / "locks"
        self.rec = self.shared / "rec"
        self.users = {}
        for user in (ALICE, BOB):
            src = tmp_path / user
            src.mkdir()
            (src / "hold.py").write_text(HOLD)
            extra = {"lock_dir": self.lock_dir} if lock_dir else {}
            hosts = sshd.hosts_yaml(src / "hosts.yaml", {"tower": (user, tower["port"], extra)})
            if not lock_dir:  # the tower policy's lease dir, not one of hosts.yaml
                hosts.write_text("\n".join(x for x in hosts.read_text().splitlines() if "lock_dir" not in x))
            self.users[user] = (src, hosts)

    def rt(self, user, *args, check=True):
        src, hosts = self.users[user]
        p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(hosts)] + [str(a) for a in args],
                           cwd=str(src), env=self.sshd.env(known_hosts=self.tower["known_hosts"]),
                           capture_output=True, text=True, timeout=180)
        if check and p.returncode != 0:
            raise AssertionError("rtrain %s as %s -> %d\n%s\n%s" % (args, user, p.returncode, p.stdout, p.stderr))
        return p

    def hold(self, user, *extra, seconds=None, tag=""):
        """Submit jobs that record their start and hold their GPUs until released (or for
        `seconds`); returns the id (or group id) -q prints. Their records name them
        USER[.TAG]-JOB."""
        tail = [] if seconds is None else [str(seconds)]
        who = user + ("." + tag if tag else "")
        return self.rt(user, "submit", "-q", *extra, "--", "python3", "hold.py", self.rec, who, *tail).stdout.strip()

    def starts(self):
        """[(user, job, gpu, t0)] in the order the jobs started."""
        out = []
        for f in self.rec.iterdir():
            if f.name.startswith("start-"):
                gpu, t0 = f.read_text().split()
                user, job = f.name[len("start-"):].rsplit("-", 1)
                out.append((user, job, gpu, float(t0)))
        return sorted(out, key=lambda x: x[3])

    def spans(self):
        """[(user, job, gpu, t0, t1)] of the jobs that ended."""
        out = []
        for user, job, gpu, t0 in self.starts():
            end = self.rec / ("end-%s-%s" % (user, job))
            if end.exists():
                out.append((user, job, gpu, t0, float(end.read_text())))
        return out

    def release(self, user, job):
        (self.rec / ("release-%s-%s" % (user, job))).touch()

    def wait_starts(self, n, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.starts()
            if len(s) >= n:
                return s
            time.sleep(0.05)
        raise AssertionError("%d jobs started, not %d: %s" % (len(self.starts()), n, self.starts()))

    def stop_all(self):
        for user in self.users:
            for j in json.loads(self.rt(user, "status", "--json", check=False).stdout or "[]"):
                if j["state"] in ("queued", "running"):
                    self.rt(user, "cancel", j["id"], check=False)


def _room_uids(lock_dir):
    from launcher.agent import fairshare
    return {e["uid"] for e in fairshare.room(str(lock_dir))}


def test_jobs_sharing_a_gpu_never_exceed_its_slots_nor_mix_with_whole_gpu_jobs(sshd, tower, tmp_path):
    w = World(sshd, tower, tmp_path, gpus=2)
    try:
        w.hold(ALICE, "--array", "6", "--gpus", "0.5", seconds=0.6)
        w.hold(BOB, "--array", "3", "--gpus", "1", seconds=0.4, tag="whole")
        w.hold(BOB, "--array", "4", "--gpus", "0.5", seconds=0.6)
        w.hold(ALICE, "--array", "2", "--gpus", "1", seconds=0.4, tag="whole")
        deadline = time.time() + 120
        while time.time() < deadline and len(w.spans()) < 15:
            time.sleep(0.2)
        spans = w.spans()
        assert len(spans) == 15, spans
    finally:
        w.stop_all()
    events = []
    for who, job, gpu, t0, t1 in spans:
        assert gpu in w.uuids, gpu  # one GPU each, by UUID
        events += [(t0, 1, gpu, "%s-%s" % (who, job)), (t1, -1, gpu, "%s-%s" % (who, job))]
    on = {g: set() for g in w.uuids}
    shared = 0
    for _t, step, gpu, key in sorted(events, key=lambda e: (e[0], e[1])):
        (on[gpu].add if step > 0 else on[gpu].discard)(key)
        whole = [k for k in on[gpu] if ".whole-" in k]
        assert not whole or len(on[gpu]) == 1, "a whole-GPU job and others on %s: %s" % (gpu, on[gpu])
        assert len(on[gpu]) <= 2, "%s on %s" % (on[gpu], gpu)
        shared += len(on[gpu]) == 2
    assert shared, "no two jobs ever shared a GPU"  # they got the same CUDA_VISIBLE_DEVICES


def test_a_freed_gpu_goes_to_the_user_holding_the_fewest_until_they_are_even(sshd, tower, tmp_path):
    from launcher.agent import leases
    w = World(sshd, tower, tmp_path, gpus=4)
    placeholder = leases.try_acquire(str(w.lock_dir), w.uuids[3])  # someone else holds GPU 3
    assert placeholder is not None
    try:
        w.hold(ALICE, "--array", "3", "--gpus", "1")   # ALICE holds 3 of the 4 GPUs
        first = w.wait_starts(3)
        assert {u for u, *_ in first} == {ALICE} and {g for *_, g, _ in first} == set(w.uuids[:3])
        w.hold(ALICE, "--array", "10", "--gpus", "1")  # then both wait, 10 jobs each
        w.hold(BOB, "--array", "10", "--gpus", "1")
        deadline = time.time() + 30
        uids = {pwd.getpwnam(u).pw_uid for u in (ALICE, BOB)}
        while time.time() < deadline and _room_uids(w.lock_dir) != uids:
            time.sleep(0.1)
        assert _room_uids(w.lock_dir) == uids  # both daemons posted their wait

        order = []

        def free_one(release):
            before = len(w.starts())
            release()
            s = w.wait_starts(before + 1)
            time.sleep(0.5)
            assert len(w.starts()) == before + 1, "one GPU freed, two jobs started: %s" % w.starts()
            order.append(s[-1][0])
            return s[-1]

        def release_placeholder():
            placeholder.release()
            leases.wake_waiters(str(w.lock_dir))

        free_one(release_placeholder)                               # A 3, B 0: to B
        free_one(lambda: w.release(ALICE, first[0][1]))             # A 2, B 1: to B
        free_one(lambda: w.release(ALICE, first[1][1]))             # A 1, B 2: to A
        got = free_one(lambda: w.release(ALICE, first[2][1]))       # A 1, B 2: to A
        bobs = [s for s in w.starts() if s[0] == BOB]
        free_one(lambda: w.release(BOB, bobs[0][1]))                # A 2, B 1: to B
        assert order == [BOB, BOB, ALICE, ALICE, BOB], order
        assert got[2] == first[2][2]  # the GPU ALICE freed last
    finally:
        placeholder.release()
        w.stop_all()


def _policy(tower, text, mode=0o644):
    p = tower["policy"]
    tmp = p.with_name("tower.yaml.tmp")
    tmp.write_text(text)
    os.chmod(str(tmp), mode)
    os.replace(str(tmp), str(p))


def _wait_state(w, user, job, states=("running",), timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = json.loads(w.rt(user, "status", "--json", job).stdout)
        if j["state"] in states:
            return j
        time.sleep(0.2)
    raise AssertionError("%s is %s" % (job, j))


def test_the_tower_policy_hides_orders_caps_reserves_and_sets_the_lease_dir(sshd, tower, tmp_path):
    w = World(sshd, tower, tmp_path, gpus=4, lock_dir=False)
    policy_locks = w.shared / "policy-locks"
    policy_locks.mkdir()
    os.chmod(str(policy_locks), 0o1777)
    _policy(tower, "hidden: [3]\norder: [2, 0]\nmax_gpus_per_user: 2\n"
                   "reserved:\n  - gpus: [1]\n    users: [%s]\nlock_dir: %s\n" % (BOB, policy_locks))
    try:
        rows = {r["index"]: r for r in json.loads(w.rt(ALICE, "gpus", "--json").stdout)}
        assert rows["3"]["state"] == "hidden" and rows["1"]["state"] == "reserved"
        assert rows["1"]["policy"] == "reserved for %s" % BOB and rows["0"]["state"] == "free"
        doc = " ".join(w.rt(ALICE, "hosts").stdout.split())
        assert "ok policy %s: 1 hidden" % tower["policy"] in doc and "GPU leases in %s" % policy_locks in doc
        p = w.rt(ALICE, "submit", "--gpus", "3", "--", "true", check=False)
        assert p.returncode == 1 and "at most 2" in p.stderr and "Traceback" not in p.stderr
        a1 = w.hold(ALICE, "--gpus", "1")
        a2 = w.hold(ALICE, "--gpus", "1")
        s = w.wait_starts(2)
        assert [x[2] for x in s] == [w.uuids[2], w.uuids[0]]  # the preferred order, never 1 or 3
        a3 = w.hold(ALICE, "--gpus", "1")
        j = _wait_state(w, ALICE, a3, ("queued",))
        deadline = time.time() + 20
        while "the cap is 2" not in j["message"] and time.time() < deadline:
            time.sleep(0.2)
            j = json.loads(w.rt(ALICE, "status", "--json", a3).stdout)
        assert "waiting: %s holds 2 GPUs, the cap is 2" % ALICE in j["message"], j
        b1 = w.hold(BOB, "--gpus", "1")  # GPU 1 is BOB's: he gets it while ALICE waits
        s = w.wait_starts(3)
        assert s[-1][0] == BOB and s[-1][2] == w.uuids[1]
        w.release(ALICE, a1)
        s = w.wait_starts(4)
        assert s[-1][:2] == (ALICE, a3) and s[-1][2] == w.uuids[2]
        assert os.listdir(str(policy_locks))  # the leases live in the policy's lease dir
        for user, job in ((ALICE, a2), (ALICE, a3), (BOB, b1)):
            w.release(user, job)
        # a policy a user could have written is ignored, with a warning
        _policy(tower, "hidden: [0, 1, 2, 3]\n", mode=0o666)
        doc = " ".join(w.rt(ALICE, "hosts").stdout.split())
        assert "warn policy the tower policy is ignored: %s can be written by users other than root" % (
            tower["policy"]) in doc, doc
        rows = json.loads(w.rt(ALICE, "gpus", "--json").stdout)
        assert not any(r["state"] == "hidden" for r in rows)
    finally:
        w.stop_all()
        try:
            os.unlink(str(tower["policy"]))
        except OSError:
            pass
