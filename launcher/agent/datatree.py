"""A project's data on the host: a read-only tree per data content, shared by the jobs whose
data is the same (docs/design.md "Data"). Built once per key (builds.py, kind "data") from the
store as private COPIES (copy_file_range: a reflink where the file system has them), never hard
links to the store: a job that chmods and rewrites a data file must not change the store. The
copy is made once per content, so a job's start does not depend on the data's size: the second
job with the same data starts at once. Files 0444, folders 0555. A job's work dir gets one
symlink per data path into it (worklinks.py). The key hashes the data's entries, so data edited
after a submit makes a new tree for the next job and never changes the tree of a job already
queued. The tree's fingerprint (every file's size, mtime, mode and inode) is kept with it, and
checked before each job that uses it (`intact`): a tree a job changed anyway is built again.
Standard library only, Python >= 3.8.
"""
import hashlib
import json
import os
import stat

from .materialize import materialize


def key_of(entries):
    rows = sorted((e["path"], e.get("type", "file"), e.get("hash") or e.get("target"),
                   bool(e.get("exec"))) for e in entries)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]


def build(store, entries):
    """builds.py's build function for the data tree of `entries`."""

    def run(dest, log_fd):
        os.mkdir(dest, 0o700)
        materialize(store, entries, dest)
        _read_only(dest)
        os.write(log_fd, ("rtrain: data tree of %d file(s), copied once for every job with this data\n" % (
            len(entries),)).encode())
        return {"files": len(entries), "fingerprint": fingerprint(dest)}

    return run


def fingerprint(root):
    """A hash of every entry's path, size, mtime, mode and inode: what a job that rewrote or
    chmodded a data file (it owns them) changes."""
    h = hashlib.sha256()
    for d, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(d, name)
            st = os.lstat(full)
            h.update(("%s\0%d\0%d\0%o\0%d\n" % (os.path.relpath(full, root), st.st_size, st.st_mtime_ns,
                                                  st.st_mode, st.st_ino)).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def intact(root, ready):
    """True if the tree at root is as it was built (its .ready record's fingerprint)."""
    want = (ready or {}).get("fingerprint")
    if not want:
        return True  # built by an agent that kept none
    try:
        return fingerprint(root) == want
    except OSError:
        return False


def _read_only(root):
    """Files 0444 (0555 if executable), folders 0555, deepest first."""
    for d, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            full = os.path.join(d, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                mode = 0o555 if st.st_mode & 0o100 else 0o444
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(full, mode)
        os.chmod(d, 0o555)
