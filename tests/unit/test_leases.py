"""GPU leases (leases.py): the lock dir and its files are shared with other users, who may put
anything there. Nothing they plant may block, crash or fool a daemon."""
import fcntl
import os
import stat
import subprocess
import sys
import tempfile

import pytest

from support import REPO
from launcher.agent import leases, paths

NOBODY = 65534


def _locks(tmp_path):
    d = tmp_path / "locks"
    d.mkdir()
    os.chmod(d, 0o1777)
    return str(d)


def _try_acquire_elsewhere(lock_dir, uuid, user=None):
    """try_acquire in another process (so a hang can't hang the tests): its printed result."""
    code = ("import sys; from launcher.agent import leases\n"
            "fd = leases.try_acquire(sys.argv[1], sys.argv[2])\n"
            "print('none' if fd is None else 'fd')\n")
    kw = {}
    python = sys.executable
    if user is not None:
        python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                       if os.path.exists(p)), None)
        if python is None:
            pytest.skip("no python3 outside root's home for another user to run")

        def drop():
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
        kw["preexec_fn"] = drop
    try:
        p = subprocess.run([python, "-c", code, lock_dir, uuid], capture_output=True,
                           text=True, timeout=60, cwd="/", env=dict(os.environ, PYTHONPATH=str(REPO)),
                           **kw)
    except subprocess.TimeoutExpired:
        raise AssertionError("try_acquire blocked")
    assert "Traceback" not in p.stderr, p.stderr
    return p.stdout.strip()


def test_a_fifo_planted_as_a_lock_file_neither_blocks_nor_breaks_the_lease(tmp_path):
    lock_dir = _locks(tmp_path)
    os.mkfifo(leases.lock_path(lock_dir, "GPU-a"), 0o666)
    assert _try_acquire_elsewhere(lock_dir, "GPU-a") == "fd"  # no hang, and the lease works
    lease = leases.try_acquire(lock_dir, "GPU-a")
    assert lease is not None and "a FIFO" in lease.note and len(lease.fds) == 1
    try:
        assert _try_acquire_elsewhere(lock_dir, "GPU-a") == "none"  # the socket excludes
        assert leases.holders(lock_dir, ["GPU-a"])["GPU-a"]["note"].startswith("its lease file is a FIFO")
    finally:
        lease.release()
    assert not leases.is_held(lock_dir, "GPU-a")


