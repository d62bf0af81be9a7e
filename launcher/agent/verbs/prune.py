"""`prune`: free space (docs/design.md "Housekeeping"). Removes the work dirs of jobs that ended
more than `older_than_s` ago (all but the `keep` newest ended jobs; their log and exit record
stay, so `status` and `logs` still answer), the environments and data trees no remaining job
uses and none used within `older_than_s`, and the blobs of the store no remaining job's
snapshot names (Store.gc, under the store's gc lock: gclock.py). Nothing a queued or running job
needs is ever removed: their work dirs, their snapshots' blobs, their data trees and
environments (planned here for queued jobs the daemon has not planned yet), and any build that
is running. Outputs (projects/) are the user's: never removed."""
import os
import shutil
import time

from .. import builds, envbuild, fsutil, gclock, jobproject, runtime, store
from ..protocol import AgentError

ACTIVE = ("queued", "running")


def prune(ctx):
    req = ctx.req
    try:
        older = float(req.get("older_than_s", 14 * 86400))
        keep = int(req.get("keep") or 0)
    except (TypeError, ValueError):
        raise AgentError("bad_request", "older_than_s must be seconds and keep a number")
    dry = bool(req.get("dry_run"))
    home, con = ctx.home, ctx.con
    now = time.time()
    rows = con.execute("SELECT id, state, ended_at FROM jobs ORDER BY id DESC").fetchall()
    ended = [r for r in rows if r["state"] not in ACTIVE]
    ended.sort(key=lambda r: -(r["ended_at"] or 0))
    newest = {r["id"] for r in ended[:keep]}
    gone, freed = [], 0
    for r in ended:
        if r["id"] in newest or (r["ended_at"] or now) > now - older:
            continue
        size = _work_size(home, r["id"])
        if size is None:
            continue  # pruned before
        gone.append(r["id"])
        freed += size
        if not dry:
            _remove_work(home, r["id"])
    kept = [r for r in rows if r["id"] not in gone and (r["state"] in ACTIVE or
                                                         os.path.isdir(home.job(r["id"]).work))]
    envs, data = _used_builds(home, kept, [r for r in rows if r["state"] == "queued"])
    b = builds.Builds(home.root)
    removed = {"env": [], "data": []}
    for kind, used in (("env", envs), ("data", data)):
        for key in sorted(b.keys(kind)):
            marker = b.path(kind, key) + ".ready"
            if key in used or _recent(marker, now - older) or b.building(kind, key):
                continue
            if not os.path.exists(marker) and _recent(b.path(kind, key) + ".log", now - older):
                continue  # a build that failed (or runs) lately: its record stays a while
            if dry:
                removed[kind].append([key, builds.tree_size(b.path(kind, key))])
                continue
            size = b.remove(kind, key)
            if size is not None:
                removed[kind].append([key, size])
    blobs = _gc_blobs(home, kept, dry)
    return {"jobs": gone, "work_bytes": freed, "envs": removed["env"], "data": removed["data"],
            "blobs": blobs, "dry_run": dry}


def _work_size(home, job_id):
    d = home.job(job_id).dir
    try:
        names = [n for n in os.listdir(d) if n == "work" or n.startswith("work.")]
    except OSError:
        return None
    if not names:
        return None
    return sum(builds.tree_size(os.path.join(d, n)) for n in names)


def _remove_work(home, job_id):
    d = home.job(job_id).dir
    for n in os.listdir(d):
        full = os.path.join(d, n)
        if n == "work" or n.startswith("work."):
            shutil.rmtree(full, ignore_errors=True)
        elif n in ("runtime.json", "login-env.sh"):
            os.unlink(full)
        elif n == "bin":
            shutil.rmtree(full, ignore_errors=True)


def _recent(path, since):
    try:
        return os.stat(path).st_mtime > since
    except OSError:
        return False


def _used_builds(home, kept, queued):
    """({env keys}, {data keys}) the kept jobs use; a queued job's environment is planned here
    when the daemon has not done it yet."""
    envs, data = set(), set()
    env_root = os.path.join(home.root, "builds", "env") + "/"
    for r in kept:
        rec = jobproject.read(home, r["id"])
        if rec.get("data_key"):
            data.add(rec["data_key"])
        act = (runtime.read(home, r["id"]).get("activate") or {}).get("path") or ""
        if act.startswith(env_root):
            envs.add(act[len(env_root):].split("/")[0])
    for r in queued:
        rec = jobproject.read(home, r["id"])
        if not (rec.get("env") or {}).get("setup") and not (rec.get("env") or {}).get("conda"):
            continue
        job_vars = fsutil.read_json(home.job(r["id"]).env) or {}
        try:
            env = runtime.environment(os.environ, list(job_vars.items()))
            plan = envbuild.plan(rec.get("env"), env, rec.get("shell"))
        except envbuild.EnvError:
            continue
        if plan["build"]:
            envs.add(plan["build"]["key"])
    return envs, data


def _gc_blobs(home, kept, dry):
    keep = set()
    for r in kept:
        m = fsutil.read_json(home.job(r["id"]).manifest) or {}
        for e in (m.get("entries") or []) + (m.get("data") or []):
            if e.get("type", "file") == "file" and e.get("hash"):
                keep.add(e["hash"])
    st = store.Store(home.store)
    if dry:
        return st.gc(keep, dry_run=True)
    fd = gclock.exclusive(home)
    if fd is None:
        return {"count": 0, "bytes": 0, "skipped": "a submit held the store for 30 s"}
    try:
        # a submit that committed while we listed the jobs: its blobs are named now
        for (job_id,) in _jobs_after(home, kept):
            m = fsutil.read_json(home.job(job_id).manifest) or {}
            keep.update(e["hash"] for e in (m.get("entries") or []) + (m.get("data") or [])
                        if e.get("type", "file") == "file" and e.get("hash"))
        return st.gc(keep)
    finally:
        os.close(fd)


def _jobs_after(home, kept):
    """Job ids of folders under jobs/ newer than the newest kept job (committed meanwhile)."""
    top = max([r["id"] for r in kept] or [0])
    try:
        names = os.listdir(home.jobs)
    except OSError:
        return []
    return [(int(n),) for n in names if n.isdigit() and int(n) > top]
