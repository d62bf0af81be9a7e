"""GPU leases as kernel locks: one flock per GPU UUID in a shared sticky directory.

A job's processes inherit the locked file descriptions, so the lease lasts exactly as
long as the job: when its last process dies, for any reason, the kernel frees it.
Two users' agents on one machine share the directory and so never hand out one GPU twice.
"""
import errno
import fcntl
import os
import re

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def ensure_dir(path):
    """Create the shared lock directory world-writable and sticky (like /tmp)."""
    if not os.path.isdir(path):
        try:
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o1777)
        except PermissionError:
            pass
    return path


def lock_path(lock_dir, uuid):
    return os.path.join(lock_dir, _SAFE.sub("_", uuid) + ".lock")


def _open(path):
    # fs.protected_regular refuses O_CREAT on another user's file in a sticky dir:
    # open an existing file without O_CREAT, and create it exclusively otherwise.
    for _ in range(3):
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        try:
            old = os.umask(0)
            try:
                return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            finally:
                os.umask(old)
        except FileExistsError:
            continue
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def try_acquire(lock_dir, uuid):
    """An fd holding the lease on uuid, or None if another process holds it."""
    fd = _open(lock_path(ensure_dir(lock_dir), uuid))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def is_held(lock_dir, uuid):
    fd = try_acquire(lock_dir, uuid)
    if fd is None:
        return True
    os.close(fd)
    return False


def holders(lock_dir):
    """{uuid-ish lock name: pid} for leases held right now, read from /proc/locks (Linux)."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    by_inode = {}
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2b:5678 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE":
            try:
                by_inode[int(parts[5].split(":")[2])] = int(parts[4])
            except (ValueError, IndexError):
                continue
    out = {}
    try:
        names = os.listdir(lock_dir)
    except OSError:
        return out
    for name in names:
        if not name.endswith(".lock"):
            continue
        try:
            ino = os.stat(os.path.join(lock_dir, name)).st_ino
        except OSError:
            continue
        if ino in by_inode:
            out[name[:-5]] = by_inode[ino]
    return out


def pid_user(pid):
    try:
        import pwd
        uid = os.stat("/proc/%d" % pid).st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError, ImportError):
        return None
