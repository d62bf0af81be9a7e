"""Who runs a home's jobs: rtrain's own per-user daemon (daemon.py, a tower or a VM) or Slurm (a
cluster's login node: slurmbackend.py). The verbs ask the backend of their request (Context.backend)
for what differs (docs/design.md "Backends"):

    poke()          hand the queued jobs on (wake or start the daemon; Slurm: nothing, the submit
                    verb itself hands each job to sbatch)
    refresh()       bring the job table up to date with what the jobs did (exit records; Slurm:
                    ONE squeue call for every job it still runs)
    job_row(id)     a job's row, up to date (`logs -f` asks several times a second)
    revive(jobs)    after a look at jobs: restart what should be running (a dead daemon)
    describe(job)   a job as the client sees it, with the backend's own facts (Slurm's job id...)
    local_gpus      True where this host's own GPUs are handed out (nvidia-smi is asked)
    verb(name, fn)  the backend's own version of a verb, else fn

A home is run by one backend: a Slurm job is never in the daemon's queue. The backend of a
request is Slurm when it carries the host's Slurm settings ("slurm", from hosts.yaml's
`scheduler: slurm`) or when the home holds Slurm jobs already (the agent's own helpers, the
monitor and the webhook sender, send only {"home"}). Standard library only, Python >= 3.8.
"""
import os

from . import daemon, db, jobstate


class Daemon:
    """rtrain's own scheduler daemon on this host."""

    kind = "rtrain"
    local_gpus = True

    def __init__(self, ctx):
        self.ctx = ctx

    def poke(self):
        daemon.poke(self.ctx.home, self.ctx.agent_argv)

    def refresh(self):
        jobstate.finalize_exited(self.ctx.con, self.ctx.home)

    def job_row(self, job_id):
        self.refresh()
        return db.get(self.ctx.con, job_id)

    def revive(self, jobs):
        """The daemon died (or the host rebooted) while jobs wait or run: start it, it reconciles."""
        if any(j["state"] in ("queued", "running") for j in jobs) and not daemon.running(self.ctx.home):
            self.poke()

    def describe(self, job):
        return job

    def verb(self, name, fn):
        return fn


def is_slurm_home(root):
    return os.path.isdir(os.path.join(root, "slurm"))


def of(ctx):
    """The backend of a request (see the module's doc)."""
    if ctx.req.get("slurm") is not None or is_slurm_home(ctx.home_root):
        from .slurmbackend import Slurm
        return Slurm(ctx)
    return Daemon(ctx)
