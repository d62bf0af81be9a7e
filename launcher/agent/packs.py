"""The store's files at the byte level: temp files, pack files (blobs back to back, read by
offset), copies, and making written data durable. Used by store.py (receiving blobs, gc) and
materialize.py (building work dirs). Standard library only, Python >= 3.8.
"""
import errno
import hashlib
import os

_CHUNK = 1 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class StoreError(Exception):
    """A bad blob stream, or a blob the store lacks or cannot give."""


class BadBlobs(StoreError):
    """Blobs a work dir needed that the store lacks or holds damaged: `bad` is
    [(hash, path in the snapshot, "missing" | "damaged", (pack, offset, size) or None)]."""

    def __init__(self, bad):
        h, path, why, _ = bad[0]
        more = " (and %d more)" % (len(bad) - 1) if len(bad) > 1 else ""
        StoreError.__init__(self, "the store's copy of %s (blob %s) is %s%s" % (
            path, h[:12], "missing" if why == "missing" else "damaged: its bytes no longer match "
            "their hash", more))
        self.bad = bad


def copy_verified(src, dst, h):
    """Copy all of src to dst (both fds at offset 0), hashing what goes by: True if it was
    exactly the blob h (docs/design.md "Snapshots": every blob is checked when it is used)."""
    digest = hashlib.sha256()
    while True:
        buf = os.read(src, _CHUNK)
        if not buf:
            return digest.hexdigest() == h
        digest.update(buf)
        write_all(dst, buf)


def copy_fd(src, dst):
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

def create_tmp(path):
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)


def take(fileobj, fd, h, size):
    """Copy the next `size` bytes of fileobj to fd (at its offset), checking they hash to h."""
    digest = hashlib.sha256()
    left = size
    while left:
        buf = fileobj.read(min(left, _CHUNK))
        if not buf:
            raise StoreError("blob stream ended early: %s needs %d bytes, got %d" % (
                h, size, size - left))
        digest.update(buf)
        write_all(fd, buf)
        left -= len(buf)
    if digest.hexdigest() != h:
        raise StoreError("blob %s: received bytes hash to %s (corrupted in transit, "
                         "or the file changed while it was sent)" % (h, digest.hexdigest()))


class PackWriter(object):
    """A temp pack: verified blobs back to back. A frame that fails is cut off again."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.fd = create_tmp(tmp)
        self.off = 0
        self.entries = []  # (hash, offset, size)
        self.seen = set()

    def add(self, fileobj, h, size):
        try:
            take(fileobj, self.fd, h, size)
        except BaseException:
            os.ftruncate(self.fd, self.off)
            os.lseek(self.fd, self.off, os.SEEK_SET)
            raise
        if h in self.seen:  # twice in one stream: keep the first copy only
            os.ftruncate(self.fd, self.off)
            os.lseek(self.fd, self.off, os.SEEK_SET)
            return
        self.seen.add(h)
        self.entries.append((h, self.off, size))
        self.off += size

    def close(self):
        if self.fd is not None:
            os.fchmod(self.fd, 0o444)
            os.close(self.fd)
            self.fd = None

    def discard(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


class PackFiles(object):
    """Open pack files for materialize, shared by its threads: read(where) -> bytes or None
    (pack gone or short: the caller falls back to a loose copy, or fails)."""

    def __init__(self, store):
        import threading
        self.store = store
        self.fds = {}
        self.lock = threading.Lock()

    def read(self, where):
        pack, off, size = where
        with self.lock:
            fd = self.fds.get(pack)
            if fd is None:
                try:
                    fd = os.open(self.store.pack_path(pack), os.O_RDONLY | _O_CLOEXEC)
                except (OSError, StoreError):
                    fd = -1
                self.fds[pack] = fd
                if len(self.fds) > 512:  # many packs: do not run out of descriptors
                    for p, f in list(self.fds.items()):
                        if p != pack and f >= 0:
                            os.close(f)
                            del self.fds[p]
        if fd < 0:
            return None
        try:
            data = os.pread(fd, size, off)
        except OSError:
            return None
        return data if len(data) == size else None

    def close(self):
        with self.lock:
            for fd in self.fds.values():
                if fd >= 0:
                    os.close(fd)
            self.fds.clear()


def write_all(fd, buf):
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view):]


def flush(paths, root):
    """Make the data of `paths` (temp files under root) durable before they are renamed. With
    small blobs packed, a stream is one pack plus its large blobs: a few fsyncs, not one per
    file of the tree."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
