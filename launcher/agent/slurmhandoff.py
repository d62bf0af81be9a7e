"""Handing a submit's jobs to Slurm, from the submit verb, once they are committed (docs/design.md
"Backends"): their data tree, work dirs and environment are built here on the login node, on the
file system the compute nodes share, by the same code the daemon uses on a tower (prepare.py,
workdirs.py, builds.py: once per key), then sbatch gets an argv (slurmjobs.submit). While
something is built the client hears a frame {"building": what} at once and every 2 s, so its
connection never looks dead; if the client goes away the agent carries on (a job committed is
a job handed on). Whatever stops the job here fails it with one line, and the submit answers
with that line: Slurm's own reason when sbatch refused it. A lock held while handing on tells
a later look that an agent still works on the job (slurmbackend.revive). Standard library only,
Python >= 3.8.
"""
import json
import os
import signal
import time

from . import db, deps, fsutil, jobcontainer, jobproject, runtime, slurmcontainer, slurmjobs, store, workdirs
from .jobstate import append_log, ended
from .prepare import Prep
from .protocol import AgentError
from .slurmbackend import handoff_lock_path, slurm_record

HEARTBEAT_S = 2.0
# hosts.yaml's settings that become one sbatch option each (slurm.sbatch_argv)
OPTION_KEYS = ("partition", "account", "qos", "time", "mem", "cpus_per_gpu", "constraint",
               "gpu_option", "gpu_type")


