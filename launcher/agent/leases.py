"""GPU leases that no other user can break (docs/design.md "Leases").

A lease on a GPU is an abstract Unix socket bound to a name made of the lease dir and the GPU's
UUID, `\\0rtrain-gpu/<sha256(realpath(lock_dir))[:16]>/<uuid>`. Binding a name that is bound
fails (EADDRINUSE) in the whole network namespace, whoever holds it; an abstract name has no
file, so nobody can unlink, rename or replace it, and no tmp cleaner sees it; the kernel frees
it when the last descriptor of the socket closes. The job's processes inherit that descriptor
(runner.py passes it on), so the lease lasts exactly as long as any of them runs. The socket
listens, so anyone can ask who holds it (SO_PEERCRED gives the uid).

Older agents knew only the lease file, LOCK_PREFIX + UUID + ".lock" in the lease dir, locked
with flock. A lease still takes that flock after the socket, so an older agent on the same tower
sees the GPU taken, and a file someone else holds locked makes the GPU busy here too. What other
users put at that name (a FIFO, a symlink, a directory, an unreadable file) is never followed,
opened blocking or trusted: the lease then rests on the socket alone, and `rtrain gpus` says
what is there.

A GPU may also be shared by k jobs (`--gpus 0.5`: k = 2): each holds one of its k slot
sockets instead (shares.py), and the lease file's flock shared (an older agent's exclusive flock
then fails). Every acquisition, whole or shared, happens under the GPU's admin socket (one more
name, held for the microseconds of the check), so a whole-GPU lease and a slot are never both
held, whichever users' daemons race for the GPU (docs/design.md "Sharing a GPU").

Lease is the object the scheduler holds (acquire, release, fds); holders() says who holds what.
"""
import errno
import fcntl
import hashlib
import os
import re
import socket
import stat
import struct

from .lockdir import (WAKE_PREFIX, LockDirError, ensure_dir, open_waiter,  # noqa: F401 - API
                      user_name, wake_waiters, waiter_path)

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
LOCK_PREFIX = "rtrain-gpu-"      # lease files: LOCK_PREFIX + GPU UUID + ".lock"
SOCKET_PREFIX = "rtrain-gpu/"    # lease sockets: \0 + SOCKET_PREFIX + dir tag + "/" + UUID


