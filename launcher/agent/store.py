"""Content-addressed store of synced files, and job work dirs built from it.

Standard library only, Python >= 3.8 (this runs on the GPU host).

Where blobs live (everything read-only, 0444, in 0700 directories):
  - small ones (up to _PACK_MAX) in pack files, ROOT/packs/ID.pack: one per received stream,
    the blobs back to back, found through ROOT/index.sqlite (hash -> pack, offset, size). A
    first sync of 10,000 files so creates one file in the store, not 10,000 (file creation is
    what costs most on the host, twice over once the job's own copies are counted);
  - large ones as loose files, ROOT/ab/cdef... (sha256 hex).
A blob becomes visible only once complete, verified and on disk: a stream is written to temp
files (its pack, and its large blobs) in ROOT, each blob checked against its hash; at the end of
the stream, or where it breaks off, those few files are fsynced, and only then renamed into place
and indexed. So a crash can lose received blobs (they are sent again) but never leave one whose
name lies about its bytes.
A job's work dir is made of COPIES of blobs, never hard links: a job that rewrites a file in place
must not be able to change the store or another job's files (DESIGN.md decision 1).
"""
import errno
import hashlib
import os
import re
import stat
import time

_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
_HEADER = re.compile(rb"\A([0-9a-f]{64}) ([0-9]{1,19})\n\Z")
_CHUNK = 1 << 20
_TMP_PREFIX = ".tmp-"
_SMALL = 1 << 20          # blobs up to this size are copied with one read and one write
_PACK_MAX = 1 << 20       # blobs up to this size go into packs, larger ones stay loose files
_PACKS = "packs"
_INDEX = "index.sqlite"
_PARALLEL_MIN = 512       # work dirs with at least this many files are copied by threads
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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


