"""`outputs` (which files a job wrote) and `read` (one of them, streamed): what `rtrain pull`
fetches."""
import base64
import os

from .. import fsutil, jobproject
from ..protocol import AgentError


def outputs(ctx):
    """Files under a job's work dir: those named in `paths` (files or folders), or by default
    every file the job wrote (not in its snapshot, or changed since), its outputs (rtrain.yaml
    `outputs:`, kept per project: docs/design.md "Outputs") included. __pycache__ folders are
    left out unless `pycache` is true or a path names one."""
    row = ctx.job_row(ctx.req.get("id"))
    work = os.path.realpath(ctx.home.job(row["id"]).work)
    if not os.path.isdir(work):
        raise AgentError("no_work_dir", "job %d has no files yet: it has not started (%s)" % (
            row["id"], row["state"]), "`rtrain status %d` says why it waits" % row["id"])
    links = _output_links(ctx.home, row["id"])
    wanted = ctx.req.get("paths") or []
    pycache = bool(ctx.req.get("pycache"))
    snap = {}
    if not wanted:
        manifest = fsutil.read_json(ctx.home.job(row["id"]).manifest) or {}
        for e in manifest.get("entries", []):
            snap[e["path"]] = e
    roots = [_resolve(work, links, p) for p in wanted] or \
        [(work, "")] + [(t, rel) for rel, t in links if os.path.isdir(t)]
    files = []
    for top, rel_top in roots:
        if not os.path.lexists(top):
            raise AgentError("no_such_file", "job %d has no %s" % (row["id"], rel_top),
                             "`rtrain pull %d` without paths fetches everything it wrote" % row["id"])
        for full in _files_under(top, pycache or "__pycache__" in rel_top.split("/")):
            st = os.lstat(full)
            rel = os.path.relpath(full, top)
            rel = rel_top if rel == "." else (rel_top + "/" + rel if rel_top else rel)
            old = snap.get(rel)
            if old is not None and _unchanged(full, st, old, row["started_at"] or 0):
                continue
            files.append({"path": rel, "size": st.st_size, "mtime": st.st_mtime,
                          "exec": bool(st.st_mode & 0o111)})
    files.sort(key=lambda f: f["path"])
    return {"files": files, "work_dir": work}


def _unchanged(full, st, entry, started):
    """A file of the snapshot that the job left as it was. Not its mtime, which a job can set
    back (a copy keeping times, an unpacked archive): its ctime, which nothing but the kernel
    sets, older than the job (the work dir is built before it starts); or else its bytes,
    which must still hash to the snapshot's."""
    if entry.get("size") != st.st_size:
        return False
    if st.st_ctime < started - 2:
        return True
    import hashlib
    h = hashlib.sha256()
    try:
        with open(full, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == entry.get("hash")


def _output_links(home, job_id):
    """[(path in the work dir, real folder)] of the job's outputs."""
    rec = jobproject.read(home, job_id)
    return [(rel, os.path.realpath(jobproject.outputs_dir(home, rec["name"], rel)))
            for rel in rec.get("outputs") or []]


def _files_under(top, pycache=False):
    if not os.path.isdir(top) or os.path.islink(top):
        if os.path.isfile(top) and not os.path.islink(top):
            yield top
        return
    for d, dirs, names in os.walk(top):
        if not pycache:
            dirs[:] = [x for x in dirs if x != "__pycache__"]
        for name in names:
            full = os.path.join(d, name)
            if os.path.isfile(full) and not os.path.islink(full):
                yield full


def _resolve(work, links, rel):
    """(the real path of `rel`, rel): inside the work dir, or inside one of its outputs."""
    if not isinstance(rel, str) or os.path.isabs(rel) or not rel:
        raise AgentError("bad_path", "%r: give a path relative to the job's work dir" % (rel,))
    rel = os.path.normpath(rel).replace(os.sep, "/")
    for link, target in links:
        if rel == link or rel.startswith(link + "/"):
            return _inside(target, rel[len(link) + 1:] or ".", rel), rel
    return _inside(work, rel, rel), rel


def _inside(base, sub, rel):
    full = os.path.realpath(os.path.join(base, sub))
    if full != base and not full.startswith(base + os.sep):
        raise AgentError("bad_path", "%r is outside the job's work dir" % rel)
    return full


def read(ctx):
    """Stream one file of a job's work dir from byte `offset`: frames {"o", "d"}, then its size."""
    row = ctx.job_row(ctx.req.get("id"))
    work = os.path.realpath(ctx.home.job(row["id"]).work)
    path, _ = _resolve(work, _output_links(ctx.home, row["id"]), ctx.req.get("path") or "")
    offset = int(ctx.req.get("offset") or 0)
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            data = f.read(256 * 1024)
            if not data:
                break
            ctx.emit({"o": offset, "d": base64.b64encode(data).decode("ascii")})
            offset += len(data)
    return {"size": offset}
