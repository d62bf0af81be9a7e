"""A job's work dir from its manifest: private, writable copies of the snapshot's blobs, never
hard links (a job that rewrites a file in place must not change the store or another job's
files: docs/design.md, "Snapshots"), and its symlinks. Every entry is checked (manifest.py);
nothing is ever written through a symlink. Standard library only, Python >= 3.8.
"""
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor

from .manifest import ManifestError, check_entry
from .packs import _O_CLOEXEC, _O_NOFOLLOW, BadBlobs, PackFiles, StoreError, copy_verified, write_all

_PARALLEL_MIN = 512       # work dirs with at least this many files are copied by threads


def materialize(store, entries, dest):
    """Build a job's work dir at dest from manifest entries: private, writable copies of
    blobs (0755 if exec else 0644) and symlinks. Every path is validated; nothing is ever
    written through a symlink. Every blob's bytes are checked against its hash as they are
    copied. Raises ManifestError (an entry that must not be written), BadBlobs (blobs the store
    lacks or holds damaged: every one of them) or StoreError (a copy that fails).

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
        parts, kind = check_entry(e)
        path = e["path"]
        if kind == "file":
            src = store.path(e["hash"])  # a loose blob's path
        else:
            target = e["target"]
        full = dest + "/" + path  # checked above: relative, no empty, "." or ".." parts
        parent = full[:len(full) - len(parts[-1]) - 1]
        if parent not in dirs:
            _make_parents(dest, parts, path, dirs, taken)
        if full in taken or full in dirs:
            raise ManifestError("bad manifest: %r appears twice (or is also a directory)" % (path,))
        taken.add(full)
        if kind == "symlink":
            try:
                os.symlink(target, full)
            except FileExistsError:
                raise ManifestError("bad manifest: %r appears twice (or is also a directory)" % (path,))
            except OSError as ex:
                raise StoreError("cannot create %r in the work dir: %s" % (path, ex))
        else:
            copies.append((src, full, 0o755 if e.get("exec") else 0o644, e.get("hash"), path,
                           e.get("size")))
    # files are created with their final mode; a chmod each only if the umask takes bits
    um = os.umask(0o022)
    os.umask(um)
    packed = store.lookup({c[3] for c in copies})
    # (src, dest, mode, hash, path, size, chmod, (pack, offset, size) or None), by pack
    # and offset: each thread reads the packs in order and keeps one open at a time
    copies = [c + (bool(c[2] & um), packed.get(c[3])) for c in copies]
    copies.sort(key=lambda c: c[7] or ("~", 0, 0))
    packs = PackFiles(store)
    bad = []  # blobs missing from the store or damaged in it: all of them, then BadBlobs
    try:
        if len(copies) >= _PARALLEL_MIN and (os.cpu_count() or 1) > 1:
            # the copies are system calls that release the GIL; after an error (a full disk)
            # the copies not begun are skipped, and the first error is raised
            failed = []

            def copy(c):
                if not failed:
                    try:
                        _copy_blob(c, packs, bad)
                    except BaseException:
                        failed.append(True)
                        raise

            with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as ex:
                futures = [ex.submit(copy, c) for c in copies]
            for f in futures:
                f.result()
        else:
            for c in copies:
                _copy_blob(c, packs, bad)
    finally:
        packs.close()
    if bad:
        raise BadBlobs(sorted(bad, key=lambda b: b[1]))

def _make_parents(dest, parts, path, dirs, taken):
    cur = dest
    for p in parts[:-1]:
        cur = cur + "/" + p
        if cur in dirs:
            continue
        if cur in taken:
            raise ManifestError("bad manifest: %r would go through the %s %r" % (
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
            raise ManifestError("bad manifest: %r would go through the symlink %r" % (
                path, os.path.relpath(cur, dest)))
        if not stat.S_ISDIR(st.st_mode):
            raise ManifestError("bad manifest: %r would go through the file %r" % (
                path, os.path.relpath(cur, dest)))
        dirs.add(cur)
    return cur

def _copy_blob(c, packs, bad):
    """Copy one blob into the work dir, checking its hash as it goes (from its pack, else its
    loose file); a blob missing or damaged in the store goes to `bad`."""
    src, full, mode, h, path, size, chmod, where = c
    if where is not None:
        data = packs.read(where)
        if data is None or hashlib.sha256(data).hexdigest() != h:
            bad.append((h, path, "missing" if data is None else "damaged", where))
            return
        dfd = _create_copy(full, mode, path)
        try:
            if chmod:
                os.fchmod(dfd, mode)
            write_all(dfd, data)
        except OSError as ex:
            raise StoreError("cannot create %r in the work dir: %s" % (path, ex))
        finally:
            os.close(dfd)
        return
    try:
        sfd = os.open(src, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        bad.append((h, path, "missing", None))
        return
    try:
        dfd = _create_copy(full, mode, path)
        try:
            if chmod:
                os.fchmod(dfd, mode)
            ok = copy_verified(sfd, dfd, h)
        except OSError as ex:
            raise StoreError("cannot create %r in the work dir: %s" % (path, ex))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    if not ok:
        bad.append((h, path, "damaged", None))


def _create_copy(full, mode, path):
    try:
        return os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, mode)
    except FileExistsError:
        raise ManifestError("bad manifest: %r appears twice (or is also a directory)" % (path,))
    except OSError as ex:
        raise StoreError("cannot create %r in the work dir: %s" % (path, ex))
