"""A project's data on the host: a read-only tree per data content, shared by the jobs whose
data is the same (docs/design.md "Data"). Built once per key (builds.py, kind "data") from the
store: a hard link to each loose blob (no copy: a job's start does not depend on the data's
size), a copy of the small blobs that live in packs; files 0444, folders 0555. A job's work dir
gets one symlink per data path into it (worklinks.py). The key hashes the data's entries, so
data edited after a submit makes a new tree for the next job and never changes the tree of a
job already queued. Standard library only, Python >= 3.8.
"""
import hashlib
import json
import os
import stat

from .manifest import check_entry
from .materialize import materialize


def key_of(entries):
    rows = sorted((e["path"], e.get("type", "file"), e.get("hash") or e.get("target"),
                   bool(e.get("exec"))) for e in entries)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:32]


def build(store, entries):
    """builds.py's build function for the data tree of `entries`."""

    def run(dest, log_fd):
        os.mkdir(dest, 0o700)
        packed = store.lookup({e["hash"] for e in entries if e.get("type", "file") == "file"})
        rest = []
        linked = 0
        made = {dest}
        for e in entries:
            parts, kind = check_entry(e)
            src = store.path(e["hash"]) if kind == "file" else None
            if kind != "file" or e.get("exec") or not os.path.isfile(src):
                if kind == "file" and e["hash"] not in packed and not os.path.isfile(src):
                    raise OSError("blob %s of %s is not in the store" % (e["hash"], e["path"]))
                rest.append(e)
                continue
            parent = os.path.join(dest, *parts[:-1])
            if parent not in made:
                os.makedirs(parent, 0o700, exist_ok=True)
                made.add(parent)
            os.link(src, os.path.join(dest, *parts))
            linked += 1
        if rest:
            materialize(store, rest, dest)
        _read_only(dest)
        os.write(log_fd, ("rtrain: data tree of %d file(s): %d linked from the store, %d copied\n" % (
            len(entries), linked, len(rest))).encode())
        return {"files": len(entries)}

    return run


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
