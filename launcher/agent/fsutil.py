"""Small file helpers: atomic JSON writes, process liveness without pid-reuse mistakes, FIFO
wake-ups."""
import errno
import fcntl
import json
import os
import stat


def write_json_atomic(path, obj, durable=True):
    """Write obj to path all at once (temp file + rename). With durable=False the caller
    fsyncs later (fsync_path), off its hot path."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(obj, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def proc_start_time(pid):
    """The kernel's start time of pid (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]


def session_id(pid):
    """The session id of pid (Linux /proc), or None if it can't be read (gone, or not ours to see)."""
    try:
        with open("/proc/%d/stat" % int(pid), "rb") as f:
            data = f.read().decode("ascii", "replace")
        return int(data[data.rfind(")") + 2:].split()[3])
    except (OSError, ValueError, IndexError, TypeError):
        return None


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def alive(pid, start_time=None):
    """True if pid runs and (when given) is the same process that started at start_time."""
    if not pid:
        return False
    if os.path.exists("/proc/self/stat"):
        st = proc_start_time(pid)
        if st is None:
            return False
        return start_time is None or str(start_time) == st
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def poke_fifo(path):
    """Write one byte to the FIFO at path, without blocking and without following a symlink: it
    wakes whoever reads it. False when nobody reads it (ENXIO), it is gone (ENOENT) or it is not
    a FIFO; True when woken. Other errors (ELOOP: a symlink, EACCES: not ours) are raised."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT):
            return False
        raise
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        try:
            os.write(fd, b"x")
        except OSError:
            pass  # a full FIFO already holds a wake-up
        return True
    finally:
        os.close(fd)


def flock_held(path, create=False):
    """True if some process holds an flock on the file at path (never following a symlink);
    False if none does, or the file is not there (create: made, 0600, and so not held)."""
    flags = (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def close_quietly(fd):
    """Close fd if it is one (not None), ignoring errors: for cleanup paths. Returns None, for
    `self.fd = close_quietly(self.fd)`."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    return None


def flock_within(fd, wait_s, op=None):
    """Take an flock (exclusive by default) on fd, trying for up to wait_s. True if taken."""
    import fcntl
    import time
    op = fcntl.LOCK_EX if op is None else op
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def write_private(path, data):
    """Write data (bytes or text) to path all at once (temp file + rename), mode 0600. The
    temp file is the thread's own: two threads of a process may write one path (the client
    writes one ssh config for several hosts at once)."""
    import threading
    tmp = "%s.tmp%d.%d" % (path, os.getpid(), threading.get_ident())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    os.replace(tmp, path)
