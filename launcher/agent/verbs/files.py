"""`outputs` (which files a job wrote) and `read` (one of them, streamed): what `rtrain pull`
fetches."""
import base64
import os

from .. import fsutil
from ..protocol import AgentError


def outputs(ctx):
    """Files under a job's work dir: those named in `paths` (files or folders), or by default
    every file the job wrote (not in its snapshot, or changed since)."""
    row = ctx.job_row(ctx.req.get("id"))
    work = os.path.realpath(ctx.home.job(row["id"]).work)
    if not os.path.isdir(work):
        raise AgentError("no_work_dir", "job %d has no files yet: it has not started (%s)" % (
            row["id"], row["state"]), "`rtrain status %d` says why it waits" % row["id"])
    wanted = ctx.req.get("paths") or []
    snap = {}
    if not wanted:
        manifest = fsutil.read_json(ctx.home.job(row["id"]).manifest) or {}
        for e in manifest.get("entries", []):
            snap[e["path"]] = e
    roots = [_inside(work, p) for p in wanted] or [work]
    files = []
    for top in roots:
        if not os.path.lexists(top):
            raise AgentError("no_such_file", "job %d has no %s" % (row["id"], os.path.relpath(top, work)),
                             "`rtrain pull %d` without paths fetches everything it wrote" % row["id"])
        for full in _files_under(top):
            st = os.lstat(full)
            rel = os.path.relpath(full, work)
            old = snap.get(rel)
            if old is not None and old.get("size") == st.st_size and \
                    st.st_mtime <= (row["started_at"] or 0):
                continue
            files.append({"path": rel, "size": st.st_size, "mtime": st.st_mtime,
                          "exec": bool(st.st_mode & 0o111)})
    files.sort(key=lambda f: f["path"])
    return {"files": files, "work_dir": work}


def _files_under(top):
    if not os.path.isdir(top) or os.path.islink(top):
        if os.path.isfile(top) and not os.path.islink(top):
            yield top
        return
    for d, _dirs, names in os.walk(top):
        for name in names:
            full = os.path.join(d, name)
            if os.path.isfile(full) and not os.path.islink(full):
                yield full


def _inside(work, rel):
    if os.path.isabs(rel) or not rel:
        raise AgentError("bad_path", "%r: give a path relative to the job's work dir" % rel)
    full = os.path.realpath(os.path.join(work, rel))
    if full != work and not full.startswith(work + os.sep):
        raise AgentError("bad_path", "%r is outside the job's work dir" % rel)
    return full


def read(ctx):
    """Stream one file of a job's work dir from byte `offset`: frames {"o", "d"}, then its size."""
    row = ctx.job_row(ctx.req.get("id"))
    work = os.path.realpath(ctx.home.job(row["id"]).work)
    path = _inside(work, ctx.req.get("path") or "")
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
