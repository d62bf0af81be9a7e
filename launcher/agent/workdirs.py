"""A job's work dir: private copies of its snapshot's files, built in the background.

`submit` stores the snapshot (the manifest and the verified blobs it names, complete and
immutable) and queues the job at once; copying thousands of files into the job's own folder
would double what the user waits for. The daemon builds that folder instead, before the job
starts: small ones on the spot, larger ones in a child process (a fork: no start-up cost), at
most MAX_BUILDERS at a time, in queue order. A build goes to work.tmpPID and is renamed to
`work` once complete, so a job never starts on half a tree; a build that fails leaves
build-error.json, and the daemon fails the job with what it says.
"""
import errno
import os
import shutil
import time

from . import fsutil, jobproject, store
from .manifest import ManifestError
from .materialize import materialize
from .packs import BadBlobs

INLINE_MAX_FILES = 64          # smaller trees are built by the daemon itself: a fork costs
INLINE_MAX_BYTES = 8 << 20     # more than their copies, and they hold up no hand-off
MAX_BUILDERS = 2


def inline(files, size):
    return (files or 0) <= INLINE_MAX_FILES and (size or 0) <= INLINE_MAX_BYTES


def ready(home, job_id):
    return os.path.isdir(home.job(job_id).work)


def error(home, job_id):
    """What a failed build said, or None."""
    rec = fsutil.read_json(home.job(job_id).build_error)
    return rec.get("message") if isinstance(rec, dict) else None


def build(home, job_id, st):
    """Build the work dir of job_id here and now. Returns None, or what went wrong (which is
    also left in build-error.json)."""
    job_dir = home.job(job_id).dir
    work = home.job(job_id).work
    if os.path.isdir(work):
        return None
    _sweep(job_dir)
    manifest = fsutil.read_json(home.job(job_id).manifest)
    tmp = "%s.tmp%d" % (work, os.getpid())
    try:
        if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), list):
            raise store.StoreError("its manifest (%s) is missing or unreadable" % home.job(job_id).manifest)
        materialize(st, manifest["entries"], tmp)
        jobproject.worklinks(home, job_id, tmp)  # its data, outputs and mounts: symlinks
        try:
            os.rename(tmp, work)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isdir(work):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another builder was first: same tree
        return None
    except (store.StoreError, ManifestError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        message = _describe(e, home)
        if isinstance(e, BadBlobs):
            # drop them from the store, so the next submit of this tree sends them again
            try:
                st.forget(e.bad)
                message += "; removed from the store on the host: submit again to send it"
            except (store.StoreError, OSError):
                pass
        try:
            fsutil.write_json_atomic(home.job(job_id).build_error, {"message": message})
        except OSError:
            pass  # the disk is full: the daemon sees the builder gone with nothing to show
        return message


def spawn(home, job_id, close_fds, poke):
    """build() in a child process; returns its pid. The child pokes the daemon when done."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        for fd in close_fds:  # the daemon's lock above all: it must not outlive the daemon here
            try:
                os.close(fd)
            except OSError:
                pass
        build(home, job_id, store.Store(home.store))
        poke()
    except BaseException:  # noqa: BLE001 - a child of the daemon never returns into it
        code = 1
    finally:
        os._exit(code)


def retire(home, job_id):
    """Set a finished attempt's work dir aside (a rename: this runs in the daemon's
    transaction); the next build removes it and makes a fresh one."""
    work = home.job(job_id).work
    try:
        os.rename(work, "%s.old%d" % (work, int(time.time() * 1000)))
    except OSError:
        pass


def _describe(e, home):
    cause = e if isinstance(e, OSError) else e.__context__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device holding %s" % home.root
    if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "cannot write under %s: %s" % (home.root, cause.strerror)
    return str(e)


def _sweep(job_dir):
    """Remove half-built trees of builders that are gone, and retired attempts' trees."""
    try:
        names = os.listdir(job_dir)
    except OSError:
        return
    for name in names:
        if name.startswith("work.old"):
            shutil.rmtree(os.path.join(job_dir, name), ignore_errors=True)
        elif name.startswith("work.tmp"):
            try:
                pid = int(name[len("work.tmp"):])
            except ValueError:
                continue
            if pid != os.getpid() and not fsutil.alive(pid):
                shutil.rmtree(os.path.join(job_dir, name), ignore_errors=True)
