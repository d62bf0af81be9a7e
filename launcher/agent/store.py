"""Content-addressed store of synced files.

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
name lies about its bytes. Job work dirs are built from the store by materialize.py.
"""
import errno
import hashlib
import os
import re
import time

from . import bases, db
from .manifest import check_hash
from .packs import _O_CLOEXEC, PackWriter, StoreError, create_tmp, flush, take, write_all

__all__ = ["Store", "StoreError"]

_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
_HEADER = re.compile(rb"\A([0-9a-f]{64}) ([0-9]{1,19})\n\Z")
_TMP_PREFIX = ".tmp-"
_PACK_MAX = 1 << 20       # blobs up to this size go into packs, larger ones stay loose files
_PACKS = "packs"
_INDEX = "index.sqlite"


class Store(object):
    def __init__(self, root):
        self.root = os.path.abspath(root)
        self._seq = 0
        self._con = None
        self._bases_dropped = False
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)

    # ------------------------------------------------------------------ lookup

    def path(self, h):
        """Where the blob h lives if it is a loose one."""
        check_hash(h)
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
                db.wal_mode(con)
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

    def lookup(self, hashes):
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

    def pack_path(self, pack):
        if not re.match(r"\A[0-9a-z-]{1,80}\Z", pack):
            raise StoreError("bad pack name in the index: %r" % (pack,))
        return os.path.join(self.root, _PACKS, pack + ".pack")

    def missing(self, hashes):
        """The hashes (in the order given, once each) that the store lacks."""
        uniq, seen = [], set()
        for h in hashes:
            if h in seen:
                continue
            check_hash(h)
            seen.add(h)
            uniq.append(h)
        packed = self.lookup(uniq)
        sizes = {}  # pack id -> its size (a row whose bytes its pack lacks counts as missing)
        for where in packed.values():
            if where[0] not in sizes:
                try:
                    sizes[where[0]] = os.stat(self.pack_path(where[0])).st_size
                except (OSError, StoreError):
                    sizes[where[0]] = -1
        return [h for h in uniq if not (h in packed and packed[h][1] + packed[h][2] <= sizes[packed[h][0]])
                and not os.path.isfile(self.path(h))]

    def forget(self, bad):
        """Drop blobs found missing or damaged where they were (materialize's BadBlobs.bad):
        their index rows (that row only: a good copy indexed since stays) and damaged loose
        files. The next submit that needs them sends them again."""
        import sqlite3
        if bad:
            self._bases_dropped = False
            self._drop_bases()
        for h, _path, _why, where in bad:
            if where is None:
                try:
                    os.unlink(self.path(h))
                except OSError:
                    pass
                continue
            try:
                con = self._index()
                if con is not None:
                    con.execute("DELETE FROM packed WHERE hash=? AND pack=? AND off=?",
                                (h, where[0], where[1]))
            except sqlite3.Error as e:
                raise self._db_error(e)

    def _drop_bases(self):
        """Before a blob goes: no manifest base may name a blob the store lacks (bases.py).
        Once per gc (its first deletion); forget clears again each time."""
        if not self._bases_dropped:
            bases.clear(self.root)
            self._bases_dropped = True

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
                        pack = PackWriter(self._tmp_name("pack"))
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
        fd = create_tmp(tmp)
        try:
            take(fileobj, fd, h, size)
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
            flush([t for t, _ in staged] + ([pack.tmp] if pack is not None else []), self.root)
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
                os.rename(pack.tmp, self.pack_path(pack_id))
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

    # ------------------------------------------------------------------ gc

    def gc(self, keep_hashes, tmp_age_s=3600, dry_run=False):
        """Delete blobs not in keep_hashes and temp files older than tmp_age_s (packs holding
        some are written again with the kept ones only). Returns {"count", "bytes"} deleted
        (with dry_run: that would be, deleting nothing)."""
        keep = set(keep_hashes)
        count = nbytes = 0
        now = time.time()
        self._bases_dropped = False  # once per gc, before its first deletion
        if dry_run:
            return self._garbage(keep)
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
                self._drop_bases()
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

    def _garbage(self, keep):
        """{"count", "bytes"} of the blobs gc would delete."""
        count = nbytes = 0
        for name in os.listdir(self.root):
            full = os.path.join(self.root, name)
            if len(name) != 2 or not os.path.isdir(full):
                continue
            for rest in os.listdir(full):
                if name + rest not in keep and _HEX.match(name + rest):
                    count += 1
                    try:
                        nbytes += os.lstat(os.path.join(full, rest)).st_size
                    except OSError:
                        pass
        con = self._index()
        if con is not None:
            for h, size in con.execute("SELECT hash, size FROM packed"):
                if h not in keep:
                    count += 1
                    nbytes += size
        return {"count": count, "bytes": nbytes}

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
            self._drop_bases()
            kept = [r for r in rows if r[0] in keep]
            writer = None
            if kept:  # write the kept blobs to a new pack, then swap the index rows over
                writer = PackWriter(self._tmp_name("pack"))
                src = os.open(self.pack_path(pack), os.O_RDONLY | _O_CLOEXEC)
                try:
                    for h, off, size in sorted(kept, key=lambda r: r[1]):
                        data = os.pread(src, size, off)
                        if len(data) != size or hashlib.sha256(data).hexdigest() != h:
                            continue  # damaged: drop it (it will be sent again)
                        write_all(writer.fd, data)
                        writer.entries.append((h, writer.off, size))
                        writer.off += size
                finally:
                    os.close(src)
                writer.close()
                flush([writer.tmp], self.root)
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("DELETE FROM packed WHERE pack=?", (pack,))
                if writer is not None and writer.entries:
                    new_id = "%d-%s" % (int(time.time()), os.urandom(6).hex())
                    os.rename(writer.tmp, self.pack_path(new_id))
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
                os.unlink(self.pack_path(pack))
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


