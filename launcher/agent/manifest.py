"""What a snapshot's manifest may hold (docs/contracts.md "Manifest"), checked the same way on
both sides: the client (launcher/sync.py) builds no entry the agent would refuse, and the agent
(submit, and store.materialize when it builds a work dir) refuses any it is sent that breaks
these rules, whoever made it.

Standard library only, Python >= 3.8: the client imports this module from the agent package.
"""
import re

_HEX = re.compile(r"\A[0-9a-f]{64}\Z")


class ManifestError(ValueError):
    """A manifest entry that must not be written into a work dir."""


def check_hash(h):
    if not isinstance(h, str) or not _HEX.match(h):
        raise ManifestError("not a sha256 hex digest: %r" % (h,))
    return h


def check_path(path):
    """Validate a manifest path; return its components. Raises ManifestError."""
    if not isinstance(path, str) or not path:
        raise ManifestError("bad path in manifest: %r (empty or not a string)" % (path,))
    if "\0" in path:
        raise ManifestError("bad path in manifest: %r (contains NUL)" % (path,))
    if path.startswith("/"):
        raise ManifestError("bad path in manifest: %r (absolute)" % (path,))
    parts = path.split("/")
    for p in parts:
        if p == "":
            raise ManifestError("bad path in manifest: %r (empty component)" % (path,))
        if p in (".", ".."):
            raise ManifestError("bad path in manifest: %r (contains a %r component)" % (path, p))
    return parts


def target_inside(path, target):
    """True if the symlink at `path` (relative to the tree's root) pointing to `target` stays
    inside the tree, read lexically: relative, and never climbing above the root."""
    if not isinstance(target, str) or not target or "\0" in target or target.startswith("/"):
        return False
    depth = len(path.split("/")) - 1  # directories above the link, inside the tree
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


def check_target(path, target):
    if not isinstance(target, str) or not target:
        raise ManifestError("bad symlink %r in manifest: empty target" % (path,))
    if "\0" in target:
        raise ManifestError("bad symlink %r in manifest: target contains NUL" % (path,))
    if target.startswith("/"):
        raise ManifestError("bad symlink %r -> %r: absolute target" % (path, target))
    if not target_inside(path, target):
        raise ManifestError("bad symlink %r -> %r: points outside the tree" % (path, target))


def check_entry(e):
    """Validate one entry; return (its path components, its type)."""
    if not isinstance(e, dict):
        raise ManifestError("bad manifest entry: %r" % (e,))
    path = e.get("path")
    parts = check_path(path)
    kind = e.get("type", "file")
    if kind == "file":
        check_hash(e.get("hash"))
    elif kind == "symlink":
        check_target(path, e.get("target"))
    else:
        raise ManifestError("bad manifest entry %r: unknown type %r" % (path, kind))
    return parts, kind


LINK_HOPS = 40  # the kernel follows at most 40 symlinks in one path lookup (MAXSYMLINKS)


def resolve_link(path, links):
    """Where the symlink at `path` lands, following the tree's own symlinks (`links`: path ->
    target) the way the kernel would (a ".." after a symlink climbs from where the link
    points, not from where it is): its components ([] is the root), or None if it leaves the
    tree, is absolute somewhere on the way, or takes more than LINK_HOPS links (a loop)."""
    stack = path.split("/")[:-1]
    todo = links[path].split("/")
    hops = 1
    while todo:
        p = todo.pop(0)
        if p in ("", "."):
            continue
        if p == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(p)
        target = links.get("/".join(stack))
        if target is not None:
            hops += 1
            if hops > LINK_HOPS or target.startswith("/"):
                return None
            stack.pop()
            todo = target.split("/") + todo
    return stack


def escaping_links(entries):
    """The paths of the symlinks among entries that, through other symlinks of the tree, lead
    outside it (or loop), though each is lexically inside (check_target)."""
    links = {e["path"]: e["target"] for e in entries
             if isinstance(e, dict) and e.get("type") == "symlink" and isinstance(e.get("target"), str)}
    return [p for p in sorted(links) if resolve_link(p, links) is None]


def check_entries(entries):
    """Validate manifest entries without touching the disk (what materialize would refuse):
    paths, hashes, symlink targets, a path given twice or used both as a file and a folder.
    Returns the total size of the files. Raises ManifestError."""
    seen = set()
    parents = set()
    total = 0
    for e in entries:
        parts, kind = check_entry(e)
        path = e["path"]
        if kind == "file":
            size = e.get("size")
            total += size if isinstance(size, int) and size > 0 else 0
        if path in seen or path in parents:
            raise ManifestError("bad manifest: %r appears twice (or is also a directory)" % (path,))
        seen.add(path)
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise ManifestError("bad manifest: %r would go through the file or symlink %r" % (
                    path, parent))
            parents.add(parent)
    bad = escaping_links(entries)
    if bad:
        raise ManifestError("bad symlink %r: through other symlinks of the tree it leads outside "
                            "it (or loops)" % (bad[0],))
    return total


def check_changes(lists, changed):
    """Validate a manifest made of one that passed check_entries (a base, agent/bases.py) and
    the entries `changed` set on it, looking at those only (and the symlinks): the rules of
    check_entries. lists: the result's lists (code, data), each a {path: entry} with its paths
    sorted (a tuple (by_path, sorted_paths)); changed: [(index of its list, entry)]. Returns
    the total size of the files of the first list. Raises ManifestError."""
    import bisect
    for i, e in changed:
        parts, _kind = check_entry(e)
        path = e["path"]
        for k, (by_path, paths) in enumerate(lists):
            if k != i and path in by_path:
                raise ManifestError("bad manifest: %r appears twice (or is also a directory)" % (path,))
            for n in range(1, len(parts)):
                parent = "/".join(parts[:n])
                if parent in by_path:
                    raise ManifestError("bad manifest: %r would go through the file or symlink %r" % (
                        path, parent))
            under = path + "/"
            j = bisect.bisect_left(paths, under)
            if j < len(paths) and paths[j].startswith(under):
                raise ManifestError("bad manifest: %r appears twice (or is also a directory)" % (path,))
    links = [e for by_path, _ in lists for e in by_path.values() if e.get("type") == "symlink"]
    bad = escaping_links(links)
    if bad:
        raise ManifestError("bad symlink %r: through other symlinks of the tree it leads outside "
                            "it (or loops)" % (bad[0],))
    total = 0
    for e in lists[0][0].values():
        size = e.get("size")
        if e.get("type", "file") == "file" and isinstance(size, int) and size > 0:
            total += size
    return total
