"""A GPU shared by k jobs (agent/shares.py, leases.py) and fair share between users
(agent/fairshare.py, placement.py): slots never mix with a whole-GPU lease, whoever races for
them; the waiting room is checked by the kernel; a user behind gets the free GPU first."""
import fcntl
import os
import subprocess
import sys
import textwrap
import time

import pytest

from support import REPO
from launcher.agent import fairshare, leases, placement, shares

NOBODY = 65534


def _locks(tmp_path):
    d = tmp_path / "locks"
    d.mkdir()
    os.chmod(str(tmp_path), 0o755)
    os.chmod(str(d), 0o1777)
    return str(d)


def test_k_slots_exclude_the_whole_gpu_and_other_ratios(tmp_path):
    d = _locks(tmp_path)
    a, b = leases.try_acquire(d, "GPU-x", 2), leases.try_acquire(d, "GPU-x", 2)
    try:
        assert (a.share, a.slot, b.slot) == (2, 0, 1)
        assert leases.try_acquire(d, "GPU-x", 2) is None       # two slots of 2: full
        assert leases.try_acquire(d, "GPU-x") is None          # no whole GPU under shares
        assert leases.try_acquire(d, "GPU-x", 4) is None       # nor another ratio
        assert leases.is_held(d, "GPU-x") and shares.free_slots(d, "GPU-x", 2) == 0
        h = leases.holders(d, ["GPU-x"])["GPU-x"]
        assert h["how"] == "shared" and h["share"] == 2 and [s[0] for s in h["slots"]] == [0, 1]
        a.release()
        assert shares.free_slots(d, "GPU-x", 2) == 1 and leases.try_acquire(d, "GPU-x") is None
        c = leases.try_acquire(d, "GPU-x", 2)
        assert c is not None and c.slot == 0
        c.release()
    finally:
        a.release()
        b.release()
    whole = leases.try_acquire(d, "GPU-x")
    try:
        assert whole.share == 1 and leases.try_acquire(d, "GPU-x", 2) is None
    finally:
        whole.release()
    assert not leases.is_held(d, "GPU-x") and not shares.held(d, "GPU-x")