class Lease(object):
    """A lease held on one GPU: `fds` (the socket, and the lease file's flock where it could be
    had) are what the job's processes inherit; `note` says what was odd about the lease file.
    `share` is k for one of the k slots of a shared GPU (`slot` its index), 1 for the whole."""

    __slots__ = ("uuid", "fds", "note", "share", "slot")

    def __init__(self, uuid, fds, note="", share=1, slot=None):
        self.uuid = uuid
        self.fds = list(fds)
        self.note = note
        self.share = share
        self.slot = slot

    def release(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def lock_path(lock_dir, uuid):
    return os.path.join(lock_dir, LOCK_PREFIX + _SAFE.sub("_", uuid) + ".lock")


def dir_tag(lock_dir):
    """What names a lease dir in socket names: every user with the same lock_dir (by its real
    path) meets on the same names; tests with private lease dirs never collide."""
    real = os.path.realpath(lock_dir)
    return hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def socket_name(lock_dir, uuid):
    """The abstract socket name (bytes, leading NUL) of the lease on uuid in lock_dir."""
    u = _SAFE.sub("_", uuid)
    if len(u) > 64:  # abstract names hold at most 107 bytes
        u = hashlib.sha256(uuid.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return ("\0%s%s/%s" % (SOCKET_PREFIX, dir_tag(lock_dir), u)).encode("ascii")


def _bind(name):
    """A listening socket bound to name (a raw fd, close-on-exec), or None if it is taken."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(name)
        s.listen(64)
    except OSError:
        s.close()
        return None  # EADDRINUSE: held; anything else: not leasable either
    return s.detach()


# Another user may have put anything at a lock file's name (the directory is shared): a FIFO
# (a plain open would block), a symlink, a device, a file we can't read. None of it may block
# or crash a daemon.
_OPEN = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0) | \
    getattr(os, "O_NOFOLLOW", 0)
_HELD = "held"


def _kind(mode):
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file"


def _open(path):
    """(an fd on the regular lock file at path, created if missing, or None; why not)."""
    for _ in range(3):
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                return None, "%s (%s's)" % (_kind(st.st_mode), user_name(st.st_uid))
            fd = os.open(path, _OPEN)
        except FileNotFoundError:
            # fs.protected_regular refuses O_CREAT on another user's file in a sticky dir:
            # open an existing file without O_CREAT, and create it exclusively otherwise.
            try:
                fd = os.open(path, _OPEN | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            except OSError as e:
                return None, "cannot be made (%s)" % e.strerror
            try:
                os.fchmod(fd, 0o644)  # readable by all, whatever our umask (no umask(): threads)
            except OSError:
                pass
        except OSError as e:
            return None, "cannot be opened (%s)" % e.strerror
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd, ""
        except OSError:
            pass
        os.close(fd)
        return None, "changed while it was opened"
    return None, "keeps changing"


def _flock(path, shared=False):
    """(fd holding the flock on the lease file, "") or (None, _HELD) if someone else holds it,
    or (None, what is wrong with the file) if it cannot be locked at all. shared: LOCK_SH (the
    slots of a shared GPU), which excludes the LOCK_EX of a whole-GPU lease."""
    for _ in range(5):
        fd, why = _open(path)
        if fd is None:
            return None, why
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None, _HELD
            return None, "cannot be locked (%s)" % e.strerror
        # A lock on a file that was unlinked or replaced meanwhile protects nothing from an
        # older agent, which would lock the file now at that name: lock that one instead.
        try:
            st, now = os.fstat(fd), os.lstat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd, ""
        except OSError:
            pass
        os.close(fd)
    return None, "keeps changing"


def admin_name(lock_dir, uuid):
    """The GPU's admin socket: held while a lease on it is checked and taken (never longer)."""
    return socket_name(lock_dir, uuid) + b"/admin"


def try_acquire(lock_dir, uuid, share=1):
    """A Lease on uuid (share k > 1: one of its k slots, shares.py), or None if it can't be had
    now: another process holds it (its socket, its lease file's flock, a slot of it for a whole
    lease, the whole of it or slots of another k for a slot), another rtrain is taking a lease
    on it this very moment, or the lock dir is not safe (lockdir.ensure_dir). Never raises,
    never blocks."""
    if not lock_dir:
        return None
    try:
        ensure_dir(lock_dir)
    except LockDirError:
        return None
    admin = _bind(admin_name(lock_dir, uuid))
    if admin is None:
        return None  # someone is checking or taking this GPU right now: the next pass sees
    try:
        from . import shares
        if share > 1:
            return shares.take(lock_dir, uuid, share)
        sfd = _bind(socket_name(lock_dir, uuid))
        if sfd is None:
            return None
        if shares.held(lock_dir, uuid):  # jobs share it (--gpus 0.5): not for a whole-GPU job
            os.close(sfd)
            return None
        ffd, why = _flock(lock_path(lock_dir, uuid))
        if why == _HELD:
            os.close(sfd)
            return None
        return Lease(uuid, [sfd] if ffd is None else [sfd, ffd], why and "its lease file is " + why)
    finally:
        os.close(admin)


def is_held(lock_dir, uuid):
    """True while someone holds uuid's lease (its socket, a slot of it shared, or its lease file
    locked): looked at, never taken. Taking it to see, even for a moment, showed this user as
    its holder to every other user's daemon counting holders at that moment (two daemons woken
    by the same freed GPU did), and fair share then gave the GPU to the wrong user
    (docs/design.md "Fair share between users")."""
    if not lock_dir:
        return True
    try:
        ensure_dir(lock_dir)
    except LockDirError:
        return True  # no lease can be had there (try_acquire)
    info = holders(lock_dir, [uuid]).get(uuid)
    return info is not None and info["how"] is not None


# ------------------------------------------------------------------ who holds what

_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)


def socket_holder(lock_dir, uuid):
    """(uid, pid) of whoever listens on uuid's lease socket (pid: the process that took the
    lease, which may have exited since), (None, None) when it is held but cannot be asked (its
    queue is full), or None when nobody holds it."""
    return name_holder(socket_name(lock_dir, uuid))


def name_holder(name):
    """socket_holder() for any abstract socket name (bytes, leading NUL)."""
    return name_owners([name]).get(name)


def name_owners(names):
    """{name: (uid, pid or None)} for the names among `names` that are held: from the kernel's
    socket table (unixdiag.py: nothing is connected to, no holder's queue fills up), else by
    connecting (name_holders)."""
    names = list(names)
    if not names:
        return {}
    from . import unixdiag
    got = unixdiag.owners(os.path.commonprefix(names))
    if got is None:
        return name_holders(names)
    return {n: (got[n], None) for n in names if n in got}


def name_holders(names):
    """{name: (uid, pid) or (None, None)} for the names among `names` someone listens on, by
    connecting (SO_PEERCRED). One socket serves every refused connect (a connect that fails
    leaves it unconnected): probing a free name costs a few microseconds."""
    out = {}
    s = None
    try:
        for name in names:
            if s is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
            try:
                s.connect(name)
                pid, uid, _gid = struct.unpack("3i", s.getsockopt(
                    socket.SOL_SOCKET, _SO_PEERCRED, struct.calcsize("3i")))
                out[name] = (uid, pid)
            except (BlockingIOError, InterruptedError):
                out[name] = (None, None)
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    continue  # ECONNREFUSED, ENOENT: nobody listens; the socket serves again
                out[name] = (None, None)
            s.close()  # connected (or in a state of its own): a fresh one for the next name
            s = None
    finally:
        if s is not None:
            s.close()
    return out


def _flock_holders():
    """{inode: pid} of WRITE flocks, from /proc/locks (Linux)."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2b:5678 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE":
            try:
                out[int(parts[5].split(":")[2])] = int(parts[4])
            except (ValueError, IndexError):
                continue
    return out


def holders(lock_dir, uuids):
    """{uuid: {"uid", "user", "pid", "how", "note"}} for the GPUs among uuids that are leased
    now, and for those whose lease file is odd ("note"). how: "socket" (an rtrain lease),
    "shared" (slots of a GPU shared by k jobs: "share" k, "slots" [(slot, uid, pid)]), "file"
    (the lease file is locked: an older rtrain agent, or anyone), or None (free, with a note).
    Never raises."""
    if not lock_dir:
        return {}
    locked = None
    out = {}
    for uuid in uuids:
        info = {"uid": None, "user": None, "pid": None, "how": None, "note": ""}
        got = socket_holder(lock_dir, uuid)
        if got is not None:
            info.update(how="socket", uid=got[0], pid=got[1])
        else:
            from . import shares
            shared = shares.holders(lock_dir, uuid)  # slots of a shared GPU: who holds each
            if shared:
                info.update(how="shared", uid=shared["slots"][0][1], pid=shared["slots"][0][2],
                            share=shared["k"], slots=shared["slots"])
        path = lock_path(lock_dir, uuid)
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            info["note"] = "its lease file is %s (%s's)" % (_kind(st.st_mode), user_name(st.st_uid))
        elif st is not None and not os.access(path, os.R_OK):
            info["note"] = "its lease file cannot be opened (Permission denied; %s's)" % (
                user_name(st.st_uid))
        elif st is not None and info["how"] is None:
            if locked is None:
                locked = _flock_holders()
            if st.st_ino in locked:
                info.update(how="file", pid=locked[st.st_ino], uid=pid_uid(locked[st.st_ino]))
        if info["uid"] is not None:
            info["user"] = user_name(info["uid"])
        if info["how"] or info["note"]:
            out[uuid] = info
    return out


def pid_uid(pid):
    try:
        return os.stat("/proc/%d" % pid).st_uid
    except OSError:
        return None

