"""`usage`: GPU-hours of this user's jobs on this host, per project, from the job records
(docs/contracts.md "Usage"). A job's GPU-hours: the GPUs it holds (a share of a GPU counts its
fraction, 1/k) times the hours it held them inside the window (until now for a running one)."""
import json
import time

from .hello import user_name


def usage(ctx):
    """{"user", "since", "now", "projects": [{"project", "jobs", "running", "gpu_hours"}]}."""
    con = ctx.con
    ctx.backend.refresh()  # (rtrain's daemon: exit records; Slurm: one squeue)
    now = time.time()
    since = ctx.req.get("since")
    since = float(since) if since is not None else 0.0
    out = {}
    for r in con.execute("SELECT state, gpus, share, project, started_at, ended_at FROM jobs "
                         "WHERE started_at IS NOT NULL AND (ended_at IS NULL OR ended_at >= ?)", (since,)):
        start = max(r["started_at"], since)
        end = r["ended_at"] if r["ended_at"] is not None else (now if r["state"] == "running" else start)
        hours = len(json.loads(r["gpus"] or "[]")) / float(r["share"] or 1) * max(0.0, end - start) / 3600.0
        p = out.setdefault(r["project"] or "-", {"project": r["project"] or "-", "jobs": 0, "running": 0,
                                                 "gpu_hours": 0.0})
        p["jobs"] += 1
        p["running"] += r["state"] == "running"
        p["gpu_hours"] += hours
    return {"user": user_name(), "since": since, "now": now,
            "projects": sorted(out.values(), key=lambda p: -p["gpu_hours"])}
