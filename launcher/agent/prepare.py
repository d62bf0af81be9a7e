"""What a queued job needs built before it starts, in order: its data tree (before its work dir,
which links to it), its work dir (workdirs.py), its environment (built in the work dir of the
first job that needs it). The scheduler asks ready(row) on every pass (scheduler.py
`_prepared`); builds run in the daemon's children (builds.py), one per key, however many jobs
wait for it. A job waiting says why in `rtrain status JOB` (with the build's last line); a job
whose build failed fails with the build's last lines, and the whole build output goes at the
top of its log. Standard library only, Python >= 3.8.
"""
import os
import time

from . import builds, datatree, db, envbuild, fsutil, jobcontainer, jobproject, runtime
from .jobstate import append_log

MAX_DEATHS = 3  # a build whose child dies this often without a word fails its jobs


class Prep:
    def __init__(self, home, con, store, close_fds, poke):
        self.home = home
        self.con = con
        self.store = store
        self.builds = builds.Builds(home.root, close_fds, poke)
        self.plans = {}    # job id -> envbuild.plan() result
        self.waited = {}   # job id -> {(kind, key)} it waited for: their log goes into its log
        self.deaths = {}   # (kind, key) -> builder children that ended with nothing published
        self.done = {}     # job id -> its attempts when it was last prepared

    def ready(self, row, workdir_ready):
        """True when the job can start; False while something is built (or it failed: then the
        job has been failed here)."""
        if self.done.get(row["id"]) == row["attempts"]:
            return workdir_ready(row)  # prepared in an earlier pass: it waits for GPUs
        rec = jobproject.read(self.home, row["id"])
        ctr = jobcontainer.read(self.home, row["id"])
        if not rec and not ctr:  # no project file: its work dir is all it needs
            if not workdir_ready(row):
                return False
            self._prepared(row)
            return True
        key = rec.get("data_key")
        if key and not self._have(row, "data", key, lambda: self._data_build(row), "its data"):
            return False
        if not workdir_ready(row):
            return False
        # a container job: its engine, GPU support and image instead of a host environment
        if not (self._container(row, ctr) if ctr else self._environment(row, rec)):
            return False
        self._prepared(row)
        return True

    def _container(self, row, ctr):
        """A container job's engine, GPU support and image (jobcontainer.py; Slurm's own way
        needs none of it on the login node: slurmhandoff.py)."""
        return jobcontainer.prepare(self, row, ctr)

    def _prepared(self, row):
        if len(self.done) > 10000:
            self.done.clear()
        self.done[row["id"]] = row["attempts"]

    # ------------------------------------------------------------------ environment

    def _environment(self, row, rec):
        job_id = row["id"]
        job_vars = fsutil.read_json(self.home.job(job_id).env)
        job_vars = job_vars if isinstance(job_vars, dict) else {}
        shell = rec.get("shell")
        if job_id not in self.plans:
            env = runtime.environment(os.environ, list(job_vars.items()))
            try:
                self.plans[job_id] = envbuild.plan(rec.get("env"), env, shell)
            except envbuild.EnvError as e:
                self._fail(row, "its environment: %s" % e, "", "cannot prepare")
                return False
        plan = self.plans[job_id]
        activate = plan["activate"]
        b = plan["build"]
        if b is not None:
            work = self.home.job(job_id).work

            def make():
                return envbuild.build(b, rec["env"], job_vars, shell, work)

            if not self._have(row, "env", b["key"], make, "its environment (%s with %s)" % (
                    b["kind"], b["tool"])):
                return False
            activate = {"kind": "conda" if b["kind"] == "conda" else "venv",
                        "path": self.builds.path("env", b["key"])}
        rt = {"activate": activate, "shell": shell, "python_bin": None}
        if plan["python"]:
            rt["python_bin"] = self._python_bin(job_id, plan["python"])
        fsutil.write_json_atomic(os.path.join(self.home.job(job_id).dir, "runtime.json"), rt,
                                 durable=False)
        self.plans.pop(job_id, None)
        self.waited.pop(job_id, None)
        return True

    def _python_bin(self, job_id, python):
        """jobs/N/bin: `python` and `python3` for the interpreter the project names."""
        d = os.path.join(self.home.job(job_id).dir, "bin")
        os.makedirs(d, mode=0o700, exist_ok=True)
        for name in ("python", "python3"):
            p = os.path.join(d, name)
            if os.path.lexists(p):
                os.unlink(p)
            os.symlink(python, p)
        return d

    def _data_build(self, row):
        m = fsutil.read_json(self.home.job(row["id"]).manifest) or {}
        return datatree.build(self.store, m.get("data") or [])

    # ------------------------------------------------------------------ one artifact

    def _have(self, row, kind, key, make, what):
        """True once (kind, key) is built; else start or wait for its build (False)."""
        job_id = row["id"]
        seen = self.waited.setdefault(job_id, set())
        if kind == "data" and self.builds.ready(kind, key) is not None and \
                not datatree.intact(self.builds.path(kind, key), self.builds.ready(kind, key)):
            # a job changed the shared data tree (it owns its files): build it again, once no
            # running job reads it
            users = [r["id"] for r in self.con.execute("SELECT id FROM jobs WHERE state='running'")
                     if (jobproject.read(self.home, r["id"]) or {}).get("data_key") == key]
            if users:
                self._say(row, "waiting: its data tree was changed by a job; it is copied again once job "
                               "%s, which reads it, ends" % ", ".join(map(str, users)))
                return False
            append_log(self.home, job_id, "rtrain: data tree %s was changed by a job; copying it again\n" % key)
            self.builds.remove(kind, key)
        if self.builds.ready(kind, key) is not None:
            try:
                os.utime(self.builds.path(kind, key) + ".ready")  # last used: prune keeps it a while
            except OSError:
                pass
            if (kind, key) in seen:
                seen.discard((kind, key))  # its output goes into the log once
                self._log_build(job_id, kind, key)
            elif kind == "env":
                append_log(self.home, job_id, "rtrain: environment %s is built already: using it\n" % key)
            return True
        running = self.builds.building(kind, key)
        if running is None and self.builds.locked(kind, key):
            # built by a child of an earlier daemon (it outlived it): wait for it
            seen.add((kind, key))
            self._say(row, "building %s (by an earlier daemon's builder)" % what)
            return False
        if running is None:
            failed = self.builds.failed(kind, key)
            if failed is not None and failed.get("at", 0) >= row["submitted_at"]:
                # it failed after this job came: the same build would fail again for it
                self._log_build(job_id, kind, key)
                self._fail(row, "%s: %s" % (what, failed.get("message")), failed.get("tail") or "")
                return False
            deaths = self.deaths.get((kind, key), 0)
            if deaths >= MAX_DEATHS:
                self._fail(row, "%s: its builder died %d times" % (what, deaths), "")
                return False
            try:
                self.builds.start(kind, key, make())
            except OSError as e:
                self._fail(row, "%s: cannot start its build: %s" % (what, e), "")
                return False
            running = self.builds.building(kind, key)
        seen.add((kind, key))
        last = self.builds.tail(kind, key, 1).strip()
        self._say(row, "building %s, %d s%s" % (
            what, time.time() - running[1], (": " + last[:160]) if last else ""))
        return False

    def ended(self, pid):
        """A child of the daemon ended; if it was a builder that published nothing, count it."""
        k = self.builds.ended(pid)
        if k is not None and self.builds.ready(*k) is None and self.builds.failed(*k) is None \
                and not self.builds.locked(*k):
            self.deaths[k] = self.deaths.get(k, 0) + 1

    def busy(self):
        return bool(self.builds.running)

    def _log_build(self, job_id, kind, key):
        try:
            with open(self.builds.log_path(kind, key), "rb") as f:
                data = f.read()
        except OSError:
            return
        append_log(self.home, job_id, data.decode("utf-8", "replace"))

    def _say(self, row, message):
        if row["message"] != message:
            self.con.execute("UPDATE jobs SET message=? WHERE id=? AND state='queued'", (message, row["id"]))

    def _fail(self, row, why, tail, what="cannot build"):
        """Fail a queued job whose environment or data cannot be made."""
        line = "%s %s" % (what, why)
        lines = [x for x in tail.splitlines() if x.strip() and not x.startswith("rtrain:")]
        if lines:
            line += " (%s)" % lines[-1].strip()[:200]
        append_log(self.home, row["id"], "rtrain: %s\n" % line)
        with db.Tx(self.con):
            self.con.execute("UPDATE jobs SET state='failed', ended_at=?, message=? WHERE id=? AND "
                             "state='queued'", (time.time(), line, row["id"]))
        self.plans.pop(row["id"], None)
        self.waited.pop(row["id"], None)
