"""The store's gc lock: a submit holds it shared from the moment it asks which blobs the store
has until its job is committed (the agent process ends then, and the kernel lets go), and
`prune` takes it exclusively before it deletes blobs: a blob a submit counted on is never
deleted under it. Standard library only, Python >= 3.8."""
import fcntl
import os

from . import fsutil

_held = []  # this process's shared hold, kept until it exits


def _open(home):
    return os.open(os.path.join(home.root, "store.gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def hold_shared(home):
    """Hold the lock shared until this process exits."""
    if _held:
        return
    fd = _open(home)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held.append(fd)


def exclusive(home, wait_s=30.0):
    """An fd holding the lock exclusively (close it to let go), or None after wait_s."""
    fd = _open(home)
    if fsutil.flock_within(fd, wait_s):
        return fd
    os.close(fd)
    return None
