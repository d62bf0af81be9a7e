"""Artifacts built once per key by the daemon, before the jobs that need them (docs/design.md
"Built once per key"): a project's environment (envbuild.py), a data tree (datatree.py), and
whatever comes next (container images). One mechanism for all of them:

    builds/KIND/KEY/         the artifact, built IN PLACE (a venv is not relocatable)
    builds/KIND/KEY.ready    its marker (JSON: when, how long, its size): the artifact exists
                             for jobs only once this is renamed into place (atomic publish)
    builds/KIND/KEY.log      the build's output
    builds/KIND/KEY.lock     flock held by the one process building KEY
    builds/KIND/KEY.failed   why the last build failed (JSON: message, tail, at); the failed
                             artifact itself is removed, never kept

The daemon forks one child per key (`Builds.start`); the child takes the key's lock (another
build of the same key, say by a daemon before a restart, makes it give up: the daemon tries
again later), removes what a dead build left, runs the build function, and publishes. A build
that fails or dies publishes nothing. Standard library only, Python >= 3.8.
"""
import fcntl
import os
import re
import shutil
import time

from . import fsutil

KEY = re.compile(r"\A[0-9a-f]{16,64}\Z")
TAIL_LINES = 20
BUSY = 3  # a child's exit status: another process holds the key's lock


class BuildError(Exception):
    """A build that failed, in one line (its log has the rest)."""


class Builds:
    """The builds of one RTRAIN_HOME, as the daemon sees them."""

    def __init__(self, root, close_fds=(), poke=None):
        self.root = os.path.join(root, "builds")
        self.close_fds = close_fds
        self.poke = poke
        self.running = {}  # (kind, key) -> (pid, started at)

    # ------------------------------------------------------------------ paths

    def path(self, kind, key):
        if not re.match(r"\A[a-z]{1,16}\Z", kind) or not KEY.match(key or ""):
            raise ValueError("bad build name %r/%r" % (kind, key))
        return os.path.join(self.root, kind, key)

    def log_path(self, kind, key):
        return self.path(kind, key) + ".log"

    def ready(self, kind, key):
        """The marker of a published artifact, or None."""
        rec = fsutil.read_json(self.path(kind, key) + ".ready")
        return rec if isinstance(rec, dict) else None

    def failed(self, kind, key):
        rec = fsutil.read_json(self.path(kind, key) + ".failed")
        return rec if isinstance(rec, dict) else None

    def building(self, kind, key):
        """(pid, started at) of this daemon's build of key, or None."""
        return self.running.get((kind, key))

    def locked(self, kind, key):
        """True while some process (a builder left by an earlier daemon) holds key's lock."""
        return fsutil.flock_held(self.path(kind, key) + ".lock")

    def tail(self, kind, key, n=TAIL_LINES):
        return tail_of(self.log_path(kind, key), n)

    # ------------------------------------------------------------------ building

    def start(self, kind, key, build, env=None):
        """Fork a child that builds key with build(dest, log_fd) -> {extra marker fields};
        build raises BuildError (or any exception) to fail. Returns the child's pid."""
        d = os.path.dirname(self.path(kind, key))
        os.makedirs(d, mode=0o700, exist_ok=True)
        pid = os.fork()
        if pid:
            self.running[(kind, key)] = (pid, time.time())
            return pid
        code = 1
        try:
            for fd in self.close_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            code = run_build(self.path(kind, key), build)
            if self.poke is not None:
                self.poke()
        except BaseException:  # noqa: BLE001 - a child of the daemon never returns into it
            code = 1
        finally:
            os._exit(code)

    def ended(self, pid):
        """The daemon reaped pid: forget it. Returns (kind, key) if it was a build."""
        for k, (p, _) in list(self.running.items()):
            if p == pid:
                del self.running[k]
                return k
        return None

    def keys(self, kind):
        """Every key of kind that has anything on disk."""
        d = os.path.join(self.root, kind)
        try:
            names = os.listdir(d)
        except OSError:
            return set()
        return {n.split(".", 1)[0] for n in names if KEY.match(n.split(".", 1)[0])}

    def remove(self, kind, key):
        """Remove an artifact and its records; returns the bytes freed, or None when a build
        of it is running (its lock is held)."""
        base = self.path(kind, key)
        os.makedirs(os.path.dirname(base), mode=0o700, exist_ok=True)
        lock = os.open(base + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None
            freed = tree_size(base)
            for ext in (".ready", ".failed", ".log"):
                try:
                    os.unlink(base + ext)
                except FileNotFoundError:
                    pass
            remove_tree(base)
            os.unlink(base + ".lock")
            return freed
        finally:
            os.close(lock)


def run_build(base, build):
    """In the builder child: lock, clean, build, publish. Returns the exit status."""
    lock = os.open(base + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return BUSY
    if os.path.exists(base + ".ready"):
        return 0
    for ext in (".failed",):
        try:
            os.unlink(base + ext)
        except FileNotFoundError:
            pass
    remove_tree(base)  # a build that died half-way
    log = os.open(base + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    t0 = time.time()
    try:
        try:
            extra = build(base, log) or {}
        except BaseException as e:  # noqa: BLE001 - any failure is the build's failure
            message = str(e) if isinstance(e, BuildError) else "%s: %s" % (type(e).__name__, e)
            _write(log, "rtrain: build failed: %s\n" % message)
            remove_tree(base)
            fsutil.write_json_atomic(base + ".failed", {
                "message": message, "tail": tail_of(base + ".log"), "at": time.time()})
            return 1
        rec = dict(extra, built_at=time.time(), seconds=round(time.time() - t0, 3),
                   bytes=tree_size(base))
        fsutil.write_json_atomic(base + ".ready", rec)  # the publish: a rename
        return 0
    finally:
        os.close(log)
        os.close(lock)


def _write(fd, text):
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    except OSError:
        pass


def tail_of(path, n=TAIL_LINES):
    """The last n lines of a file, as text."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])


def tree_size(path):
    total = 0
    for d, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(d, name)).st_blocks * 512
            except OSError:
                pass
    return total


def remove_tree(path):
    """rmtree, read-only folders (a data tree's) included."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    for d, dirs, _names in os.walk(path):
        for name in dirs:
            full = os.path.join(d, name)
            if not os.path.islink(full):
                try:
                    os.chmod(full, 0o700)
                except OSError:
                    pass
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)
