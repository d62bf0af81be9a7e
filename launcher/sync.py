"""Client side of a sync: the manifest of a tree (its files' hashes, through a local cache),
and the blob stream for the ones the host lacks (docs/contracts.md; docs/design.md
"Snapshots"). Which files: selection.py."""
import errno
import hashlib
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

from .agent.manifest import escaping_links, target_inside
from .errors import SyncError
from .hashcache import HashCache, default_cache_path
from .selection import GitStatus, in_git_work_tree, select

_CHUNK = 1 << 20


def _hash_file(path, expect=None, want_data=False):
    """sha256 hex of a file's bytes (never through a symlink; with `expect`, an lstat, only
    if the file opened is that very file). With want_data, (hash, the bytes), read in one go.
    Tests count calls to this."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if expect is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino) or not stat.S_ISREG(st.st_mode):
                raise OSError(errno.ESTALE, "it was replaced while it was read")
        if want_data:
            data = f.read()
            h.update(data)
            return h.hexdigest(), data
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def _same(a, b):
    return (a.st_size, a.st_mtime_ns, a.st_ino, a.st_mode) == (b.st_size, b.st_mtime_ns, b.st_ino, b.st_mode)


# ---------------------------------------------------------------------------- manifest

def _symlink_entry(root, real_root, rel, full, warnings):
    target = os.readlink(full)
    inside = target_inside(rel, target)
    if inside:
        resolved = os.path.realpath(os.path.join(os.path.dirname(full), target))
        inside = resolved == real_root or resolved.startswith(real_root.rstrip("/") + "/")
    if not inside:
        warnings.append("skipped symlink %s -> %s: points outside the tree" % (rel, target))
        return None
    return {"path": rel, "type": "symlink", "target": target}


class Kept(object):
    """The bytes of small files, as read to hash them, so the upload sends those very bytes
    without reading the files again (a first sync reads each once): up to LIMIT bytes in all,
    files up to FILE_MAX each (docs/design.md "Snapshots")."""
    LIMIT = 256 << 20
    FILE_MAX = 1 << 20

    def __init__(self):
        self.data = {}
        self.size = 0
        self.lock = threading.Lock()

    def wants(self, st):
        return st.st_size <= self.FILE_MAX and self.size + st.st_size <= self.LIMIT

    def put(self, h, data):
        with self.lock:
            if h not in self.data and self.size + len(data) <= self.LIMIT:
                self.data[h] = data
                self.size += len(data)


def _hash_stable(full, rel, st, kept=None):
    """(sha256, lstat) of a file that did not change while it was read; its bytes go to kept
    where it wants them."""
    for _ in range(3):
        try:
            if kept is not None and kept.wants(st):
                h, data = _hash_file(full, st, want_data=True)
            else:
                h, data = _hash_file(full, st), None
            st2 = os.lstat(full)
        except OSError as e:  # replaced by a folder, its folder by a file, gone...
            raise _changed(rel, e)
        if _same(st, st2):
            if data is not None and len(data) == st.st_size:
                kept.put(h, data)
            return h, st
        if not stat.S_ISREG(st2.st_mode):
            raise _changed(rel, OSError(errno.ESTALE, "it is no longer a file"))
        st = st2  # changed while we read it: again
    raise SyncError("%s keeps changing while it is read; try again once it is written" % rel)


def _changed(rel, e):
    return SyncError("%s changed while submit read the tree (%s)" % (rel, e.strerror or e),
                     "submit again once the tree holds still")


def _real_dirs(root, rel, seen, warnings):
    """True if every folder on the way to rel is a real folder (never a symlink to one: the
    client never reads through one, docs/design.md "Snapshots"), each looked at once."""
    folder = rel.rpartition("/")[0]
    ok = seen.get(folder)  # most files share their folder with the one before
    if ok is not None:
        return ok
    parts = rel.split("/")
    cur = ""
    for p in parts[:-1]:
        cur = cur + "/" + p if cur else p
        ok = seen.get(cur)
        if ok is None:
            try:
                st = os.lstat(os.path.join(root, cur))
                ok = stat.S_ISDIR(st.st_mode)
                why = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a folder"
            except OSError as e:
                ok, why = False, e.strerror or str(e)
            seen[cur] = ok
            if not ok:
                warnings.append("skipped what git lists under %s: it is %s now" % (cur, why))
        if not ok:
            return False
    return True


_HASH_THREADS_BYTES = 64 << 20  # bytes to hash before a few threads share the work


def _hash_all(todo, kept=None):
    """[(sha256, lstat)] for todo's (i, full, rel, lstat), in order. Threads (hashlib and
    reads release the GIL) only where there are many bytes: for small files the work is
    Python's own, and threads would only fight over the GIL."""
    n = min(4, os.cpu_count() or 1)
    if n < 2 or sum(t[3].st_size for t in todo) < _HASH_THREADS_BYTES:
        return [_hash_stable(full, rel, st, kept) for _, full, rel, st in todo]
    order = sorted(range(len(todo)), key=lambda i: -todo[i][3].st_size)  # largest first
    with ThreadPoolExecutor(max_workers=n) as ex:
        done = dict(zip(order, ex.map(lambda i: _hash_stable(*(todo[i][1:] + (kept,))), order)))
    return [done[i] for i in range(len(todo))]


