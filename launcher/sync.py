"""Client side of a sync: which files to send, their hashes (through a local cache), and the
blob stream for the ones the host lacks (docs/contracts.md, DESIGN.md decisions 1-2).

Selection follows git: inside a git work tree exactly what
`git ls-files --cached --others --exclude-standard` lists (run in `root`, so a root below the
repository's top level takes that subdirectory only, with paths relative to root and the
.gitignore files of the levels above still in force); outside git, a walk that applies every
.gitignore at every level with pathspec's gitwildmatch and always leaves `.git` out.
An optional `.rtrainignore` at root (same syntax) removes more in both cases.
Symlinks are never followed: a symlink is an entry of its own.
"""
import hashlib
import os
import stat
import subprocess

DEFAULT_CACHE = os.path.join("~", ".cache", "rtrain", "hashes.sqlite")
RTRAINIGNORE = ".rtrainignore"
_CHUNK = 1 << 20
_GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX",
                 "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR")


class SyncError(Exception):
    """The tree changed under us, or the host asked for something we cannot send."""


# ---------------------------------------------------------------------------- git

def _git_env():
    env = dict(os.environ)
    for k in _GIT_ENV_DROP:
        env.pop(k, None)
    env["GIT_OPTIONAL_LOCKS"] = "0"
    return env


def _git(root, *args, check=True):
    """Run git in root with an argv list; returns stdout bytes, or None if git is missing or
    (with check=False) failed."""
    try:
        p = subprocess.run(["git", "-C", root] + list(args), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_git_env())
    except OSError:
        return None
    if p.returncode != 0:
        if check:
            raise SyncError("git %s failed in %s: %s" % (
                " ".join(args), root, p.stderr.decode("utf-8", "replace").strip()))
        return None
    return p.stdout


def _in_git_work_tree(root):
    out = _git(root, "rev-parse", "--is-inside-work-tree", check=False)
    return out is not None and out.strip() == b"true"


def git_info(root):
    """{"commit": HEAD sha or None (no commits yet), "dirty": bool} or None outside git.
    dirty is `git status --porcelain` (untracked-not-ignored included) limited to root."""
    root = os.path.abspath(root)
    if not _in_git_work_tree(root):
        return None
    return _GitStatus(root).result()


class _GitStatus(object):
    """`git status --porcelain=v2 --branch` for root, started at once and read later, so it
    runs while the tree is listed and hashed: HEAD from its branch.oid header, dirty if it
    lists any entry (untracked-not-ignored included), limited to root."""

    def __init__(self, root):
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["git", "-C", root, "status", "--porcelain=v2", "--branch", "-z",
                 "--untracked-files=normal", "--", "."],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=_git_env())
        except OSError:
            self.proc = None
        self.root = root

    def result(self):
        if self.proc is None:
            raise SyncError("git status failed in %s: git not found" % self.root)
        out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise SyncError("git status failed in %s: %s" % (
                self.root, err.decode("utf-8", "replace").strip()))
        commit, dirty = None, False
        for rec in out.split(b"\0"):
            if rec.startswith(b"# branch.oid "):
                oid = rec[len(b"# branch.oid "):].strip().decode("ascii", "replace")
                commit = oid if oid != "(initial)" else None
            elif rec and not rec.startswith(b"#"):
                dirty = True
        return {"commit": commit, "dirty": dirty}

    def cancel(self):
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
                self.proc.communicate()
            except OSError:
                pass


# ---------------------------------------------------------------------------- ignore rules

def _spec(lines):
    import pathspec
    cls = getattr(pathspec, "GitIgnoreSpec", None)
    if cls is not None:
        return cls.from_lines(lines)
    return pathspec.PathSpec.from_lines("gitwildmatch", lines)


def _read_spec(path):
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return _spec(lines) if lines else None


def _check(spec, rel):
    """True: ignored, False: re-included (negated), None: no pattern matches."""
    check = getattr(spec, "check_file", None)
    if check is not None:
        return check(rel).include
    for pat in reversed(list(spec.patterns)):  # pathspec < 0.12
        if pat.include is not None and pat.match_file(rel) is not None:
            return pat.include
    return None


def _ignored_by_stack(stack, rel, is_dir):
    """stack: [(base rel dir ('' for root), spec)], shallow to deep. Deeper files win, and
    within a file the last matching pattern wins (git's rules)."""
    for base, spec in reversed(stack):
        sub = rel[len(base) + 1:] if base else rel
        res = _check(spec, sub + "/" if is_dir else sub)
        if res is not None:
            return res
    return False


def _rtrainignore_filter(root, paths):
    spec = _read_spec(os.path.join(root, RTRAINIGNORE))
    if spec is None:
        return paths
    stack = [("", spec)]
    out = []
    for p in paths:
        parts = p.split("/")
        # like git: nothing below an excluded directory can be re-included
        if any(_ignored_by_stack(stack, "/".join(parts[:i]), True) for i in range(1, len(parts))):
            continue
        if not _ignored_by_stack(stack, p, False):
            out.append(p)
    return out