def test_slots_hold_the_lease_file_shared_so_an_older_agent_is_kept_off(tmp_path):
    d = _locks(tmp_path)
    a = leases.try_acquire(d, "GPU-y", 2)
    try:
        fd = os.open(leases.lock_path(d, "GPU-y"), os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # what an older agent does: LOCK_EX
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        a.release()
    fd = os.open(leases.lock_path(d, "GPU-y"), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an older agent holds the whole GPU
    try:
        assert leases.try_acquire(d, "GPU-y", 2) is None
    finally:
        os.close(fd)


RACER = textwrap.dedent('''
    import os, random, sys, time
    from launcher.agent import leases
    lock_dir, out, until = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
    random.seed(os.getpid())
    while time.time() < until:
        k = random.choice((1, 2, 2))
        lease = leases.try_acquire(lock_dir, "GPU-r", k)
        if lease is None:
            time.sleep(0.0005)
            continue
        t0 = time.time()
        time.sleep(random.random() * 0.004)
        t1 = time.time()
        lease.release()
        fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.write(fd, ("%d %r %r\\n" % (k, t0, t1)).encode())
        os.close(fd)
''')


def test_racing_daemons_of_two_users_never_mix_a_whole_gpu_with_slots(tmp_path):
    d = _locks(tmp_path)
    out = tmp_path / "spans"
    out.touch()
    os.chmod(str(out), 0o666)
    procs = []
    for i in range(6):
        kw = {}
        if i % 2 and os.geteuid() == 0:
            def drop():
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            kw["preexec_fn"] = drop
        python = sys.executable if not kw else next(
            (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), sys.executable)
        procs.append(subprocess.Popen([python, "-c", RACER, d, str(out), "2.0"], cwd="/",
                                      env=dict(os.environ, PYTHONPATH=str(REPO)), **kw))
    for p in procs:
        assert p.wait(60) == 0
    spans = [(int(k), float(a), float(b)) for k, a, b in (x.split() for x in out.read_text().splitlines())]
    assert sum(1 for s in spans if s[0] == 1) > 5 and sum(1 for s in spans if s[0] == 2) > 5, spans[:5]
    events = sorted([(a, 1, k) for k, a, _ in spans] + [(b, -1, k) for k, _, b in spans])
    whole = half = 0
    for _t, step, k in events:  # an end before a start at the same instant
        if k == 1:
            whole += step
        else:
            half += step
        assert whole <= 1 and half <= 2 and not (whole and half), (whole, half)


def test_fair_share_hands_free_gpus_to_whoever_holds_fewest_until_even():
    users = {"A": {"held": 3, "since": 10.0, "want": 10}, "B": {"held": 0, "since": 20.0, "want": 10}}
    assert fairshare.split(1, users) == {"A": 0, "B": 1}
    assert fairshare.split(4, users) == {"A": 1, "B": 3}  # B to 3, then the tie: A waited longer
    assert fairshare.split(5, {"A": dict(users["A"]), "B": dict(users["B"], want=2)}) == {"A": 3, "B": 2}
    assert fairshare.ahead(1, "A", users, 1) == "B" and fairshare.ahead(1, "B", users, 1) is None
    even = {"A": {"held": 2, "since": 10.0, "want": 5}, "B": {"held": 2, "since": 20.0, "want": 5}}
    assert fairshare.ahead(1, "B", even, 1) == "A"  # a tie: the longest waiting job first


POST = textwrap.dedent('''
    import sys, time
    from launcher.agent import fairshare
    e = fairshare.Entry("/home/nobody-rtrain", [])
    e.post(sys.argv[1], float(sys.argv[2]), 3)
    print("posted", flush=True)
    sys.stdin.read()
''')


def _as_nobody(code, *args):
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root, to run a second user")

    def drop():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    p = subprocess.Popen([python, "-c", code] + [str(a) for a in args], cwd="/", preexec_fn=drop,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.readline() == b"posted\n"
    return p


def test_the_waiting_room_is_what_live_daemons_post_and_the_kernel_vouches_for(tmp_path):
    d = _locks(tmp_path)
    other = _as_nobody(POST, d, 100.0)
    try:
        mine = fairshare.Entry("/root/.rtrain-x", [])
        mine.post(d, 200.0, 1.5)
        import socket
        liar = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # root claiming to be uid 4242
        liar.bind(("\0rtrain-wait/%s/4242/abc/1/1000/00" % leases.dir_tag(d)).encode())
        liar.listen(1)
        room = {e["uid"]: e for e in fairshare.room(d)}
        assert set(room) == {NOBODY, os.getuid()}
        assert room[NOBODY]["since"] == 100.0 and room[NOBODY]["want"] == 3
        assert room[os.getuid()]["want"] == 1.5
        assert [e["uid"] for e in fairshare.room(d, skip_home=mine.home_tag)] == [NOBODY]
        mine.withdraw()
        liar.close()
    finally:
        other.stdin.close()
        other.wait(10)
    assert fairshare.room(d) == []  # an entry lives exactly as long as its daemon


def test_a_daemon_leaves_a_free_gpu_to_a_user_holding_fewer_but_not_for_ever(tmp_path, monkeypatch):
    d = _locks(tmp_path)
    units = [{"index": str(i), "uuid": "GPU-f%d" % i, "state": "free", "parent_uuid": None} for i in range(2)]
    mine = leases.try_acquire(d, "GPU-f0")  # we hold one GPU; nobody (the other user) holds none
    other = _as_nobody(POST, d, time.time() + 100)
    monkeypatch.setattr(fairshare, "DEFER_S", 0.3)
    try:
        p = placement.Placer(str(tmp_path / "home"), [])
        row = {"id": 1, "gpus_requested": 1, "share": 1, "submitted_at": time.time()}
        p.begin_pass()
        got, why = p.take(row, units, d, set())
        assert got is None and "fair share" in why and "holds 0 GPUs" in why, why
        time.sleep(0.35)
        p.begin_pass()
        got, why = p.take(row, units, d, set())  # they did not take it in time: ours
        assert got and got[0].uuid == "GPU-f1"
        got[0].release()
    finally:
        mine.release()
        other.stdin.close()
        other.wait(10)
    p.begin_pass()
    got, why = p.take(row, units, d, set())  # nobody else waits: at once
    assert got and got[0].uuid == "GPU-f0"
    got[0].release()


def test_asking_who_holds_a_lease_again_and_again_never_stops_working(tmp_path, monkeypatch):
    """A daemon asks who holds each GPU on every pass: asking must not fill the lease socket's
    queue (the kernel's socket table is read, nothing connects), nor go wrong without it."""
    from launcher.agent import unixdiag
    d = _locks(tmp_path)
    whole, half = leases.try_acquire(d, "GPU-q"), leases.try_acquire(d, "GPU-h", 2)
    try:
        for _ in range(300):
            assert fairshare.held(d, ["GPU-q", "GPU-h"]) == {os.getuid(): 1.5}
        monkeypatch.setattr(unixdiag, "owners", lambda prefix: None)  # an older kernel: SO_PEERCRED
        h = leases.holders(d, ["GPU-q", "GPU-h"])
        assert h["GPU-q"]["uid"] == os.getuid() and h["GPU-h"]["slots"][0][1] == os.getuid()
        e = fairshare.Entry("/root/.rtrain-y", [])
        e.post(d, 1.0, 2)
        assert [x["uid"] for x in fairshare.room(d)] == [os.getuid()]
        e.withdraw()
    finally:
        whole.release()
        half.release()
