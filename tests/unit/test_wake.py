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


def test_a_flood_of_wake_ups_through_the_lock_dir_is_no_busy_loop(tmp_path):
    """Anyone can write to a waiting daemon's wake FIFO: a flood costs it at most one pass per
    daemon.OTHERS_WAKE_GAP_S (the first wake-up is served at once)."""
    import signal
    import time
    from launcher.agent import daemon, paths
    home = paths.Home(str(tmp_path / "home")).ensure()
    lock_dir = str(tmp_path / "locks")
    os.mkdir(lock_dir, 0o700)
    passes = tmp_path / "passes"
    pid = os.fork()
    if pid == 0:  # the daemon, its jobs always waiting for GPUs, counting its passes
        try:
            d = daemon.Daemon(home, ["agent"])
            d.lock_dir = lock_dir
            d.schedule = lambda: passes.open("a").write("x") and True
            daemon.db.active = lambda con: [None]
            d.serve()
        finally:
            os._exit(0)
    try:
        fifo = leases.waiter_path(lock_dir, home.root)
        deadline = time.time() + 10
        while not os.path.exists(fifo) and time.time() < deadline:
            time.sleep(0.01)
        start = passes.stat().st_size
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.write(fd, b"x")
                os.close(fd)
            except OSError:
                pass
        flood = passes.stat().st_size - start
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    assert 5 <= flood <= 40, flood  # 1 s / OTHERS_WAKE_GAP_S = 20, and some slack