# ---------------------------------------------------------------------------- selection

def _select_git(root, warnings, stats=None):
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    paths = set()
    for raw in out.split(b"\0"):
        if not raw:
            continue
        rel = os.fsdecode(raw)
        if rel.endswith("/"):
            warnings.append("skipped %s: a nested git repository (not tracked here)" % rel)
            continue
        try:
            st = os.lstat(os.path.join(root, rel))
        except (FileNotFoundError, NotADirectoryError):
            continue  # tracked but deleted in the work tree
        if stat.S_ISDIR(st.st_mode):
            warnings.append("skipped submodule %s: submodules are not synced" % rel)
            continue
        paths.add(rel)
        if stats is not None:
            stats[rel] = st
    return paths


def _select_walk(root, warnings):
    paths = set()

    def walk(absdir, reldir, stack):
        spec = _read_spec(os.path.join(absdir, ".gitignore"))
        if spec is not None:
            stack = stack + [(reldir, spec)]
        try:
            it = list(os.scandir(absdir))
        except OSError as e:
            warnings.append("skipped %s: %s" % (reldir or ".", e.strerror or e))
            return
        for de in it:
            if de.name == ".git":
                continue
            rel = reldir + "/" + de.name if reldir else de.name
            try:
                is_dir = de.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if _ignored_by_stack(stack, rel, is_dir):
                continue
            if is_dir:
                walk(de.path, rel, stack)
            else:
                paths.add(rel)

    walk(root, "", [])
    return paths


def select_files(root):
    """(paths, warnings): sorted relative POSIX paths of the files to sync (see module doc)."""
    paths, warnings, _stats, _git_root = _select(os.path.abspath(root))
    return paths, warnings


def _select(root, in_git=None, stats=None):
    """select_files, plus the lstat of each path where it was taken, and whether root is in a
    git work tree."""
    warnings = []
    if in_git is None:
        in_git = _in_git_work_tree(root)
    if in_git:
        paths = _select_git(root, warnings, stats)
    else:
        paths = _select_walk(root, warnings)
    return _rtrainignore_filter(root, sorted(paths)), warnings, stats, in_git


# ---------------------------------------------------------------------------- hash cache

def default_cache_path():
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return os.path.join(base, "rtrain", "hashes.sqlite")
    return os.path.expanduser(DEFAULT_CACHE)


