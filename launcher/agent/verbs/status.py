"""`status` (list or look up jobs) and `cancel`."""
import time

from .. import db, groups, jobprocs, jobstate, monitor, runner
from .context import TERMINAL


def status(ctx):
    """Jobs newest first. Filters: ids, states, since (finished before it are hidden, counted),
    limit (at most this many finished jobs; active ones always come). "group": N lists that
    group's jobs; "fold_groups": jobs of groups are left out and each group is one summary in
    "groups" (groups.py)."""
    req = ctx.req
    con = ctx.con
    ctx.backend.refresh()
    ids = req.get("ids")
    hidden = 0
    folded = None
    if req.get("group") is not None:
        g = groups.row(con, req["group"])
        jobs = [db.to_public(r) for r in groups.member_rows(con, g["id"])][::-1]
        folded = groups.summaries(con, ids=[g["id"]])
    elif ids:
        jobs = [_with_leftovers(ctx, ctx.public(ctx.job_row(i))) for i in ids]
    else:
        where, args = [], []
        if req.get("fold_groups"):
            where.append("grp IS NULL")
            folded = groups.summaries(con, req.get("since"), req.get("states"))
        if req.get("states"):
            where.append("state IN (%s)" % ",".join("?" * len(req["states"])))
            args += list(req["states"])
        base = " AND ".join(where) if where else "1"
        finished = "state NOT IN ('queued','running')"
        shown = "(%s)" % base
        if req.get("since") is not None:
            shown += " AND (NOT %s OR COALESCE(ended_at, submitted_at) >= %r)" % (finished, float(req["since"]))
        sql = "SELECT * FROM jobs WHERE %s AND NOT %s ORDER BY id DESC" % (shown, finished)
        rows = con.execute(sql, args).fetchall()
        fin_sql = "SELECT * FROM jobs WHERE %s AND %s ORDER BY id DESC" % (shown, finished)
        if req.get("limit"):
            fin_sql += " LIMIT %d" % int(req["limit"])
        rows += con.execute(fin_sql, args).fetchall()
        rows.sort(key=lambda r: -r["id"])
        total = con.execute("SELECT COUNT(*) FROM jobs WHERE %s" % base, args).fetchone()[0]
        hidden = total - len(rows)
        jobs = [db.to_public(r) for r in rows]
    # a daemon that died (or the host rebooted) is started again (folded groups count too)
    ctx.backend.revive(jobs + [{"state": s} for g in folded or () for s in g["counts"]])
    monitor.ensure(ctx.home, con, ctx.agent_argv)  # likewise the monitor, if anything needs it
    out = {"jobs": jobs, "hidden": hidden, "now": time.time()}
    if folded is not None:
        out["groups"] = folded
    return out


def cancel(ctx):
    if ctx.req.get("group") is not None:
        return groups.cancel(ctx, ctx.req["group"])  # every queued and running job of it
    row = ctx.job_row(ctx.req.get("id"))
    job_id = row["id"]
    con = ctx.con
    if row["state"] == "queued":
        with db.Tx(con):
            con.execute("UPDATE jobs SET state='cancelled', ended_at=? WHERE id=? AND state='queued'",
                        (time.time(), job_id))
        row = db.get(con, job_id)
        if row["state"] == "cancelled":
            jobstate.ended(con, ctx.home, job_id)
            return {"job": ctx.public(row), "was": "queued"}
    if row["state"] != "running":
        # an ended job may have left processes running (setsid...) that hold its GPUs: end them
        left = jobstate.end_leftovers(ctx.home, job_id) if row["state"] in TERMINAL else ()
        return {"job": ctx.public(row), "was": row["state"], "ended_leftovers": len(left)}
    jobstate.request_cancel(ctx.home, row)
    deadline = time.time() + float(ctx.req.get("wait", 3.0))
    while time.time() < deadline:
        if runner.read_exit(ctx.home, job_id) is not None:
            break
        time.sleep(0.02)
    jobstate.finalize_exited(con, ctx.home)
    return {"job": ctx.public(db.get(con, job_id)), "was": "running"}


def _with_leftovers(ctx, job):
    """A job that ended but left processes running (they keep its GPUs): say which."""
    if job["state"] in TERMINAL:
        left = jobstate.end_leftovers(ctx.home, job["id"], only_look=True)
        if left:
            job["leftovers"] = jobprocs.describe(left)
    return job