def build_manifest(root, cache_path=None, extra=()):
    """The manifest of docs/contracts.md for root, plus "warnings" and "total_size". `extra`:
    more relative paths to take whatever the ignore rules say (a project's data)."""
    root = os.path.abspath(root)
    real_root = os.path.realpath(root)
    in_git = in_git_work_tree(root)
    status = GitStatus(root) if in_git else None  # runs while we list and hash
    try:
        paths, warnings, stats, _ = select(root, in_git, {})
        if extra:
            paths = sorted(set(paths).union(extra))
        cache = HashCache(os.path.expanduser(cache_path) if cache_path else default_cache_path())
        entries = []
        total = 0
        seen = set()
        todo = []  # (index in entries, full path, rel, lstat) of files the cache cannot answer
        kept = Kept()
        dirs = {}  # folder -> a real folder (not a symlink)
        try:
            cache.load(root)
            prefix = root.rstrip("/") + "/"
            for rel in paths:
                full = prefix + rel
                if "/" in rel and not _real_dirs(root, rel, dirs, warnings):
                    continue
                st = stats.get(rel)
                if st is None:
                    try:
                        st = os.lstat(full)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # vanished since it was listed
                    except OSError as e:
                        raise _changed(rel, e)
                if stat.S_ISLNK(st.st_mode):
                    e = _symlink_entry(root, real_root, rel, full, warnings)
                    if e is not None:
                        entries.append(e)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    warnings.append("skipped %s: not a regular file or symlink" % rel)
                    continue
                seen.add(full)
                h = cache.get(full, st)
                if h is None:
                    todo.append((len(entries), full, rel, st))
                entries.append({"path": rel, "type": "file", "hash": h, "size": st.st_size,
                                "exec": bool(st.st_mode & 0o111)})
            if todo:
                done = _hash_all(todo, kept)
                for (i, full, _rel, _st), (h, st) in zip(todo, done):
                    e = entries[i]
                    e["hash"], e["size"], e["exec"] = h, st.st_size, bool(st.st_mode & 0o111)
                    cache.put(full, st, h)
            entries = _drop_escaping_links(entries, warnings)
            total = sum(e["size"] for e in entries if e["type"] == "file")
            cache.prune(root, seen)
        finally:
            cache.close()
        git = status.result() if status is not None else None
        status = None
    finally:
        if status is not None:
            status.cancel()
    return {"entries": entries, "git": git, "warnings": warnings, "total_size": total,
            "_kept": kept.data}


def _drop_escaping_links(entries, warnings):
    """Symlinks that, each inside the tree, lead out of it together (a -> b/.. where b -> ..):
    the host refuses them (agent/manifest.py), so they are not sent."""
    while True:
        bad = set(escaping_links(entries))
        if not bad:
            return entries
        for e in entries:
            if e["path"] in bad:
                warnings.append("skipped symlink %s -> %s: through other symlinks it leads "
                                "outside the tree (or loops)" % (e["path"], e["target"]))
        entries = [e for e in entries if e["path"] not in bad]


def largest_files(manifest, n=10):
    """[(path, size)], the n largest files, largest first."""
    files = [(e["path"], e["size"]) for e in manifest["entries"] if e.get("type", "file") == "file"]
    files.sort(key=lambda x: (-x[1], x[0]))
    return files[:n]


# ---------------------------------------------------------------------------- blob stream

def iter_blob_frames(root, manifest, hashes, chunk=_CHUNK):
    """Yield the blob stream (docs/contracts.md) for the wanted hashes, each once, then END.
    A blob whose bytes build_manifest kept (Kept: read to hash it) is sent from those bytes.
    Otherwise raises SyncError if a file no longer matches its hash: a wrong blob is never completed
    (a file that fits in one chunk is checked before its frame starts; a larger one fails
    before its last bytes are sent, so the host sees a truncated frame and keeps nothing)."""
    root = os.path.abspath(root)
    by_hash = {}
    for e in manifest["entries"]:
        if e.get("type", "file") == "file":
            by_hash.setdefault(e["hash"], e)
    kept = manifest.get("_kept") or {}
    sent = set()
    for h in hashes:
        if h in sent:
            continue
        sent.add(h)
        e = by_hash.get(h)
        if e is None:
            raise SyncError("the host asked for blob %s, which is not in this snapshot" % h)
        data = kept.pop(h, None)  # the bytes hashed, read once (Kept)
        if data is not None:
            yield ("%s %d\n" % (h, len(data))).encode("ascii") + data
            continue
        for part in _frame(root, e, chunk):
            yield part
    yield b"END\n"


def _frame(root, e, chunk):
    full = os.path.join(root, e["path"])
    size, h = e["size"], e["hash"]

    def changed(why):
        return SyncError("%s changed since it was hashed (%s); submit again to send the "
                         "current version" % (e["path"], why))

    try:
        fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as ex:
        raise changed(ex.strerror or str(ex))
    with os.fdopen(fd, "rb") as f:
        header = ("%s %d\n" % (h, size)).encode("ascii")
        if size <= chunk:
            data = f.read(size + 1)
            if len(data) != size or hashlib.sha256(data).hexdigest() != h:
                raise changed("its content differs")
            yield header + data
            return
        yield header
        digest = hashlib.sha256()
        left = size
        pending = None
        while left:
            buf = f.read(min(chunk, left))
            if not buf:
                raise changed("it is shorter now")
            digest.update(buf)
            left -= len(buf)
            if pending is not None:
                yield pending
            pending = buf
        if f.read(1) or digest.hexdigest() != h:
            raise changed("its content differs")
        yield pending
