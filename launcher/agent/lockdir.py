"""The shared GPU lease directory (/run/lock, /tmp, or the host's lock_dir): checking it is
safe to share, making it, and the wake-up FIFOs of daemons whose jobs wait for GPUs.

Root owns /run/lock and /tmp, so by default nobody has anything to set up. Lease files and
wake-up FIFOs carry an rtrain- prefix there. The leases themselves are leases.py's.
"""
import errno
import os
import stat

from . import fsutil

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
WAKE_PREFIX = "rtrain-wake-"     # wake-up FIFOs of waiting daemons (below)


class LockDirError(Exception):
    """The GPU lock directory can't be used safely. str(e) is one line: what is wrong, then
    what to do (e.hint)."""

    def __init__(self, message, hint=""):
        Exception.__init__(self, message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return "%s; %s" % (self.message, self.hint) if self.hint else self.message


def user_name(uid):
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "uid %d" % uid


def _problem(path):
    """None if the existing lock directory at path is safe to share, else a LockDirError.
    Safe: a real directory (not a symlink), owned by root or by us, and, if others can write
    to it, sticky (else they could unlink our held lease files and hand the GPU out again)."""
    fix = "create it as root: install -d -o root -m 1777 %s (or set lock_dir in hosts.yaml)" % path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return LockDirError("the GPU lock dir %s does not exist" % path, fix)
    except OSError as e:
        return LockDirError("cannot read the GPU lock dir %s: %s" % (path, e.strerror), fix)
    if stat.S_ISLNK(st.st_mode):
        return LockDirError("the GPU lock dir %s is a symlink" % path, fix)
    if not stat.S_ISDIR(st.st_mode):
        return LockDirError("the GPU lock dir %s is not a directory" % path, fix)
    if st.st_uid not in (0, os.getuid()):
        return LockDirError("the GPU lock dir %s belongs to %s, who could delete other users' GPU "
                            "leases" % (path, user_name(st.st_uid)), fix)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return LockDirError("the GPU lock dir %s is world-writable but not sticky: anyone could "
                            "delete the GPU leases in it" % path, "chmod 1777 %s" % path)
    if not os.access(path, os.W_OK | os.X_OK):
        return LockDirError("the GPU lock dir %s is not writable by you" % path,
                            "chmod 1777 %s" % path)
    return None


def ensure_dir(path):
    """The shared lock directory at path, made (mode 1777, whatever the umask) if missing.
    Raises LockDirError if it can't be made or is not safe to share (see _problem)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        _make_dir(path)
    except OSError:
        pass  # cannot even look (EACCES above it): _problem says so
    problem = _problem(path)
    if problem is not None:
        raise problem
    return path


def _make_dir(path):
    parent = os.path.dirname(path.rstrip("/")) or "/"
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        return  # made by someone else meanwhile: _problem judges it
    except OSError as e:
        raise LockDirError("cannot create the GPU lock dir %s: %s" % (path, e.strerror),
                           "create it as root: install -d -o root -m 1777 %s (or set lock_dir "
                           "in hosts.yaml)" % path)
    # Made 0700 first, then opened without following links and opened up: nobody can swap it.
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            os.fchmod(fd, 0o1777)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------ cross-user wake-ups
# A daemon whose jobs wait for GPUs listens on a FIFO of its own in the shared lock directory
# (rtrain-wake-UID-HOME.fifo, writable by all, owned by its user); a job of any user that frees GPUs writes
# a byte to each, so a GPU freed by someone else's job is taken within milliseconds too. The
# directory is shared with other users: nothing here follows a symlink, and only FIFOs are
# written to (one byte: the worst another user can do is wake a daemon for nothing).


def waiter_path(lock_dir, home_root):
    """The wake FIFO of the daemon of home_root in lock_dir (None without a lock dir)."""
    if not lock_dir:
        return None
    import hashlib
    tag = hashlib.sha256(home_root.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(lock_dir, "%s%d-%s.fifo" % (WAKE_PREFIX, os.getuid(), tag))


def open_waiter(path):
    """(read fd, write fd) of a daemon's wake FIFO (waiter_path), or None if it can't be had
    safely (then the daemon just polls)."""
    if not path:
        return None
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
    if not lock_dir:
        return
    try:
        names = os.listdir(lock_dir)
    except OSError:
        return
    skip = os.path.basename(skip) if skip else None
    for name in names:
        if not (name.startswith(WAKE_PREFIX) and name.endswith(".fifo")) or name == skip:
            continue
        try:
            fsutil.poke_fifo(os.path.join(lock_dir, name))
        except OSError:
            continue  # ELOOP: a symlink; EACCES: not for us