def check_entries(entries):
    """Validate manifest entries without touching the disk (what materialize would refuse):
    paths, hashes, symlink targets, a path given twice or used both as a file and a folder.
    Returns the total size of the files. Raises StoreError."""
    seen = set()
    parents = set()
    total = 0
    for e in entries:
        if not isinstance(e, dict):
            raise StoreError("bad manifest entry: %r" % (e,))
        path = e.get("path")
        parts = check_path(path)
        kind = e.get("type", "file")
        if kind == "file":
            _check_hash(e.get("hash"))
            size = e.get("size")
            total += size if isinstance(size, int) and size > 0 else 0
        elif kind == "symlink":
            _check_target(path, e.get("target"))
        else:
            raise StoreError("bad manifest entry %r: unknown type %r" % (path, kind))
        if path in seen or path in parents:
            raise StoreError("bad manifest: %r appears twice (or is also a directory)" % (path,))
        seen.add(path)
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise StoreError("bad manifest: %r would go through the file or symlink %r" % (
                    path, parent))
            parents.add(parent)
    return total


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
        self._seq = 0
        self._con = None
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)

    # ------------------------------------------------------------------ lookup

    def path(self, h):
        """Where the blob h lives if it is a loose one."""
        _check_hash(h)
        return "%s/%s/%s" % (self.root, h[:2], h[2:])

    def _index(self, create=False):
        """The pack index (SQLite, WAL), or None while there is none and create is False."""
        if self._con is None:
            path = os.path.join(self.root, _INDEX)
            if not create and not os.path.exists(path):
                return None
            import sqlite3
            try:
                con = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
                con.execute("CREATE TABLE IF NOT EXISTS packed (hash TEXT PRIMARY KEY, pack TEXT NOT NULL,"
                            " off INTEGER NOT NULL, size INTEGER NOT NULL)")
            except sqlite3.Error as e:
                raise self._db_error(e)
            try:
                os.chmod(path, 0o600)
            except OSError:
                pass
            self._con = con
        return self._con

    def _db_error(self, e):
        """SQLite says "disk I/O error" where the disk is full (it cannot grow its -shm and -wal
        files): say ENOSPC then, like a write of ours would."""
        try:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize < (4 << 20):
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            pass
        return e

    def _lookup(self, hashes):
        """{hash: (pack id, offset, size)} for those of `hashes` that are in a pack."""
        import sqlite3
        con = self._index()
        if con is None:
            return {}
        hashes = list(hashes)
        out = {}
        try:
            for i in range(0, len(hashes), 500):
                part = hashes[i:i + 500]
                for h, pack, off, size in con.execute(
                        "SELECT hash, pack, off, size FROM packed WHERE hash IN (%s)" % ",".join("?" * len(part)),
                        part):
                    out[h] = (pack, off, size)
        except sqlite3.Error as e:
            raise self._db_error(e)
        return out

    def _pack_path(self, pack):
        if not re.match(r"\A[0-9a-z-]{1,80}\Z", pack):
            raise StoreError("bad pack name in the index: %r" % (pack,))
        return os.path.join(self.root, _PACKS, pack + ".pack")

    def has(self, h):
        return not self.missing([h])

    def missing(self, hashes):
        """The hashes (in the order given, once each) that the store lacks."""
        uniq, seen = [], set()
        for h in hashes:
            if h in seen:
                continue
            _check_hash(h)
            seen.add(h)
            uniq.append(h)
        packed = self._lookup(uniq)
        there = {}  # pack id -> its file exists (an index row without its pack counts as missing)
        for where in packed.values():
            if where[0] not in there:
                try:
                    there[where[0]] = os.path.isfile(self._pack_path(where[0]))
                except StoreError:
                    there[where[0]] = False
        return [h for h in uniq if not (h in packed and there[packed[h][0]])
                and not os.path.isfile(self.path(h))]

    def hashes(self):
        """Every blob in the store (loose and packed), sorted."""
        import sqlite3
        out = set()
        for name in os.listdir(self.root):
            d = os.path.join(self.root, name)
            if len(name) == 2 and os.path.isdir(d):
                out.update(name + rest for rest in os.listdir(d) if _HEX.match(name + rest))
        con = self._index()
        if con is not None:
            try:
                out.update(h for (h,) in con.execute("SELECT hash FROM packed"))
            except sqlite3.Error as e:
                raise self._db_error(e)
        return sorted(out)

    def read(self, h):
        """The bytes of blob h (raises StoreError if the store lacks it)."""
        where = self._lookup([_check_hash(h)]).get(h)
        try:
            if where is not None:
                fd = os.open(self._pack_path(where[0]), os.O_RDONLY | _O_CLOEXEC)
                try:
                    data = os.pread(fd, where[2], where[1])
                finally:
                    os.close(fd)
                if len(data) == where[2]:
                    return data
            with open(self.path(h), "rb") as f:
                return f.read()
        except OSError:
            raise StoreError("blob %s is not in the store" % h)

    # ------------------------------------------------------------------ receive

    def receive(self, fileobj):
        """Read blob frames (see docs/contracts.md) from a binary file object until END.
        Returns {"count": blobs received, "bytes": their bytes}. A truncated stream or a bad
        hash raises StoreError; blobs completed before it are kept, no partial one is."""
        count = nbytes = 0
        staged = []   # loose blobs: (temp path, hash), verified, not yet durable nor visible
        pack = None   # small blobs: one temp pack for the whole stream
        try:
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
                if size <= _PACK_MAX:
                    if pack is None:
                        pack = _PackWriter(self._tmp_name("pack"))
                    pack.add(fileobj, h, size)
                else:
                    staged.append((self._receive_one(fileobj, h, size), h))
                count += 1
                nbytes += size
        finally:
            self._publish(staged, pack)

    def _tmp_name(self, what):
        self._seq += 1
        return os.path.join(self.root, "%s%d-%d-%s-%s" % (_TMP_PREFIX, os.getpid(), self._seq,
                                                           os.urandom(4).hex(), what))

    def _receive_one(self, fileobj, h, size):
        """Write one frame's bytes to a temp file in ROOT and check its hash; return its path."""
        tmp = self._tmp_name(h[:12])
        fd = _create(tmp)
        try:
            _take(fileobj, fd, h, size)
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        return tmp

    def _publish(self, staged, pack):
        """Make the staged temp files durable, then give each its name (see module doc)."""
        if pack is not None and not pack.entries:
            pack.discard()
            pack = None
        if not staged and pack is None:
            return
        try:
            if pack is not None:
                pack.close()
            _flush([t for t, _ in staged] + ([pack.tmp] if pack is not None else []), self.root)
            made = set()
            for tmp, h in staged:
                final = self.path(h)
                d = os.path.dirname(final)
                if d not in made:
                    if not os.path.isdir(d):
                        os.makedirs(d, mode=0o700, exist_ok=True)
                    made.add(d)
                os.rename(tmp, final)  # over an existing one: the same bytes, by their name
            if pack is not None:
                d = os.path.join(self.root, _PACKS)
                if not os.path.isdir(d):
                    os.makedirs(d, mode=0o700, exist_ok=True)
                pack_id = "%d-%s" % (int(time.time()), os.urandom(6).hex())
                os.rename(pack.tmp, self._pack_path(pack_id))
                pack.tmp = None
                self._index_pack(pack_id, pack.entries)
        except BaseException:
            for tmp, _ in staged:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if pack is not None:
                pack.discard()
            raise

    def _index_pack(self, pack_id, entries):
        import sqlite3
        con = self._index(create=True)
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                # REPLACE: a row may name a pack that is gone; this one is here and checked
                con.executemany("INSERT OR REPLACE INTO packed VALUES (?,?,?,?)",
                                [(h, pack_id, off, size) for h, off, size in entries])
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._db_error(e)

    # ------------------------------------------------------------------ materialize

    def materialize(self, entries, dest):
        """Build a job's work dir at dest from manifest entries: private, writable copies of
        blobs (0755 if exec else 0644) and symlinks. Every path is validated; nothing is ever
        written through a symlink. Raises StoreError.

        First, in manifest order, every entry is checked and every directory and symlink made
        (what this call made is remembered, so a directory is looked at once, not once per file
        below it); then the files are copied, by a few threads when there are many (each copy
        is an open(O_EXCL|O_NOFOLLOW) of a new name, so their order does not matter)."""
        dest = os.path.abspath(dest).rstrip("/") or "/"
        os.makedirs(dest, exist_ok=True)
        dirs = set()    # directories this call made or found to be real directories
        taken = set()   # paths of files and symlinks this call will make or made
        dirs.add(dest)
        copies = []
        for e in entries:
            if not isinstance(e, dict):
                raise StoreError("bad manifest entry: %r" % (e,))
            path = e.get("path")
            parts = check_path(path)
            kind = e.get("type", "file")
            if kind == "file":
                src = self.path(e.get("hash"))  # checks the hash; a loose blob's path
            elif kind == "symlink":
                target = e.get("target")
                _check_target(path, target)
            else:
                raise StoreError("bad manifest entry %r: unknown type %r" % (path, kind))
            full = dest + "/" + path  # checked above: relative, no empty, "." or ".." parts
            parent = full[:len(full) - len(parts[-1]) - 1]
            if parent not in dirs:
                self._make_parents(dest, parts, path, dirs, taken)
            if full in taken or full in dirs:
                raise StoreError("bad manifest: %r appears twice (or is also a directory)" % (path,))
            taken.add(full)
            if kind == "symlink":
                try:
                    os.symlink(target, full)
                except FileExistsError:
                    raise StoreError("bad manifest: %r appears twice (or is also a directory)" % (path,))
                except OSError as ex:
                    raise StoreError("cannot create %r in the work dir: %s" % (path, ex))
            else:
                copies.append((src, full, 0o755 if e.get("exec") else 0o644, e.get("hash"), path,
                               e.get("size")))
        # files are created with their final mode; a chmod each only if the umask takes bits
        um = os.umask(0o022)
        os.umask(um)
        packed = self._lookup({c[3] for c in copies})
        # (src, dest, mode, hash, path, size, chmod, (pack, offset, size) or None), by pack
        # and offset: each thread reads the packs in order and keeps one open at a time
        copies = [c + (bool(c[2] & um), packed.get(c[3])) for c in copies]
        copies.sort(key=lambda c: c[7] or ("~", 0, 0))
        packs = _PackFiles(self)
        try:
            if len(copies) >= _PARALLEL_MIN and (os.cpu_count() or 1) > 1:
                _parallel(lambda c: self._copy_blob(c, packs), copies, min(8, 2 * (os.cpu_count() or 1)))
            else:
                for c in copies:
                    self._copy_blob(c, packs)
        finally:
            packs.close()

    def _make_parents(self, dest, parts, path, dirs, taken):
        cur = dest
        for p in parts[:-1]:
            cur = cur + "/" + p
            if cur in dirs:
                continue
            if cur in taken:
                raise StoreError("bad manifest: %r would go through the %s %r" % (
                    path, "symlink" if os.path.islink(cur) else "file", os.path.relpath(cur, dest)))
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                try:
                    os.mkdir(cur, 0o755)
                except OSError as ex:
                    raise StoreError("cannot create directory for %r: %s" % (path, ex))
                dirs.add(cur)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise StoreError("bad manifest: %r would go through the symlink %r" % (
                    path, os.path.relpath(cur, dest)))
            if not stat.S_ISDIR(st.st_mode):
                raise StoreError("bad manifest: %r would go through the file %r" % (
                    path, os.path.relpath(cur, dest)))
            dirs.add(cur)
        return cur

    def _copy_blob(self, c, packs):
        src, full, mode, h, path, size, chmod, where = c
        if where is not None:
            data = packs.read(where)
            if data is not None:
                dfd = self._create_copy(full, mode, path)
                try:
                    if chmod:
                        os.fchmod(dfd, mode)
                    _write_all(dfd, data)
                except OSError as ex:
                    raise StoreError("cannot create %r in the work dir: %s" % (path, ex))
                finally:
                    os.close(dfd)
                return
        try:
            sfd = os.open(src, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError("blob %s for %r is not in the store" % (h, path))
        try:
            dfd = self._create_copy(full, mode, path)
            try:
                if chmod:
                    os.fchmod(dfd, mode)
                if isinstance(size, int) and 0 <= size < _SMALL:
                    # one read of size+1: a short read is the end of the blob (regular file)
                    buf = os.read(sfd, size + 1)
                    _write_all(dfd, buf)
                    if len(buf) > size:  # the manifest undersold it: copy the rest too
                        _copy_fd(sfd, dfd)
                else:
                    _copy_fd(sfd, dfd)
            except OSError as ex:
                raise StoreError("cannot create %r in the work dir: %s" % (path, ex))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    @staticmethod
    def _create_copy(full, mode, path):
        try:
            return os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, mode)
        except FileExistsError:
            raise StoreError("bad manifest: %r appears twice (or is also a directory)" % (path,))
        except OSError as ex:
            raise StoreError("cannot create %r in the work dir: %s" % (path, ex))

    # ------------------------------------------------------------------ gc

    def gc(self, keep_hashes, tmp_age_s=3600):
        """Delete blobs not in keep_hashes and temp files older than tmp_age_s (packs holding
        some are written again with the kept ones only). Returns {"count", "bytes"} deleted."""
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
        c, b = self._gc_packs(keep, now, tmp_age_s)
        return {"count": count + c, "bytes": nbytes + b}

    def _gc_packs(self, keep, now, tmp_age_s):
        con = self._index()
        d = os.path.join(self.root, _PACKS)
        if con is None:
            return 0, 0
        by_pack = {}
        for h, pack, off, size in con.execute("SELECT hash, pack, off, size FROM packed"):
            by_pack.setdefault(pack, []).append((h, off, size))
        count = nbytes = 0
        for pack, rows in by_pack.items():
            drop = [r for r in rows if r[0] not in keep]
            if not drop:
                continue
            kept = [r for r in rows if r[0] in keep]
            writer = None
            if kept:  # write the kept blobs to a new pack, then swap the index rows over
                writer = _PackWriter(self._tmp_name("pack"))
                src = os.open(self._pack_path(pack), os.O_RDONLY | _O_CLOEXEC)
                try:
                    for h, off, size in sorted(kept, key=lambda r: r[1]):
                        data = os.pread(src, size, off)
                        if len(data) != size or hashlib.sha256(data).hexdigest() != h:
                            continue  # damaged: drop it (it will be sent again)
                        _write_all(writer.fd, data)
                        writer.entries.append((h, writer.off, size))
                        writer.off += size
                finally:
                    os.close(src)
                writer.close()
                _flush([writer.tmp], self.root)
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("DELETE FROM packed WHERE pack=?", (pack,))
                if writer is not None and writer.entries:
                    new_id = "%d-%s" % (int(time.time()), os.urandom(6).hex())
                    os.rename(writer.tmp, self._pack_path(new_id))
                    writer.tmp = None
                    con.executemany("INSERT OR IGNORE INTO packed VALUES (?,?,?,?)",
                                    [(h, new_id, off, size) for h, off, size in writer.entries])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                if writer is not None:
                    writer.discard()
                raise
            if writer is not None:
                writer.discard()
            try:
                os.unlink(self._pack_path(pack))
            except OSError:
                pass
            count += len(drop)
            nbytes += sum(r[2] for r in drop)
        # packs no row names (left by a crash between their rename and their index rows)
        try:
            names = os.listdir(d)
        except OSError:
            names = []
        live = {p for (p,) in con.execute("SELECT DISTINCT pack FROM packed")}
        for name in names:
            if name.endswith(".pack") and name[:-5] not in live:
                full = os.path.join(d, name)
                try:
                    if now - os.lstat(full).st_mtime > tmp_age_s:
                        os.unlink(full)
                except OSError:
                    pass
        return count, nbytes


