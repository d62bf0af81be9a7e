"""Manifests the host keeps so that the next submit of the same tree sends only what changed
(docs/design.md "Manifest bases", docs/contracts.md "Manifest deltas").

A submit whose manifest was accepted and whose job was queued leaves that manifest in
store/bases/TOKEN.json (a hard link to the job's manifest.json, so it costs no copy), TOKEN
being the submit's token. The client keeps its own copy of what it sent under the same name;
the next submit names it as its base and sends the entries that differ. Every blob a base
names is in the store: the store drops every base before it deletes a blob (Store.gc, forget),
so a submit on a base asks only for the blobs of the entries that changed.

Standard library only.
"""
import json
import os
import re

KEEP = 16  # bases kept per home (the newest): one per tree and client that submits here
_NAME = re.compile(r"\A[0-9a-f]{8,64}\Z")


class DeltaError(ValueError):
    """A delta that is not well formed (a bug or a hostile client: refused, not retried)."""


def directory(store_root):
    return os.path.join(store_root, "bases")


def _path(store_root, base_id):
    if not isinstance(base_id, str) or not _NAME.match(base_id):
        return None
    return os.path.join(directory(store_root), base_id + ".json")


def load(store_root, base_id):
    """{"entries": [...], "data": [...]} of a base, or None where there is none (never made,
    trimmed, dropped by a prune) or it cannot be read."""
    path = _path(store_root, base_id)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("entries"), list) \
            or not isinstance(body.get("data") or [], list):
        return None
    return {"entries": body["entries"], "data": body.get("data") or []}


def apply(base, delta):
    """What the base and the delta make: {"lists": [(by_path, sorted paths)] for the code and
    the data, "changed": [(index of its list, entry)] set by the delta}, for
    manifest.check_changes; None where they do not fit together (a path to drop that the base
    lacks, a count that differs: the client's copy and the host's disagree, and the client
    sends its whole manifest instead). Raises DeltaError for a delta that is not well formed."""
    if not isinstance(delta, dict):
        raise DeltaError("the manifest's delta must be a mapping")
    lists, changed = [], []
    for i, part in enumerate(("entries", "data")):
        d = delta.get(part)
        if d is None:  # that list as the base has it
            d = {"drop": [], "set": [], "count": len(base[part])}
        if not isinstance(d, dict):
            raise DeltaError("the delta's %s must be a mapping" % part)
        drop, put, count = d.get("drop") or [], d.get("set") or [], d.get("count")
        if not isinstance(drop, list) or not isinstance(put, list) or isinstance(count, bool) \
                or not isinstance(count, int):
            raise DeltaError("the delta's %s needs lists `drop`, `set` and a `count`" % part)
        cur = {}
        for e in base[part]:
            if not isinstance(e, dict) or not isinstance(e.get("path"), str):
                return None  # not a manifest of ours: ask for the whole one
            cur[e["path"]] = e
        for p in drop:
            if not isinstance(p, str):
                raise DeltaError("bad path to drop in the delta: %r" % (p,))
            if cur.pop(p, None) is None:
                return None
        seen = set()
        for e in put:
            if not isinstance(e, dict) or not isinstance(e.get("path"), str):
                raise DeltaError("bad entry in the delta: %r" % (e,))
            if e["path"] in seen:
                raise DeltaError("bad delta: %r is set twice" % (e["path"],))
            seen.add(e["path"])
            cur[e["path"]] = e
            changed.append((i, e))
        if len(cur) != count:
            return None
        lists.append((cur, sorted(cur)))
    return {"lists": lists, "changed": changed}


def entries(made, i):
    """The list i (0: code, 1: data) of apply's result, sorted by path."""
    by_path, paths = made["lists"][i]
    return [by_path[p] for p in paths]


def save(store_root, base_id, manifest_path):
    """Keep a queued job's manifest as the base base_id (a hard link), and only the KEEP newest
    bases. Best effort: without a base the next submit sends its whole manifest."""
    path = _path(store_root, base_id)
    if path is None:
        return False
    d = directory(store_root)
    try:
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.link(manifest_path, path)
    except OSError:
        return False
    trim(store_root)
    return True


def trim(store_root, keep=KEEP):
    d = directory(store_root)
    try:
        names = [n for n in os.listdir(d) if n.endswith(".json")]
    except OSError:
        return
    if len(names) <= keep:
        return
    aged = []
    for n in names:
        try:
            aged.append((os.lstat(os.path.join(d, n)).st_mtime, n))
        except OSError:
            pass
    aged.sort(reverse=True)
    for _, n in aged[keep:]:
        try:
            os.unlink(os.path.join(d, n))
        except OSError:
            pass


def clear(store_root):
    """Drop every base: called before any blob is deleted, so no base names a blob the store
    lacks."""
    d = directory(store_root)
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        try:
            os.unlink(os.path.join(d, n))
        except OSError:
            pass