def test_a_symlink_planted_as_a_lock_file_is_not_followed(tmp_path):
    lock_dir = _locks(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("")
    os.symlink(str(victim), leases.lock_path(lock_dir, "GPU-a"))
    os.symlink(str(tmp_path / "nowhere"), leases.lock_path(lock_dir, "GPU-b"))
    a = leases.try_acquire(lock_dir, "GPU-a")
    b = leases.try_acquire(lock_dir, "GPU-b")  # dangling: no raise either
    assert a and b and "a symlink" in a.note and "a symlink" in b.note
    assert not (tmp_path / "nowhere").exists()
    fd = os.open(str(victim), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody locked the link's target
    finally:
        os.close(fd)
        a.release()
        b.release()


def test_a_directory_planted_as_a_lock_file_is_named_not_trusted(tmp_path):
    lock_dir = _locks(tmp_path)
    os.mkdir(leases.lock_path(lock_dir, "GPU-a"))
    lease = leases.try_acquire(lock_dir, "GPU-a")
    assert lease is not None and "a directory" in lease.note
    assert leases.is_held(lock_dir, "GPU-a")
    lease.release()


def test_an_unreadable_lock_file_means_a_note_not_a_crash(tmp_path, monkeypatch):
    lock_dir = _locks(tmp_path)
    open(leases.lock_path(lock_dir, "GPU-a"), "w").close()
    real_open = os.open

    def refuse(path, flags, *a, **kw):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(leases.os, "open", refuse)
    for uuid in ("GPU-a", "GPU-new"):  # creating it fails the same way
        lease = leases.try_acquire(lock_dir, uuid)
        assert lease is not None and "Permission denied" in lease.note
        lease.release()


def test_another_users_unreadable_lock_file_as_that_user(tmp_path):
    """The real case: as user nobody, a root-only lock file in a shared dir."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    lock_dir = tempfile.mkdtemp(prefix="rtrain-test-locks-", dir="/tmp")
    try:
        os.chmod(lock_dir, 0o1777)
        path = leases.lock_path(lock_dir, "GPU-a")
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        assert _try_acquire_elsewhere(lock_dir, "GPU-a", user=NOBODY) == "fd"
        mine = leases.try_acquire(lock_dir, "GPU-b")  # a lease of root's: nobody can't have it
        assert _try_acquire_elsewhere(lock_dir, "GPU-b", user=NOBODY) == "none"
        h = leases.holders(lock_dir, ["GPU-b"])["GPU-b"]
        # the kernel's socket table gives the owner without connecting (agent/unixdiag.py), and no pid
        assert (h["how"], h["uid"], h["user"]) == ("socket", 0, "root") and h["pid"] in (None, os.getpid())
        mine.release()
    finally:
        for name in os.listdir(lock_dir):
            os.unlink(os.path.join(lock_dir, name))
        os.rmdir(lock_dir)


def test_a_lease_on_a_file_replaced_meanwhile_is_not_kept(tmp_path, monkeypatch):
    """Between open and flock the file was unlinked and made again: a lock on the old inode
    protects nothing from an older agent (it locks the new file), so the flock is taken on the
    new one."""
    lock_dir = _locks(tmp_path)
    path = leases.lock_path(lock_dir, "GPU-a")
    open(path, "w").close()
    real_flock = fcntl.flock
    calls = []

    def flock_after_swap(fd, op):
        if not calls:
            os.unlink(path)
            open(path, "w").close()
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(leases.fcntl, "flock", flock_after_swap)
    lease = leases.try_acquire(lock_dir, "GPU-a")
    monkeypatch.setattr(leases.fcntl, "flock", real_flock)
    assert lease is not None and len(lease.fds) == 2
    try:
        assert os.fstat(lease.fds[1]).st_ino == os.stat(path).st_ino
        assert leases.is_held(lock_dir, "GPU-a")
    finally:
        lease.release()
    assert not leases.is_held(lock_dir, "GPU-a")


def test_leases_still_exclude_each_other(tmp_path):
    lock_dir = _locks(tmp_path)
    lease = leases.try_acquire(lock_dir, "GPU-a")
    assert lease is not None
    assert _try_acquire_elsewhere(lock_dir, "GPU-a") == "none"
    lease.release()
    assert _try_acquire_elsewhere(lock_dir, "GPU-a") == "fd"


def test_unlinking_or_renaming_the_lease_file_frees_nothing(tmp_path):
    """What a co-tenant or a tmp cleaner can do to the file: the lease is its socket."""
    lock_dir = _locks(tmp_path)
    lease = leases.try_acquire(lock_dir, "GPU-a")
    path = leases.lock_path(lock_dir, "GPU-a")
    os.rename(path, path + ".old")
    assert _try_acquire_elsewhere(lock_dir, "GPU-a") == "none"
    for name in os.listdir(lock_dir):
        os.unlink(os.path.join(lock_dir, name))
    assert _try_acquire_elsewhere(lock_dir, "GPU-a") == "none"
    assert leases.holders(lock_dir, ["GPU-a"])["GPU-a"]["how"] == "socket"
    lease.release()
    assert _try_acquire_elsewhere(lock_dir, "GPU-a") == "fd"


def test_a_flock_held_on_the_lease_file_makes_the_gpu_busy_and_says_by_whom(tmp_path):
    """An older agent (or anyone) holding the file's flock: busy here too, holder named."""
    lock_dir = _locks(tmp_path)
    fd = os.open(leases.lock_path(lock_dir, "GPU-a"), os.O_CREAT | os.O_RDONLY, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert leases.try_acquire(lock_dir, "GPU-a") is None
        assert not leases.is_held(lock_dir, "GPU-b")  # the socket is not left bound either
        h = leases.holders(lock_dir, ["GPU-a"])["GPU-a"]
        assert (h["how"], h["pid"], h["uid"]) == ("file", os.getpid(), os.getuid())
    finally:
        os.close(fd)
    assert not leases.is_held(lock_dir, "GPU-a")
    assert leases.holders(lock_dir, ["GPU-a"]) == {}


def test_socket_names_are_per_lease_dir_by_its_real_path(tmp_path):
    lock_dir = _locks(tmp_path)
    os.symlink(lock_dir, str(tmp_path / "alias"))
    assert leases.socket_name(lock_dir, "GPU-a") == leases.socket_name(str(tmp_path / "alias"), "GPU-a")
    assert leases.socket_name(lock_dir, "GPU-a") != leases.socket_name(str(tmp_path), "GPU-a")
    long_name = leases.socket_name(lock_dir, "MIG-" + "x" * 200)
    assert long_name.startswith(b"\0rtrain-gpu/") and len(long_name) < 108


# ------------------------------------------------------------------ the lock dir itself

def test_a_missing_lock_dir_is_made_sticky_and_world_writable_whatever_the_umask(tmp_path):
    d = str(tmp_path / "a" / "locks")
    old = os.umask(0o077)
    try:
        assert leases.ensure_dir(d) == d
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o1777
    assert leases.ensure_dir(d) == d  # and it is fine as it is


@pytest.mark.parametrize("kind,words", [
    ("symlink", "is a symlink"),
    ("file", "is not a directory"),
    ("no-sticky", "world-writable but not sticky"),
    ("foreign", "belongs to"),
])
def test_an_unsafe_lock_dir_is_refused_with_one_line(tmp_path, kind, words):
    d = tmp_path / "locks"
    if kind == "symlink":
        real = tmp_path / "real"
        real.mkdir()
        os.chmod(real, 0o1777)
        d.symlink_to(real)
    elif kind == "file":
        d.write_text("")
    elif kind == "no-sticky":
        d.mkdir()
        os.chmod(d, 0o777)
    elif kind == "foreign":
        if os.getuid() != 0:
            pytest.skip("needs root to give a dir to another user")
        d.mkdir()
        os.chmod(d, 0o1777)
        os.chown(d, NOBODY, NOBODY)
    with pytest.raises(leases.LockDirError) as e:
        leases.ensure_dir(str(d))
    message = str(e.value)
    assert words in message and "\n" not in message and str(d) in message and e.value.hint
    assert leases.try_acquire(str(d), "GPU-a") is None  # refused, not raised
    assert leases.is_held(str(d), "GPU-a")


def test_a_private_lock_dir_of_ours_is_fine(tmp_path):
    d = tmp_path / "mine"
    d.mkdir(mode=0o700)
    assert leases.ensure_dir(str(d)) == str(d)
    lease = leases.try_acquire(str(d), "GPU-a")
    assert lease is not None
    lease.release()


def test_the_default_lock_dir_prefers_run_lock_when_it_is_sticky_and_world_writable(monkeypatch):
    real_lstat = os.lstat

    def fake(mode, uid=0, exists=True):
        def lstat(path):
            if path == "/run/lock":
                if not exists:
                    raise FileNotFoundError(2, "No such file", path)
                return os.stat_result((stat.S_IFDIR | mode, 1, 1, 2, uid, 0, 0, 0, 0, 0))
            return real_lstat(path)
        return lstat

    for args, want in [((0o1777,), "/run/lock"),
                       ((0o755,), "/tmp"),      # e.g. Fedora's /run/lock
                       ((0o777,), "/tmp"),      # not sticky
                       ((0o1777, 1000), "/tmp"),  # not root's
                       ((0o1777, 0, False), "/tmp")]:
        monkeypatch.setattr(paths.os, "lstat", fake(*args))
        assert paths._default_lock_dir() == want, args


def test_lock_files_are_readable_by_all_whatever_the_umask(tmp_path):
    lock_dir = _locks(tmp_path)
    old = os.umask(0o077)
    try:
        lease = leases.try_acquire(lock_dir, "GPU-a")
    finally:
        os.umask(old)
    lease.release()
    assert stat.S_IMODE(os.stat(leases.lock_path(lock_dir, "GPU-a")).st_mode) == 0o644


def test_no_lock_dir_means_nothing_leasable(tmp_path):
    assert leases.try_acquire(None, "GPU-a") is None and leases.is_held(None, "GPU-a")
    assert leases.holders(None, ["GPU-a"]) == {}
    assert leases.waiter_path(None, "/home/a/.rtrain") is None
    assert leases.open_waiter(None) is None
    leases.wake_waiters(None)


def test_is_held_looks_and_never_takes(tmp_path):
    """is_held must not show its caller as the holder to anyone counting holders at that moment
    (fair share counted a daemon's probe as a GPU it held), nor answer "held" because another
    daemon was probing the same GPU."""
    d = str(tmp_path / "locks")
    leases.ensure_dir(d)
    probe = leases._bind(leases.admin_name(d, "GPU-a"))  # another daemon checking GPU-a now
    assert probe is not None
    try:
        assert leases.is_held(d, "GPU-a") is False
    finally:
        os.close(probe)
    orig_try = leases.try_acquire
    leases.try_acquire = lambda *a, **k: pytest.fail("is_held took the lease to look")
    try:
        assert leases.is_held(d, "GPU-a") is False
    finally:
        leases.try_acquire = orig_try
    lease = leases.try_acquire(d, "GPU-a")
    try:
        assert leases.is_held(d, "GPU-a") is True and leases.is_held(d, "GPU-b") is False
    finally:
        lease.release()
    assert leases.is_held(d, "GPU-a") is False