def _create(path):
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)


def _take(fileobj, fd, h, size):
    """Copy the next `size` bytes of fileobj to fd (at its offset), checking they hash to h."""
    digest = hashlib.sha256()
    left = size
    while left:
        buf = fileobj.read(min(left, _CHUNK))
        if not buf:
            raise StoreError("blob stream ended early: %s needs %d bytes, got %d" % (
                h, size, size - left))
        digest.update(buf)
        _write_all(fd, buf)
        left -= len(buf)
    if digest.hexdigest() != h:
        raise StoreError("blob %s: received bytes hash to %s (corrupted in transit, "
                         "or the file changed while it was sent)" % (h, digest.hexdigest()))


class _PackWriter(object):
    """A temp pack: verified blobs back to back. A frame that fails is cut off again."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.fd = _create(tmp)
        self.off = 0
        self.entries = []  # (hash, offset, size)
        self.seen = set()

    def add(self, fileobj, h, size):
        try:
            _take(fileobj, self.fd, h, size)
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


class _PackFiles(object):
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
                    fd = os.open(self.store._pack_path(pack), os.O_RDONLY | _O_CLOEXEC)
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


def _write_all(fd, buf):
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view):]


def _parallel(fn, items, workers):
    """fn(item) for every item on `workers` threads (the copies are system calls that release
    the GIL); the first error is raised once all have stopped."""
    import threading
    lock = threading.Lock()
    it = iter(items)
    errors = []

    def work():
        while True:
            with lock:
                if errors:
                    return
                item = next(it, None)
            if item is None:
                return
            try:
                fn(item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                with lock:
                    errors.append(e)
                return

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _flush(paths, root):
    """Make the data of `paths` (temp files under root) durable before they are renamed. With
    small blobs packed, a stream is one pack plus its large blobs: a few fsyncs, not one per
    file of the tree."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
