"""Content-addressed store of synced files, and job work dirs built from it.

Standard library only, Python >= 3.8 (this runs on the GPU host).

Blobs live at ROOT/ab/cdef... (sha256 hex), read-only (0444) in 0700 directories. A blob becomes
visible only once complete and verified (temp file in ROOT, fsync, rename). A job's work dir is
made of COPIES of blobs, never hard links: a job that rewrites a file in place must not be able to
change the store or another job's files (DESIGN.md decision 1).
"""
import errno
import hashlib
import os
import re
import stat
import tempfile
import time

_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
_HEADER = re.compile(rb"\A([0-9a-f]{64}) ([0-9]{1,19})\n\Z")
_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"


class StoreError(Exception):
    """A bad blob stream, a bad manifest entry, or a blob the store lacks."""


def _check_hash(h):
    if not isinstance(h, str) or not _HEX.match(h):
        raise StoreError("not a sha256 hex digest: %r" % (h,))
    return h


def check_path(path):
    """Validate a manifest path; return its components. Raises StoreError."""
    if not isinstance(path, str) or not path:
        raise StoreError("bad path in manifest: %r (empty or not a string)" % (path,))
    if "\0" in path:
        raise StoreError("bad path in manifest: %r (contains NUL)" % (path,))
    if path.startswith("/"):
        raise StoreError("bad path in manifest: %r (absolute)" % (path,))
    parts = path.split("/")
    for p in parts:
        if p == "":
            raise StoreError("bad path in manifest: %r (empty component)" % (path,))
        if p in (".", ".."):
            raise StoreError("bad path in manifest: %r (contains a %r component)" % (path, p))
    return parts


def _check_target(path, target):
    if not isinstance(target, str) or not target:
        raise StoreError("bad symlink %r in manifest: empty target" % (path,))
    if "\0" in target:
        raise StoreError("bad symlink %r in manifest: target contains NUL" % (path,))
    if target.startswith("/"):
        raise StoreError("bad symlink %r -> %r: absolute target" % (path, target))
    depth = len(path.split("/")) - 1  # directories above the link, inside the tree
    for p in target.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            depth -= 1
            if depth < 0:
                raise StoreError("bad symlink %r -> %r: points outside the tree" % (path, target))
        else:
            depth += 1


def _copy_fd(src, dst):
    """Copy all of src to dst (both fds at offset 0): copy_file_range (may reflink: still a
    private copy) where the kernel has it, else read/write."""
    cfr = getattr(os, "copy_file_range", None)
    if cfr is not None:
        try:
            while True:
                n = cfr(src, dst, _CHUNK * 64)
                if n == 0:
                    return
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP,
                               errno.EPERM, errno.EBADF):
                raise
            # fall back from wherever we are: both offsets have advanced together
    while True:
        buf = os.read(src, _CHUNK)
        if not buf:
            return
        view = memoryview(buf)
        while view:
            n = os.write(dst, view)
            view = view[n:]


