"""The client's cache of file hashes: (absolute path, size, mtime_ns, inode) -> sha256, so an
unchanged tree is not read again (docs/design.md "Snapshots")."""
import os

DEFAULT_CACHE = os.path.join("~", ".cache", "rtrain", "hashes.sqlite")


def _key(path):
    """The path as SQLite can hold it: a name that is not valid UTF-8 (kept by Python as
    surrogates) has its odd bytes written as \\xNN."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def default_cache_path():
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return os.path.join(base, "rtrain", "hashes.sqlite")
    return os.path.expanduser(DEFAULT_CACHE)


class HashCache(object):
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
        root = _key(root).rstrip("/")
        return root + "/", root + "0"  # '0' sorts right after '/'

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
            row = self.rows.get(_key(path))
        else:
            row = self.con.execute("SELECT size, mtime_ns, inode, sha256 FROM hashes WHERE path=?",
                                   (_key(path),)).fetchone()
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns and row[2] == st.st_ino:
            return row[3]
        return None

    def put(self, path, st, h):
        self.new.append((_key(path), st.st_size, st.st_mtime_ns, st.st_ino, h))

    def prune(self, root, seen):
        """Forget files below root that are no longer in the tree."""
        seen = {_key(p) for p in seen}
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
