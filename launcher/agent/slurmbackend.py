"""The Slurm backend (backends.py): rtrain on a cluster's login node, where Slurm, not rtrain's
daemon, owns the queue and the GPUs (docs/design.md "Backends", docs/contracts.md "Slurm
backend"). No rtrain process stays on the login node: the submit verb prepares the job (work
dir, data, environment: on the file system the compute nodes share) and hands it to sbatch
(slurmhandoff.py); every later look at the jobs asks Slurm, once for all of them.

The job table keeps rtrain's states: a job is `queued` until Slurm runs it (its message says
Slurm's reason: "Pending: Resources"; a job Slurm requeued waits again as `queued`), `running`,
then final (succeeded, failed, cancelled, lost), saved as soon as a look sees it, since after
MinJobAge (no sacct without slurmdbd) only the wrapper's exit record is left. Slurm's own job
id, node and state ride along in a job's `slurm` (describe). Standard library only,
Python >= 3.8.
"""
import json
import os
import sys
import time

from . import batch, db, fsutil, groups, jobstate, slurmjobs, slurmstate
from .protocol import AgentError

POLL_S = 5.0      # `logs -f` asks Slurm at most this often while the job's command runs
ORPHAN_S = 60.0   # queued this long, never handed to Slurm, and nobody handing it on: lost
ACTIVE = ("queued", "running")


def slurm_record(home, job_id):
    """jobs/N/slurm.json: {"slurm_job_id", "submitted_at", "requeue"} once sbatch took it."""
    rec = fsutil.read_json(os.path.join(home.job(job_id).dir, "slurm.json"))
    return rec if isinstance(rec, dict) else {}


def handoff_lock_path(home, job_id):
    return os.path.join(home.job(job_id).dir, "handoff.lock")