class Store(object):
    def __init__(self, root):
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)

    # ------------------------------------------------------------------ lookup

    def path(self, h):
        _check_hash(h)
        return os.path.join(self.root, h[:2], h[2:])

    def has(self, h):
        return os.path.isfile(self.path(h))

    def missing(self, hashes):
        """The hashes (in the order given, once each) that the store lacks."""
        out, seen = [], set()
        for h in hashes:
            if h in seen:
                continue
            seen.add(h)
            if not self.has(h):
                out.append(h)
        return out

    # ------------------------------------------------------------------ receive

    def receive(self, fileobj):
        """Read blob frames (see docs/contracts.md) from a binary file object until END.
        Returns {"count": blobs stored, "bytes": their bytes}. A truncated stream or a bad
        hash raises StoreError; blobs completed before it are kept, no partial one is."""
        count = nbytes = 0
        while True:
            line = fileobj.readline(200)
            if line == b"END\n":
                return {"count": count, "bytes": nbytes}
            if not line:
                raise StoreError("blob stream ended early (no END line) after %d blob(s): "
                                 "the connection may have dropped" % count)
            m = _HEADER.match(line)
            if not m:
                raise StoreError("bad blob frame header after %d blob(s): %r" % (count, line[:80]))
            h, size = m.group(1).decode("ascii"), int(m.group(2))
            self._receive_one(fileobj, h, size)
            count += 1
            nbytes += size

    def _receive_one(self, fileobj, h, size):
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
        try:
            digest = hashlib.sha256()
            left = size
            with os.fdopen(fd, "wb") as out:
                while left:
                    buf = fileobj.read(min(left, _CHUNK))
                    if not buf:
                        raise StoreError("blob stream ended early: %s needs %d bytes, got %d" % (
                            h, size, size - left))
                    digest.update(buf)
                    out.write(buf)
                    left -= len(buf)
                if digest.hexdigest() != h:
                    raise StoreError("blob %s: received bytes hash to %s (corrupted in transit, "
                                     "or the file changed while it was sent)" % (h, digest.hexdigest()))
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o444)
            final = self.path(h)
            d = os.path.dirname(final)
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o700, exist_ok=True)
            if os.path.isfile(final):
                os.unlink(tmp)  # already there (another upload won): same bytes by definition
            else:
                os.rename(tmp, final)
                _fsync_dir(d)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # ------------------------------------------------------------------ materialize

    def materialize(self, entries, dest):
        """Build a job's work dir at dest from manifest entries: private, writable copies of
        blobs (0755 if exec else 0644) and symlinks. Every path is validated; nothing is ever
        written through a symlink. Raises StoreError."""
        dest = os.path.abspath(dest)
        os.makedirs(dest, exist_ok=True)
        for e in entries:
            if not isinstance(e, dict):
                raise StoreError("bad manifest entry: %r" % (e,))
            path = e.get("path")
            parts = check_path(path)
            kind = e.get("type", "file")
            if kind == "file":
                src = self.path(e.get("hash"))
            elif kind == "symlink":
                target = e.get("target")
                _check_target(path, target)
            else:
                raise StoreError("bad manifest entry %r: unknown type %r" % (path, kind))
            parent = self._make_parents(dest, parts, path)
            full = os.path.join(parent, parts[-1])
            try:
                if kind == "symlink":
                    os.symlink(target, full)
                else:
                    self._copy_blob(src, full, bool(e.get("exec")), e.get("hash"), path)
            except FileExistsError:
                raise StoreError("bad manifest: %r appears twice (or is also a directory)" % (path,))
            except OSError as ex:
                raise StoreError("cannot create %r in the work dir: %s" % (path, ex))

    def _make_parents(self, dest, parts, path):
        cur = dest
        for p in parts[:-1]:
            cur = os.path.join(cur, p)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                try:
                    os.mkdir(cur, 0o755)
                except OSError as ex:
                    raise StoreError("cannot create directory for %r: %s" % (path, ex))
                continue
            if stat.S_ISLNK(st.st_mode):
                raise StoreError("bad manifest: %r would go through the symlink %r" % (
                    path, os.path.relpath(cur, dest)))
            if not stat.S_ISDIR(st.st_mode):
                raise StoreError("bad manifest: %r would go through the file %r" % (
                    path, os.path.relpath(cur, dest)))
        return cur

    def _copy_blob(self, src, full, exe, h, path):
        try:
            sfd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise StoreError("blob %s for %r is not in the store" % (h, path))
        try:
            mode = 0o755 if exe else 0o644
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            dfd = os.open(full, flags, 0o600)
            try:
                _copy_fd(sfd, dfd)
                os.fchmod(dfd, mode)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    # ------------------------------------------------------------------ gc

    def gc(self, keep_hashes, tmp_age_s=3600):
        """Delete blobs not in keep_hashes and temp files older than tmp_age_s.
        Returns {"count", "bytes"} deleted."""
        keep = set(keep_hashes)
        count = nbytes = 0
        now = time.time()
        for name in os.listdir(self.root):
            full = os.path.join(self.root, name)
            if name.startswith(_TMP_PREFIX):
                try:
                    st = os.lstat(full)
                    if now - st.st_mtime > tmp_age_s:
                        os.unlink(full)
                except OSError:
                    pass
                continue
            if len(name) != 2 or not os.path.isdir(full):
                continue
            for rest in os.listdir(full):
                h = name + rest
                if h in keep or not _HEX.match(h):
                    continue
                p = os.path.join(full, rest)
                try:
                    size = os.lstat(p).st_size
                    os.unlink(p)
                except OSError:
                    continue
                count += 1
                nbytes += size
        return {"count": count, "bytes": nbytes}


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
