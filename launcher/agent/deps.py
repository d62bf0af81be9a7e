"""Dependencies between jobs of one home (docs/design.md "Many runs"): `--after` (every
dependency must succeed) and `--after-any` (every dependency must end, whatever way).

A submit names its dependencies as job ids or group ids ("g7": every job of group 7); they are
checked then (an unknown one is refused, and so is an `after` dependency that has failed
already) and kept in the `deps` table (db.py, schema 2). The scheduler holds a job while a
dependency has not ended (gates.py), and cancels it, with the reason, once an `after`
dependency failed, was cancelled or was lost: transitively, so a chain a -> b -> c whose b fails
cancels c too, naming the job that failed first. Slurm's `--dependency=afterok:` /
`afterany:` with `--kill-on-invalid-dep=yes` does the same there (slurmjobs.submit).
Standard library only, Python >= 3.8.
"""
import re
import time

from . import db
from .protocol import AgentError

OK, ANY = "ok", "any"
ENDED = ("succeeded", "failed", "cancelled", "lost")
BAD = ("failed", "cancelled", "lost")
_GROUP = re.compile(r"\Ag(\d+)\Z")
# a cancelled dependent's message; the client writes the job's id for {cause} (session.decorate)
MESSAGE = "dependency {cause} %s"


def resolve(con, refs, what="--after"):
    """The job ids `refs` name (ints, "12", or "g7" for every job of group 7), in order, each
    once. An unknown job or group is an AgentError."""
    if refs is None:
        return []
    if not isinstance(refs, list):
        raise AgentError("bad_request", "%s must be a list of job or group ids" % what)
    out = []
    for ref in refs:
        text = str(ref).strip()
        m = _GROUP.match(text)
        if m:
            gid = int(m.group(1))
            if con.execute("SELECT 1 FROM job_groups WHERE id=?", (gid,)).fetchone() is None:
                raise AgentError("no_such_job", "%s %s: no group %s on this host" % (what, text, text),
                                 "`rtrain status` lists your groups")
            ids = [r[0] for r in con.execute("SELECT id FROM jobs WHERE grp=? ORDER BY id", (gid,))]
        else:
            if isinstance(ref, bool) or not text.isdigit():
                raise AgentError("bad_request", "%s %r: not a job id (12) or a group id (g7)" % (what, ref))
            if db.get(con, int(text)) is None:
                raise AgentError("no_such_job", "%s %s: no job %s on this host" % (what, text, text),
                                 "a dependency must be a job of the same host (`rtrain status` lists them)")
            ids = [int(text)]
        out += [i for i in ids if i not in out]
    return out


def check(con, ok_ids, any_ids):
    """Refuse an `after` dependency that can never succeed now."""
    for dep in ok_ids:
        row = db.get(con, dep)
        if row["state"] in BAD:
            raise AgentError("dependency_failed", "--after %d: job %d %s already, so this job could "
                             "never start" % (dep, dep, row["state"]),
                             "use --after-any to run it after the job whatever its end")


def link(con, job_ids, ok_ids, any_ids):
    """Record the dependencies of the new jobs (inside the submit's transaction)."""
    rows = [(j, d, OK) for j in job_ids for d in ok_ids] + \
           [(j, d, ANY) for j in job_ids for d in any_ids if d not in ok_ids]
    if rows:
        con.executemany("INSERT OR IGNORE INTO deps (job, dep, kind) VALUES (?,?,?)", rows)


def pending(con):
    """{queued job id: [(dep id, kind, dep state, dep cause)]} for every queued job that has
    dependencies (one query per scheduler pass)."""
    out = {}
    for r in con.execute(
            "SELECT d.job, d.dep, d.kind, j.state, j.cause, j.message FROM deps d "
            "JOIN jobs me ON me.id = d.job JOIN jobs j ON j.id = d.dep "
            "WHERE me.state = 'queued' ORDER BY d.job, d.dep"):
        out.setdefault(r[0], []).append((r[1], r[2], r[3], _root(r[1], r[3], r[4], r[5])))
    return out


def _root(dep, state, cause, message):
    """(job id, state) of the failure at the root of a dependency's end: the dependency itself,
    or, when a dependency of its own cancelled it, the one that failed first."""
    if state == "cancelled" and cause is not None and (message or "").startswith(MESSAGE % ""):
        return cause, message.rsplit(" ", 1)[-1]
    return dep, state


def verdict(deps):
    """For one job's dependencies: ("wait", dep id, its state) while one has not ended as it
    must, ("cancel", root job id, root state) once an `after` one cannot succeed, or None."""
    waiting = None
    for dep, kind, state, root in deps:
        if kind == OK and state in BAD:
            return ("cancel",) + tuple(root)
        if state not in ENDED and waiting is None:
            waiting = ("wait", dep, state)
    return waiting


def cascade(con, home, on_cancel=None):
    """Cancel every queued job an `after` dependency of which failed, was cancelled or lost,
    again until none is left (a chain goes in one call). Returns the ids cancelled."""
    from .jobstate import append_log, ended
    done = []
    while True:
        doomed = []
        for job_id, deps in pending(con).items():
            v = verdict(deps)
            if v and v[0] == "cancel":
                doomed.append((job_id, v[1], v[2]))
        if not doomed:
            return done
        now = time.time()
        for job_id, root, state in doomed:
            message = MESSAGE % state
            with db.Tx(con):
                cur = con.execute("UPDATE jobs SET state='cancelled', ended_at=?, message=?, cause=? "
                                  "WHERE id=? AND state='queued'", (now, message, root, job_id))
            if cur.rowcount:
                append_log(home, job_id, "rtrain: cancelled: dependency %d %s\n" % (root, state))
                ended(con, home, job_id)
                done.append(job_id)
                if on_cancel is not None:
                    on_cancel(job_id)
