"""GPU leases as kernel locks: one flock per GPU UUID in a shared sticky directory.

A job's processes inherit the locked file descriptions, so the lease lasts exactly as
long as the job: when its last process dies, for any reason, the kernel frees it.
Two users' agents on one machine share the directory and so never hand out one GPU twice.
"""
import errno
import fcntl
import os
import re
import stat

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


# ------------------------------------------------------------------ cross-user wake-ups
# A daemon whose jobs wait for GPUs listens on a FIFO of its own in the shared lock directory
# (wake-UID-HOME.fifo, writable by all, owned by its user); a job of any user that frees GPUs writes
# a byte to each, so a GPU freed by someone else's job is taken within milliseconds too. The
# directory is shared with other users: nothing here follows a symlink, and only FIFOs are
# written to (one byte: the worst another user can do is wake a daemon for nothing).

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def waiter_path(lock_dir, home_root):
    import hashlib
    tag = hashlib.sha256(home_root.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(lock_dir, "wake-%d-%s.fifo" % (os.getuid(), tag))


def open_waiter(path):
    """(read fd, write fd) of a daemon's wake FIFO (waiter_path), or None if it can't be had
    safely (then the daemon just polls)."""
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        pass
    except OSError:
        return None
    fds = []
    try:
        for flags in (os.O_RDONLY, os.O_WRONLY):
            fds.append(os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | _NOFOLLOW))
        st = os.fstat(fds[0])
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(errno.EPERM, "not our FIFO")
        os.fchmod(fds[0], 0o622)
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    return fds[0], fds[1]


def wake_waiters(lock_dir, skip=None):
    """Poke every daemon that waits for GPUs in lock_dir (any user's), but the one whose
    waiter_path is `skip` (the caller's own daemon, told another way)."""
    try:
        names = os.listdir(lock_dir)
    except OSError:
        return
    skip = os.path.basename(skip) if skip else None
    for name in names:
        if not (name.startswith("wake-") and name.endswith(".fifo")) or name == skip:
            continue
        try:
            fd = os.open(os.path.join(lock_dir, name),
                         os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | _NOFOLLOW)
        except OSError:
            continue  # ENXIO: nobody listens; ELOOP: a symlink; EACCES: not for us
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, b"x")
        except OSError:
            pass  # a full FIFO already holds a wake-up
        finally:
            os.close(fd)


def pid_user(pid):
    try:
        import pwd
        uid = os.stat("/proc/%d" % pid).st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError, ImportError):
        return None
