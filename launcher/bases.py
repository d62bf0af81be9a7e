"""The client's copy of the last manifest each host kept for a tree (docs/design.md "Manifest
bases"), so a submit sends only the entries that changed since (docs/contracts.md "Manifest
deltas"): the host keeps the manifests of recent submits under their tokens (agent/bases.py),
and this side keeps, per host and tree, a record of the one it sent last under the same name.

The record is one file per (host, tree) in the cache folder: a header line with the token, then
one record per entry, "\\0\\n" between them: the list it is in (0 code, 1 data), then its path,
kind and content, "\\0" between them (no path or symlink target holds a NUL). Comparing these
strings as sets is what makes a delta cheap to find (docs/design.md "Manifest bases").
"""
import hashlib
import os

from .hashcache import default_cache_path

_HEADER = "rtrain-base 1 "


def key(host, h, root):
    """Which record a submit of `root` to `host` (its hosts.yaml entry `h`) uses: another ssh
    target or home for the same name is another host."""
    ident = "\0".join(str(x) for x in (host, getattr(h, "ssh", ""), getattr(h, "home", ""),
                                         getattr(h, "scheduler", ""), os.path.abspath(root)))
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _path(k):
    return os.path.join(os.path.dirname(default_cache_path()), "bases", k + ".rec")


def _records(entries, tag):
    """The record of each entry, or None if one has more than the manifest's known fields
    (then no delta is made: the host would keep what the record cannot tell)."""
    out = []
    for e in entries:
        kind = e.get("type", "file")
        if kind == "file" and len(e) <= 5:
            out.append("%s%s\0f\0%s\0%d\0%d" % (tag, e["path"], e["hash"], e["size"], 1 if e.get("exec") else 0))
        elif kind == "symlink" and len(e) <= 3:
            out.append("%s%s\0l\0%s" % (tag, e["path"], e["target"]))
        else:
            return None
    return out


def load(k):
    """{"id": token, "records": set} of the record for key k, or None (none yet, unreadable)."""
    try:
        with open(_path(k), "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError:
        return None
    head, _, body = text.partition("\n")
    if not head.startswith(_HEADER) or not head[len(_HEADER):].isalnum():
        return None
    return {"id": head[len(_HEADER):], "records": set(body.split("\0\n")) if body else set()}


def manifest_request(copy, code, data, git):
    """(the request's "manifest", the new records or None). On the host's base as a delta
    where there is a copy and the delta is smaller than the whole; else whole."""
    recs = (_records(code, "0"), _records(data, "1"))
    whole = {"entries": code, "git": git}
    if data:
        whole["data"] = data
    if recs[0] is None or recs[1] is None:
        return whole, None
    if copy is None:
        return whole, recs
    old = copy["records"]
    delta = {}
    changed = 0
    for i, (part, entries, rs) in enumerate((("entries", code, recs[0]), ("data", data, recs[1]))):
        tag = str(i)
        now = set(rs)
        gone = [r[1:].split("\0", 1)[0] for r in old if r[0] == tag and r not in now]
        paths = {e["path"] for e in entries} if gone else ()
        drop = [p for p in gone if p not in paths]  # the others changed: they are set
        put = [e for e, r in zip(entries, rs) if r not in old]
        delta[part] = {"drop": drop, "set": put, "count": len(entries)}
        changed += len(drop) + len(put)
    if changed * 2 > len(code) + len(data):
        return whole, recs
    return {"base": copy["id"], "delta": delta, "git": git}, recs


def keep(k, token, recs):
    """Write the record of a manifest the host kept under `token` (its reply said so). A
    cache: a failure only means a whole manifest next time."""
    if recs is None or not token.isalnum():
        return
    path = _path(k)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        d = os.path.dirname(path)
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
        body = _HEADER + token + "\n" + "\0\n".join(recs[0] + recs[1])
        with open(tmp, "wb") as f:
            f.write(body.encode("utf-8", "surrogateescape"))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
