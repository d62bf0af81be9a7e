"""What holds a queued job before it may even be prepared: its dependencies (deps.py) and its
group's limit on jobs running at once (`--array 0-9%3`, groups.py). The scheduler asks hold(row)
for every queued job of a pass (scheduler.py `_place`); a job held here neither builds its work
dir nor blocks the GPU jobs behind it. Standard library only, Python >= 3.8.
"""
from . import deps


class Gates(object):
    def __init__(self, con, home):
        self.con = con
        self.home = home
        self.deps = {}      # queued job id -> its dependencies, this pass
        self.running = {}   # group id -> its jobs running or let through, this pass
        self.limits = {}    # group id -> max_running (None: no limit)

    def begin_pass(self):
        """Cancel the dependents of failed jobs (transitively), then read what this pass needs:
        one query for the dependencies, one for the groups with a limit."""
        deps.cascade(self.con, self.home)
        self.deps = deps.pending(self.con)
        self.limits = {r[0]: r[1] for r in self.con.execute(
            "SELECT id, max_running FROM job_groups WHERE max_running IS NOT NULL AND id IN "
            "(SELECT DISTINCT grp FROM jobs WHERE state='queued' AND grp IS NOT NULL)")}
        self.running = {}
        if self.limits:
            self.running = {r[0]: r[1] for r in self.con.execute(
                "SELECT grp, COUNT(*) FROM jobs WHERE state='running' AND grp IS NOT NULL GROUP BY grp")}

    def hold(self, row):
        """Why `row` may not go on yet (its message, with "{cause}" for the job it waits for,
        written here), or None. A job let through counts against its group's limit for the
        rest of the pass, whether it starts now or waits for its build or GPUs."""
        d = self.deps.get(row["id"])
        if d:
            v = deps.verdict(d)
            if v is not None and v[0] == "wait":
                return self._say(row, "waiting for dependency {cause} (%s)" % v[2], v[1])
        gid = row["grp"]
        limit = self.limits.get(gid) if gid is not None else None
        if limit is not None:
            n = self.running.get(gid, 0)
            if n >= limit:
                return self._say(row, "waiting: %d jobs of its group run, at most %d at once" % (n, limit))
            self.running[gid] = n + 1
        return None

    def _say(self, row, message, cause=None):
        if row["message"] != message or row["cause"] != cause:
            self.con.execute("UPDATE jobs SET message=?, cause=? WHERE id=? AND state='queued'",
                             (message, cause, row["id"]))
        return message