def hand_off(ctx, job_ids):
    """Prepare the jobs of one submit and submit them to Slurm: one job, or the jobs of a sweep
    or an array as ONE array job (task i = job_ids[i], `%N` its group's max_running), with their
    `--after` / `--after-any` as Slurm dependencies. Raises AgentError when none reached Slurm
    (the jobs failed, saying why)."""
    home, con = ctx.home, ctx.con
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a dropped connection does not stop the hand-off
    fd = os.open(handoff_lock_path(home, job_ids[0]), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fsutil.flock_within(fd, 30.0)
        prep, say = _Prep(home, con, store.Store(home.store), [], None), _Heartbeat(ctx)
        ready = [j for j in job_ids if _prepared(ctx, j, say, prep)]
        rows = [db.get(con, j) for j in ready if not os.path.exists(home.job(j).cancel)]
        for j in set(ready) - set(r["id"] for r in rows):
            _end(con, home, j, "cancelled", "cancelled before it reached Slurm")
        if not rows:
            row = db.get(con, job_ids[0])
            if row["state"] == "cancelled":
                return
            raise AgentError("not_prepared", "job %d %s" % (row["id"], row["message"] or row["state"]),
                             "`rtrain logs %d` has the whole output" % row["id"])
        opts = options(ctx.req.get("slurm") or {}, rows[0])
        if rows[0]["grp"] is not None:
            g = con.execute("SELECT max_running FROM job_groups WHERE id=?", (rows[0]["grp"],)).fetchone()
            opts.update(name="rtrain-g%d" % rows[0]["grp"], array_limit=g["max_running"] if g else None)
        try:
            opts.update(dependencies(con, home, rows[0]["id"]))
            sids = slurmjobs.submit(home, [job_spec(ctx, r) for r in rows], opts)
        except AgentError as e:
            why = "Slurm refused it: %s" % e.message if e.code == "sbatch_refused" else e.message
            for r in rows:
                _end(con, home, r["id"], "failed", why)
            raise AgentError(e.code, "job %d: %s" % (rows[0]["id"], why), e.hint or
                             "check partition, account, qos, time and sbatch_args of this host in "
                             "hosts.yaml (`rtrain hosts` tries them)")
        with db.Tx(con):
            for r, sid in zip(rows, sids):
                con.execute("UPDATE jobs SET message=? WHERE id=? AND state='queued'",
                            ("Pending (Slurm job %s)" % sid, r["id"]))
        late = [r["id"] for r in rows if os.path.exists(home.job(r["id"]).cancel)]
        if late:  # a cancel came while sbatch ran
            slurmjobs.cancel(home, late)
    finally:
        os.close(fd)


def options(settings, row):
    """slurmjobs.submit's options for a job, from the host's settings (hosts.yaml)."""
    out = {k: settings[k] for k in OPTION_KEYS if settings.get(k) not in (None, "")}
    out.update(gpus=row["gpus_requested"], name="rtrain-%d" % row["id"],
               sbatch_args=list(settings.get("sbatch_args") or ()),
               # --retries: Slurm runs it again after a preemption or a node failure
               requeue=True if row["retries"] > 0 else None)
    return out


def dependencies(con, home, job_id):
    """{"after_ok": [Slurm ids], "after_any": [...]} of a job's `--after` / `--after-any` (the
    deps table, deps.py): a dependency that has ended as it must is no longer one (Slurm may have
    forgotten it); one Slurm does not hold yet is refused."""
    out = {"after_ok": [], "after_any": []}
    for dep, kind in con.execute("SELECT dep, kind FROM deps WHERE job=? ORDER BY dep", (job_id,)):
        row = db.get(con, dep)
        if row["state"] == "succeeded" or (kind == deps.ANY and row["state"] in deps.ENDED):
            continue
        if row["state"] in deps.BAD:
            raise AgentError("dependency_failed", "--after %d: job %d %s already, so this job could "
                             "never start" % (dep, dep, row["state"]),
                             "use --after-any to run it after the job whatever its end")
        sid = slurm_record(home, dep).get("slurm_job_id")
        if not sid:
            raise AgentError("dependency_not_in_slurm", "--after %d: job %d is not in Slurm's queue "
                             "yet" % (dep, dep), "submit again once `rtrain status %d` names its "
                             "Slurm job" % dep)
        out["after_ok" if kind == deps.OK else "after_any"].append(sid)
    return out


def job_spec(ctx, row):
    """{"id", "argv", "vars"} (slurmjobs.prepare): what the wrapper runs, as runner.py would run
    it on a tower (runtime.py: activation, the job's variables, its shell), or in a container."""
    home, job_id = ctx.home, row["id"]
    rt = runtime.read(home, job_id)
    job_vars = fsutil.read_json(home.job(job_id).env)
    job_vars = dict(job_vars if isinstance(job_vars, dict) else {}, **json.loads(row["vars"] or "{}"))
    assignments = runtime.variables(rt, job_vars, [])  # (a sweep point's own variables last)
    container = jobcontainer.read(home, job_id)  # container.json, as submit checked it
    if container:
        project = jobproject.read(home, job_id) or {}
        argv = slurmcontainer.command(container, ctx.req.get("slurm") or {}, home.job(job_id).work,
                                      home.root, project.get("mounts") or (), row["gpus_requested"],
                                      row["command"])
    else:
        argv = runtime.argv(rt, row["command"], os.path.join(home.job(job_id).dir, "env.sh"))
    return {"id": job_id, "argv": argv, "vars": [list(a) for a in assignments]}


class _Prep(Prep):
    """The daemon's preparation (data, work dir, environment); a container job's engine and
    image are the cluster's (pyxis, apptainer pull the image themselves): nothing here."""

    def _container(self, row, ctr):
        return True


class _Heartbeat:
    """Tells the client what is being built, every HEARTBEAT_S; a client gone is let be."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.last = None  # the first one at once
        self.gone = False

    def __call__(self, message):
        if self.gone or (self.last is not None and time.monotonic() - self.last < HEARTBEAT_S):
            return
        self.last = time.monotonic()
        try:
            self.ctx.emit({"building": message or ""})
        except (OSError, ValueError):
            self.gone = True


def _prepared(ctx, job_id, say, prep):
    """True once the job's data, work dir and environment are ready (prepare.Prep, as the
    daemon does it, here in the foreground); False when that failed the job (or it was
    cancelled meanwhile)."""
    home, con = ctx.home, ctx.con
    st = prep.store

    def workdir_ready(row):
        if workdirs.ready(home, row["id"]):
            return True
        why = workdirs.build(home, row["id"], st)
        if why is None:
            return True
        _end(con, home, row["id"], "failed", "cannot build its work dir: %s" % why)
        return False

    while True:
        row = db.get(con, job_id)
        if row["state"] != "queued":
            return False
        if os.path.exists(home.job(job_id).cancel):
            _end(con, home, job_id, "cancelled", "cancelled before it reached Slurm")
            return False
        if prep.ready(row, workdir_ready):
            return True
        _reap(prep)
        say(db.get(con, job_id)["message"])
        time.sleep(0.1)


def _reap(prep):
    """Collect the builders (of this process) that ended."""
    for pid, _ in list(prep.builds.running.values()):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            prep.ended(pid)


def _end(con, home, job_id, state, why):
    append_log(home, job_id, "rtrain: %s\n" % why)
    with db.Tx(con):
        con.execute("UPDATE jobs SET state=?, ended_at=?, message=? WHERE id=? AND state='queued'",
                    (state, time.time(), why, job_id))
    ended(con, home, job_id)
