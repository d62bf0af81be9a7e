"""Cross-user wake-ups through FIFOs in the shared lock directory: a job that frees GPUs pokes
every waiting daemon, and nothing another user plants there gets written to or followed."""
import os
import select
import stat

from launcher.agent import leases


def _readable(fd, timeout=5.0):
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_freed_gpu_wakes_every_waiting_daemon(tmp_path):
    lock_dir = str(tmp_path)
    a = leases.open_waiter(leases.waiter_path(lock_dir, "/home/a/.rtrain"))
    b = leases.open_waiter(leases.waiter_path(lock_dir, "/home/b/.rtrain"))
    assert a and b and a[0] != b[0]
    st = os.stat(leases.waiter_path(lock_dir, "/home/a/.rtrain"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o622
    assert not _readable(a[0], 0) and not _readable(b[0], 0)
    leases.wake_waiters(lock_dir)
    assert _readable(a[0]) and _readable(b[0])
    assert os.read(a[0], 10) == b"x"
    for fd in a + b:
        os.close(fd)


def test_planted_files_and_symlinks_are_never_written(tmp_path):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.chmod(victim, 0o666)
    (lock_dir / "rtrain-wake-0-aaaa.fifo").symlink_to(victim)
    plain = lock_dir / "rtrain-wake-0-bbbb.fifo"
    plain.write_text("plain\n")
    os.chmod(plain, 0o666)
    os.mkfifo(str(lock_dir / "rtrain-wake-0-cccc.fifo"))  # nobody reads it: skipped, no hang
    leases.wake_waiters(str(lock_dir))
    assert victim.read_text() == "precious\n" and plain.read_text() == "plain\n"
    # a daemon whose path is taken by something that is not its FIFO just polls
    assert leases.open_waiter(str(plain)) is None
    assert leases.open_waiter(str(lock_dir / "rtrain-wake-0-aaaa.fifo")) is None
    assert victim.read_text() == "precious\n"