class Slurm:
    kind = "slurm"
    local_gpus = False

    def __init__(self, ctx):
        self.ctx = ctx
        self.settings = ctx.req.get("slurm") or {}
        if os.path.exists(os.path.join(ctx.home_root, "daemon.log")):
            raise AgentError("home_in_use", "%s holds jobs of rtrain's own scheduler (a tower's); a "
                             "home is run either by rtrain or by Slurm" % ctx.home_root,
                             "give this Slurm host a `home:` of its own in hosts.yaml")
        self.views = {}       # rtrain job id -> its last view (slurmstate.job_view), this request
        self.asked_at = None  # when Slurm was last asked (time.monotonic())

    # ------------------------------------------------------------------ backends.py's interface

    def poke(self):
        """Nothing to wake: the submit verb hands each job to sbatch itself."""

    def refresh(self):
        """One squeue call for every job Slurm still runs for this home; what changed goes into
        the job table, final states at once (jobstate.ended tells whoever asked)."""
        con, home = self.ctx.con, self.ctx.home
        handed = {}
        for row in con.execute("SELECT id FROM jobs WHERE state IN ('queued','running')").fetchall():
            rec = slurm_record(home, row["id"])
            if rec.get("slurm_job_id"):
                handed[row["id"]] = rec
        if not handed:
            return
        views = slurmjobs.status(home, sorted(handed), mode=self.settings.get("squeue_format") or "auto")
        self.asked_at = time.monotonic()
        self.views.update(views)
        finals = []
        with db.Tx(con):
            for job_id, rec in handed.items():
                cur = db.get(con, job_id)
                if cur is None or cur["state"] not in ACTIVE:
                    continue  # a cancel that came first
                fields = slurmstate.record(views[job_id], requeue=bool(rec.get("requeue")))
                changed = {k: v for k, v in fields.items() if _column(k, v) != cur[k]}
                if changed:
                    con.execute("UPDATE jobs SET %s WHERE id=?" % ", ".join("%s=?" % k for k in changed),
                                [_column(k, v) for k, v in changed.items()] + [job_id])
                if fields["state"] not in ACTIVE:
                    finals.append(job_id)
        for job_id in finals:
            jobstate.ended(con, home, job_id)

    def job_row(self, job_id):
        """The job's row; Slurm is asked when its command has just ended (its exit record is
        there) or POLL_S after the last time, not on every call (`logs -f` calls 4 times a second)."""
        con, home = self.ctx.con, self.ctx.home
        row = db.get(con, job_id)
        if row is None or row["state"] not in ACTIVE or not slurm_record(home, job_id).get("slurm_job_id"):
            return row
        since = None if self.asked_at is None else time.monotonic() - self.asked_at
        if since is None or since >= POLL_S or (since >= 0.25 and os.path.exists(home.job(job_id).exit)):
            self.refresh()
            row = db.get(con, job_id)
        return row

    def revive(self, jobs):
        """A job queued long ago that never reached Slurm, with no agent handing it on (its agent
        was killed mid-way: the login node rebooted), will never run: it is lost."""
        con, home = self.ctx.con, self.ctx.home
        for j in jobs:
            try:
                job_id = j["id"]
            except (KeyError, IndexError):
                continue  # a folded group's count (status)
            if j["state"] != "queued" or time.time() - j["submitted_at"] < ORPHAN_S or \
                    slurm_record(home, job_id).get("slurm_job_id") or \
                    not _lock_free(home, _first_of_submit(con, job_id)):
                continue
            message = "it never reached Slurm: the agent handing it to sbatch stopped first"
            with db.Tx(con):
                con.execute("UPDATE jobs SET state='lost', ended_at=?, message=? WHERE id=? AND "
                            "state='queued'", (time.time(), message, job_id))
            jobstate.append_log(home, job_id, "rtrain: job lost: %s\n" % message)
            if isinstance(j, dict):  # a job of status's answer (logs passes its row)
                j.update(state="lost", message=message)

    def describe(self, job):
        """`slurm`: {"job_id", "state", "reason", "node"}: Slurm's view (state and reason when
        Slurm was asked in this request), the node from the wrapper's records."""
        home = self.ctx.home
        rec = slurm_record(home, job["id"])
        view = self.views.get(job["id"]) or {}
        ran = fsutil.read_json(home.job(job["id"]).exit) or \
            fsutil.read_json(os.path.join(home.job(job["id"]).dir, "start.json")) or {}
        job["slurm"] = {"job_id": rec.get("slurm_job_id"), "state": view.get("slurm_state"),
                        "reason": view.get("reason") if job["state"] == "queued" else None,
                        "node": view.get("node") or ran.get("node") or None,
                        "partition": self.settings.get("partition")}
        return job

    def verb(self, name, fn):
        own = {"submit": self.submit, "cancel": self.cancel, "gpus": self.gpus,
               "hello": self.hello, "daemon": _no_daemon, "autostop": _no_autostop}
        return own.get(name, fn)

    # ------------------------------------------------------------------ the verbs of its own

    def submit(self, ctx):
        """The generic submit (snapshot, atomic commit), then the hand-off to sbatch: the reply
        comes once Slurm holds the job, or with Slurm's reason it refused it."""
        from . import slurmhandoff
        from .verbs import submit as submit_verb
        if ctx.req.get("slurm") is None and not ctx.req.get("lookup"):
            raise AgentError("slurm_home", "%s holds jobs run by Slurm; this host is not `scheduler: "
                             "slurm` in hosts.yaml" % ctx.home_root,
                             "add `scheduler: slurm` to the host, or give it another `home:`")
        if not ctx.req.get("lookup"):
            if batch.gpus(ctx.req.get("gpus", 0))[1] > 1:
                raise AgentError("bad_request", "--gpus %s: a share of a GPU is rtrain's own, on a "
                                 "tower" % ctx.req.get("gpus"), "on Slurm ask for whole GPUs (a "
                                 "cluster's GPU shards go in sbatch_args)")
            if ctx.req.get("after") or ctx.req.get("after_any"):
                self.refresh()  # what the dependencies did, as Slurm has it now
            # stall_after (rtrain.yaml's) watches a job's GPUs with nvidia-smi: not from here
            ctx.req["stall"] = None
        res = submit_verb.submit(ctx)
        if not res.get("duplicate"):
            first = res["job"]["id"]
            gid = res["job"].get("group")
            ids = [r["id"] for r in groups.member_rows(ctx.con, gid)] if gid is not None else [first]
            slurmhandoff.hand_off(ctx, ids)
            res["job"] = ctx.public(db.get(ctx.con, first))
        return res

    def cancel(self, ctx):
        """Mark the job and scancel it (one line of Slurm's if it cannot); wait a little (`wait`,
        3 s) for its end to be seen."""
        con = ctx.con
        if ctx.req.get("group") is not None:  # every queued and running job of it, one scancel
            g = groups.row(con, ctx.req["group"])
            rows = [r for r in groups.member_rows(con, g["id"]) if r["state"] in ACTIVE]
            self._cancel([r["id"] for r in rows], float(ctx.req.get("wait", 3.0)))
            return {"group": groups.summaries(con, ids=[g["id"]])[0],
                    "cancelled_queued": sum(r["state"] == "queued" for r in rows),
                    "cancelled_running": sum(r["state"] == "running" for r in rows)}
        row = ctx.job_row(ctx.req.get("id"))
        if row["state"] in ACTIVE:
            self._cancel([row["id"]], float(ctx.req.get("wait", 3.0)))
        return {"job": ctx.public(db.get(con, row["id"])), "was": row["state"]}

    def _cancel(self, ids, wait):
        con, home = self.ctx.con, self.ctx.home
        why = slurmjobs.cancel(home, ids)
        for job_id in ids:
            if why[job_id] == "never submitted to Slurm" and _lock_free(home, _first_of_submit(con, job_id)):
                with db.Tx(con):  # no agent hands it on any more: nothing of it runs
                    con.execute("UPDATE jobs SET state='cancelled', ended_at=? WHERE id=? AND "
                                "state='queued'", (time.time(), job_id))
                jobstate.ended(con, home, job_id)
        deadline = time.time() + wait
        while time.time() < deadline and any(db.get(con, j)["state"] in ACTIVE for j in ids):
            self.refresh()
            time.sleep(0.3)

    def gpus(self, ctx):
        """GRES per node (sinfo, of the host's partition): `slurm_nodes`; no nvidia-smi here."""
        out = {"gpus": [], "error": None, "nvidia_smi_found": True, "lock_dir": None,
               "lock_dir_problem": None, "slurm_nodes": None}
        try:
            out["slurm_nodes"] = slurmjobs.gpus(partition=self.settings.get("partition"))
        except AgentError as e:
            out["error"] = {"kind": e.code, "message": e.message}
        return out

    def hello(self, ctx):
        from . import slurmcheck
        from .verbs import hello as hello_verb
        out = hello_verb.hello(ctx)
        out["daemon_running"] = False
        out["logind"] = None  # no job runs on the login node: logout does not end them
        out["slurm"] = slurmcheck.report(ctx, self.settings)
        return out


def _column(key, value):
    """A record's value as the job table holds it."""
    return json.dumps(value) if key == "gpus" else value


def _lock_free(home, job_id):
    """True when no agent holds the job's hand-off lock (slurmhandoff.py)."""
    return not fsutil.flock_held(handoff_lock_path(home, job_id))


def _first_of_submit(con, job_id):
    """The job whose hand-off lock covers job_id: the first job of its group, or itself."""
    r = con.execute("SELECT MIN(id) FROM jobs WHERE grp=(SELECT grp FROM jobs WHERE id=?)",
                    (job_id,)).fetchone()
    return r[0] if r and r[0] is not None else job_id


def _no_autostop(ctx):
    raise AgentError("not_on_slurm", "autostop stops a host you own; a Slurm cluster's login node is "
                     "not one", "autostop is for towers and cloud VMs")


def _no_daemon(ctx):
    """No rtrain daemon runs in a home whose jobs Slurm runs."""
    sys.exit(0)
