"""What a submit asks beyond one job: the points of a sweep or the tasks of an array (one job
each, one group, one snapshot), the jobs it depends on, and a share of a GPU
(docs/contracts.md "Many jobs in one submit"; docs/design.md "Many runs").

Request keys, shaped so that a Slurm backend maps them to one array job (slurmjobs.submit:
jobs, array_limit, after_ok, after_any):
    "points": [{"command": str, "env": {NAME: value}, "suffix": str}] | absent (one job)
    "group": {"kind": "sweep" | "array", "label": str, "max_running": int | null}
    "after": [job id | "gN"], "after_any": [job id | "gN"]
    "gpus": whole number, or 1/k (0.5, 0.33, 0.25...): k jobs share one GPU
The snapshot (manifest) and the job's variables (env.json) are written once and hard-linked into
every job's folder: read-only for the agent, and a sweep of 1,000 points keeps one copy; a
point's own variables (RTRAIN_SWEEP_*, RTRAIN_ARRAY_INDEX) are in its row (db.py `vars`).
Standard library only, Python >= 3.8.
"""
import os

from . import db, deps, groups
from .protocol import AgentError
from .settings import env_problem

MAX_SHARE = 8            # --gpus 1/k for k = 2..MAX_SHARE
MAX_POINTS = 100000      # a hard limit; the client asks above its own (max_points, 1,000)
SHARED_FILES = ("manifest.json", "project.json", "notify.json", "stall.json", "env.json")


def gpus(value):
    """(GPUs, k): a whole number of GPUs (k = 1), or one GPU shared by k jobs (value 1/k)."""
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise AgentError("bad_request", "--gpus %r is not a number" % (value,))
    if isinstance(value, bool) or g < 0:
        raise AgentError("bad_request", "--gpus must be 0 or more")
    if g == int(g):
        return int(g), 1
    if g > 1:
        raise AgentError("bad_request", "--gpus %s: a share of a GPU is 1/k (0.5, 0.33, 0.25), "
                         "more than one GPU is a whole number" % value)
    k = int(round(1.0 / g))
    if k < 2 or k > MAX_SHARE or abs(1.0 / k - g) > 0.01:
        raise AgentError("bad_request", "--gpus %s is not 1/k of a GPU" % value,
                         "share a GPU among k jobs with 1/k: 0.5, 0.33, 0.25 (k up to %d)" % MAX_SHARE)
    return 1, k


def check_policy(settings, n, k):
    """Refuse what the tower's policy never allows (policy.py): more GPUs than its per-user cap,
    or than the GPUs it lets this user have."""
    from . import gpus as gpumod, policy
    pol = policy.load()
    if not pol.active or not n:
        return
    need = n if k == 1 else 1.0 / k
    if pol.cap is not None and need > pol.cap + 1e-9:
        raise AgentError("policy", "asked for %s GPUs, but the tower policy lets a user hold at most %s "
                         "(%s)" % (_num(need), _num(pol.cap), pol.path), "ask for at most %s" % _num(pol.cap))
    if pol.hidden or pol.reserved:
        try:
            units = gpumod.read(settings)
        except gpumod.NvidiaSmiError:
            return
        me = policy.me()
        usable = [u for u in units if not pol.hides(u) and pol.may_use(u, me)]
        if n > len(usable):
            raise AgentError("policy", "asked for %d GPUs, but the tower policy lets you use %d of its %d "
                             "(%s hides or reserves the others)" % (n, len(usable), len(units), pol.path),
                             "ask for at most %d (`rtrain gpus` shows which)" % len(usable))


def _num(x):
    return ("%d" % x) if x == int(x) else ("%.2f" % x).rstrip("0")


class Plan(object):
    """The jobs one submit queues: `points` (one entry per job), their group, dependencies."""

    def __init__(self, points, group, after, after_any):
        self.points = points
        self.group = group
        self.after = after
        self.after_any = after_any

    @property
    def count(self):
        return len(self.points)


def plan(ctx, spec):
    """Check what the request asks beyond one job (before any blob is received)."""
    req = ctx.req
    raw = req.get("points")
    group = None
    if raw is None:
        points = [{"command": spec["command"], "env": {}, "suffix": ""}]
    else:
        if not isinstance(raw, list) or not raw:
            raise AgentError("bad_request", "points must be a non-empty list")
        if len(raw) > MAX_POINTS:
            raise AgentError("bad_request", "%d points: at most %d in one submit" % (len(raw), MAX_POINTS))
        points = [_point(p) for p in raw]
        g = req.get("group") or {}
        limit = g.get("max_running")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise AgentError("bad_request", "group max_running must be a whole number >= 1")
        kind = g.get("kind") or "sweep"
        if kind not in ("sweep", "array"):
            raise AgentError("bad_request", "group kind is sweep or array")
        group = {"kind": kind, "label": str(g.get("label") or "")[:200], "max_running": limit}
    con = ctx.con
    after = deps.resolve(con, req.get("after"), "--after")
    after_any = deps.resolve(con, req.get("after_any"), "--after-any")
    deps.check(con, after, after_any)
    return Plan(points, group, after, after_any)


def _point(p):
    if not isinstance(p, dict) or not isinstance(p.get("command"), str) or not p["command"].strip():
        raise AgentError("bad_request", "each point needs a command")
    env = p.get("env") or {}
    if not isinstance(env, dict) or env_problem(env):
        raise AgentError("bad_request", "a point's env: %s" % (
            env_problem(env) if isinstance(env, dict) else "not a mapping"))
    suffix = p.get("suffix") or ""
    if not isinstance(suffix, str) or len(suffix) > 300:
        raise AgentError("bad_request", "a point's suffix must be a short string")
    return {"command": p["command"], "env": env, "suffix": suffix}


def folders(tmp, plan):
    """[tmp] and, for a group, one more folder per point next to it, holding hard links to
    tmp's files (the snapshot's manifest, env.json...: one copy for all). A point's own
    variables go in its row (`vars`); its log is made when it is first written."""
    out = [tmp]
    try:
        for i in range(1, plan.count):
            d = "%s-%d" % (tmp, i)
            os.mkdir(d, 0o700)
            out.append(d)
            for name in SHARED_FILES:
                src = os.path.join(tmp, name)
                if os.path.exists(src):
                    os.link(src, os.path.join(d, name))
    except BaseException:
        import shutil
        for d in out[1:]:
            shutil.rmtree(d, ignore_errors=True)
        raise
    return out


def insert(con, spec, plan):
    """Insert the plan's jobs (inside the submit's transaction); returns their ids."""
    gid = None
    if plan.group is not None:
        gid = groups.create(con, spec["name"], plan.group["kind"], plan.group["label"],
                            plan.count, plan.group["max_running"])
    ids = []
    for p in plan.points:
        s = dict(spec, command=p["command"], name=spec["name"] + p["suffix"], group=gid, vars=p["env"])
        ids.append(db.insert_job(con, s))
    deps.link(con, ids, plan.after, plan.after_any)
    return ids