class _HashCache(object):
    """(absolute path, size, mtime_ns, inode) -> sha256, in SQLite. Falls back to memory
    when the file cannot be used: a broken cache must never break a submit. The rows of one
    tree are read in one query (load) and the changes written in one transaction (close)."""

    def __init__(self, path):
        import sqlite3
        self.con = None
        self.rows = {}
        self.loaded = False
        self.new = []
        d = os.path.dirname(path)
        try:
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o700, exist_ok=True)
                os.chmod(d, 0o700)
            self.con = sqlite3.connect(path, timeout=10)
            self._init()
        except (OSError, sqlite3.Error):
            if self.con is not None:
                self.con.close()
            self.con = sqlite3.connect(":memory:")
            self._init()

    def _init(self):
        self.con.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER,"
                         " mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")

    @staticmethod
    def _range(root):
        return root.rstrip("/") + "/", root.rstrip("/") + "0"  # '0' sorts right after '/'

    def load(self, root):
        """Read every row below root into memory."""
        import sqlite3
        try:
            cur = self.con.execute("SELECT path, size, mtime_ns, inode, sha256 FROM hashes "
                                   "WHERE path >= ? AND path < ?", self._range(root))
            self.rows = {r[0]: r[1:] for r in cur.fetchall()}
            self.loaded = True
        except sqlite3.Error:
            self.rows = {}

    def get(self, path, st):
        if self.loaded:
            row = self.rows.get(path)
        else:
            row = self.con.execute("SELECT size, mtime_ns, inode, sha256 FROM hashes WHERE path=?",
                                   (path,)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns and row[2] == st.st_ino:
            return row[3]
        return None

    def put(self, path, st, h):
        self.new.append((path, st.st_size, st.st_mtime_ns, st.st_ino, h))

    def prune(self, root, seen):
        """Forget files below root that are no longer in the tree."""
        if self.loaded:
            gone = [(p,) for p in self.rows if p not in seen]
        else:
            rows = self.con.execute("SELECT path FROM hashes WHERE path >= ? AND path < ?",
                                    self._range(root))
            gone = [(r[0],) for r in rows.fetchall() if r[0] not in seen]
        if gone:
            self.con.executemany("DELETE FROM hashes WHERE path=?", gone)

    def close(self):
        import sqlite3
        try:
            if self.new:
                self.con.executemany("INSERT OR REPLACE INTO hashes VALUES (?,?,?,?,?)", self.new)
            self.con.commit()
        except sqlite3.Error:
            pass
        self.con.close()


def _hash_file(path):
    """sha256 hex of a file's bytes (never through a symlink). Tests count calls to this."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def _same(a, b):
    return (a.st_size, a.st_mtime_ns, a.st_ino, a.st_mode) == (b.st_size, b.st_mtime_ns, b.st_ino, b.st_mode)


# ---------------------------------------------------------------------------- manifest

def _lexically_inside(rel, target):
    depth = len(rel.split("/")) - 1
    for p in target.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            depth -= 1
            if depth < 0:
                return False
        else:
            depth += 1
    return True


def _symlink_entry(root, real_root, rel, full, warnings):
    target = os.readlink(full)
    inside = (not os.path.isabs(target) and _lexically_inside(rel, target))
    if inside:
        resolved = os.path.realpath(os.path.join(os.path.dirname(full), target))
        inside = resolved == real_root or resolved.startswith(real_root.rstrip("/") + "/")
    if not inside:
        warnings.append("skipped symlink %s -> %s: points outside the tree" % (rel, target))
        return None
    return {"path": rel, "type": "symlink", "target": target}


def _hash_stable(full, rel, st):
    """(sha256, lstat) of a file that did not change while it was read."""
    for _ in range(3):
        h = _hash_file(full)
        st2 = os.lstat(full)
        if _same(st, st2):
            return h, st
        st = st2  # changed while we read it: again
    raise SyncError("%s keeps changing while it is read; try again once it is written" % rel)


_HASH_THREADS_BYTES = 64 << 20  # bytes to hash before a few threads share the work


def _hash_all(todo):
    """[(sha256, lstat)] for todo's (i, full, rel, lstat), in order. Threads (hashlib and
    reads release the GIL) only where there are many bytes: for small files the work is
    Python's own, and threads would only fight over the GIL."""
    n = min(4, os.cpu_count() or 1)
    if n < 2 or sum(t[3].st_size for t in todo) < _HASH_THREADS_BYTES:
        return [_hash_stable(full, rel, st) for _, full, rel, st in todo]
    import threading
    out = [None] * len(todo)
    errors = []
    # largest first, dealt round-robin: the threads finish together
    order = sorted(range(len(todo)), key=lambda i: -todo[i][3].st_size)

    def work(k):
        try:
            for i in order[k::n]:
                _, full, rel, st = todo[i]
                out[i] = _hash_stable(full, rel, st)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def build_manifest(root, cache_path=None):
    """The manifest of docs/contracts.md for root, plus "warnings" and "total_size"."""
    root = os.path.abspath(root)
    real_root = os.path.realpath(root)
    in_git = _in_git_work_tree(root)
    status = _GitStatus(root) if in_git else None  # runs while we list and hash
    try:
        paths, warnings, stats, _ = _select(root, in_git, {})
        cache = _HashCache(os.path.expanduser(cache_path) if cache_path else default_cache_path())
        entries = []
        total = 0
        seen = set()
        todo = []  # (index in entries, full path, rel, lstat) of files the cache cannot answer
        try:
            cache.load(root)
            for rel in paths:
                full = os.path.join(root, rel)
                st = stats.get(rel)
                if st is None:
                    try:
                        st = os.lstat(full)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # vanished since it was listed
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
                done = _hash_all(todo)
                for (i, full, _rel, _st), (h, st) in zip(todo, done):
                    e = entries[i]
                    e["hash"], e["size"], e["exec"] = h, st.st_size, bool(st.st_mode & 0o111)
                    cache.put(full, st, h)
            total = sum(e["size"] for e in entries if e["type"] == "file")
            cache.prune(root, seen)
        finally:
            cache.close()
        git = status.result() if status is not None else None
        status = None
    finally:
        if status is not None:
            status.cancel()
    return {"entries": entries, "git": git, "warnings": warnings, "total_size": total}


def largest_files(manifest, n=10):
    """[(path, size)], the n largest files, largest first."""
    files = [(e["path"], e["size"]) for e in manifest["entries"] if e.get("type", "file") == "file"]
    files.sort(key=lambda x: (-x[1], x[0]))
    return files[:n]


# ---------------------------------------------------------------------------- blob stream

def iter_blob_frames(root, manifest, hashes, chunk=_CHUNK):
    """Yield the blob stream (docs/contracts.md) for the wanted hashes, each once, then END.
    Raises SyncError if a file no longer matches its hash: a wrong blob is never completed
    (a file that fits in one chunk is checked before its frame starts; a larger one fails
    before its last bytes are sent, so the host sees a truncated frame and keeps nothing)."""
    root = os.path.abspath(root)
    by_hash = {}
    for e in manifest["entries"]:
        if e.get("type", "file") == "file":
            by_hash.setdefault(e["hash"], e)
    sent = set()
    for h in hashes:
        if h in sent:
            continue
        sent.add(h)
        e = by_hash.get(h)
        if e is None:
            raise SyncError("the host asked for blob %s, which is not in this snapshot" % h)
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
