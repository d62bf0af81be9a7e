"""Groups of jobs: the points of a sweep, the tasks of an array (docs/design.md "Many runs").

A group is one row of `job_groups` (db.py, schema 2), made by the submit that queued its jobs
(all in one transaction); each job names it (`grp`). `max_running` (`--array 0-9%3`) is how many
of its jobs may run at once (the scheduler holds the others: gates.py). Here: the summaries
`status` shows (one line per group, its jobs counted per state), and a group's jobs for
`status g7` and `cancel g7` (`logs g7 --tail N` is verbs/logs.py's). Standard library only, Python >= 3.8.
"""
import time

from . import db
from .protocol import AgentError

ACTIVE = ("queued", "running")


def create(con, name, kind, label, size, max_running=None, now=None):
    cur = con.execute("INSERT INTO job_groups (name, kind, label, size, max_running, submitted_at) "
                      "VALUES (?,?,?,?,?,?)", (name, kind, label, size, max_running, now or time.time()))
    return cur.lastrowid


def row(con, gid):
    try:
        gid = int(str(gid).lstrip("g"))
    except ValueError:
        raise AgentError("no_such_job", "no group %r: group ids look like g7" % (gid,))
    r = con.execute("SELECT * FROM job_groups WHERE id=?", (gid,)).fetchone()
    if r is None:
        raise AgentError("no_such_job", "no group g%d on this host" % gid, "`rtrain status` lists your groups")
    return r


def summaries(con, since=None, states=None, ids=None):
    """One dict per group, newest first: {"group", "name", "kind", "label", "size",
    "max_running", "submitted_at", "counts": {state: n}, "started_at", "ended_at",
    "gpus_requested", "share"}. Without ids: groups with an active job, or whose last job ended
    after `since`; with states: only groups with a job in those states."""
    where, args = "", []
    if ids is not None:
        where = "WHERE g.id IN (%s)" % ",".join("?" * len(ids))
        args = list(ids)
    out = {}
    for r in con.execute(
            "SELECT g.id, g.name, g.kind, g.label, g.size, g.max_running, g.submitted_at, j.state,"
            " COUNT(*), MIN(j.started_at), MAX(j.ended_at), MAX(j.gpus_requested), MAX(j.share)"
            " FROM job_groups g JOIN jobs j ON j.grp = g.id %s GROUP BY g.id, j.state" % where, args):
        g = out.setdefault(r[0], {"group": r[0], "name": r[1], "kind": r[2], "label": r[3],
                                  "size": r[4], "max_running": r[5], "submitted_at": r[6],
                                  "counts": {}, "started_at": None, "ended_at": None,
                                  "gpus_requested": r[11], "share": r[12]})
        g["counts"][r[7]] = r[8]
        if r[9] is not None:
            g["started_at"] = r[9] if g["started_at"] is None else min(g["started_at"], r[9])
        if r[7] not in ACTIVE and r[10] is not None:
            g["ended_at"] = max(g["ended_at"] or 0, r[10])
    groups = sorted(out.values(), key=lambda g: -g["group"])
    if ids is None:
        groups = [g for g in groups if _shown(g, since, states)]
    for g in groups:
        if any(g["counts"].get(s) for s in ACTIVE):
            g["ended_at"] = None
    return groups


def _shown(g, since, states):
    if states:
        return any(g["counts"].get(s) for s in states)
    if any(g["counts"].get(s) for s in ACTIVE) or since is None:
        return True
    return (g["ended_at"] or g["submitted_at"]) >= since


def member_rows(con, gid):
    return con.execute("SELECT * FROM jobs WHERE grp=? ORDER BY id", (gid,)).fetchall()


def cancel(ctx, gid):
    """Cancel every queued and running job of a group: queued ones at once (one transaction),
    running ones as `cancel` does, waiting up to `wait` seconds for them all together."""
    from . import jobstate, runner  # here: a submit imports this module, and needs neither
    g = row(ctx.con, gid)
    con = ctx.con
    now = time.time()
    with db.Tx(con):
        queued = [r["id"] for r in con.execute("SELECT id FROM jobs WHERE grp=? AND state='queued'",
                                               (g["id"],))]
        con.execute("UPDATE jobs SET state='cancelled', ended_at=? WHERE grp=? AND state='queued'",
                    (now, g["id"]))
    for job_id in queued:
        jobstate.ended(con, ctx.home, job_id)
    running = con.execute("SELECT * FROM jobs WHERE grp=? AND state='running'", (g["id"],)).fetchall()
    for r in running:
        jobstate.request_cancel(ctx.home, r)
    deadline = time.time() + float(ctx.req.get("wait", 3.0))
    while running and time.time() < deadline:
        if all(runner.read_exit(ctx.home, r["id"]) is not None for r in running):
            break
        time.sleep(0.02)
    jobstate.finalize_exited(con, ctx.home)
    return {"group": summaries(con, ids=[g["id"]])[0], "cancelled_queued": len(queued),
            "cancelled_running": len(running)}
