"""Placing queued jobs: which job starts now, on which GPUs, and why the others wait.

Jobs are looked at in queue order (priority, then id). A job first needs its work dir built
(workdirs.py); a GPU job then needs that many free GPUs under its own settings (settings.py:
the visible GPUs, the memory threshold, the lease dir, the nvidia-smi it was submitted with),
and a lease on each (leases.py). The first GPU job that cannot start blocks the GPU jobs behind
it (no job is passed over for ever); CPU jobs never wait.

nvidia-smi is the second check after the leases, and it is slow (tens of ms for a real one,
more with many GPUs), so it stays off the hand-off path: the scheduler keeps its last answer per
settings for up to SNAPSHOT_MAX_AGE_S, and in it the compute processes of this user's own
running jobs (found by session id: every job runs in the session its wrapper made) count as
"ours", not as foreign. When a job of ours ends and its lease is freed, its GPUs are therefore
free in the snapshot already and the next job starts at once. nvidia-smi is asked again when the
snapshot is older than that, or when a lease someone else held was freed on a GPU the snapshot
saw busy.
"""
import json
import sys
import time
import traceback

from . import db, fsutil, gates, gpus, inventory, leases, placement, workdirs
from .jobstate import append_log, ended
from .prepare import Prep
from .settings import Settings

SNAPSHOT_MAX_AGE_S = 2.0


class _View:
    """nvidia-smi's last answer under one Settings, and the leases as they were then."""

    def __init__(self, units, error, lease_view):
        self.units = units
        self.error = error
        self.lease_view = lease_view
        self.at = time.monotonic()


class Scheduler:
    """The placement half of the daemon (daemon.py), which provides start(row, uuids, fds) and
    poke_argv. One pass is schedule()."""

    def __init__(self, home, con, store):
        self.home = home
        self.con = con
        self.store = store
        self.views = {}         # Settings -> _View
        self.taken = set()      # GPUs handed out in this pass
        self.row_errors = {}    # job id -> passes in a row that failed on it
        self.builders = {}      # job id -> pid of the child building its work dir (workdirs.py)
        self.built = {}         # job id -> pid of a builder that has ended
        self.own_fds = []       # the daemon's descriptors, closed in every child
        self.lock_dir = None    # the lease dir of the first job waiting for GPUs, if any
        self.prep = None        # data trees and environments built before jobs (prepare.py)
        self.gates = gates.Gates(con, home)  # dependencies, groups' limits (gates.py)
        self.placer = placement.Placer(home.root, self.own_fds)  # policy, shares, fair share

    def schedule(self):
        """Start what can start. Returns True if some job waits for GPUs."""
        self.gates.begin_pass()  # first: dependents of failed jobs are cancelled (deps.py)
        queued = [r for r in db.active(self.con) if r["state"] == "queued"]
        self.placer.begin_pass()
        if not queued:
            self.placer.end_pass(None)
            return False
        # this pass: nvidia-smi's view and the lease dir per settings, the first job waiting
        turn = {"units": {}, "dirs": {}, "blocked": None}
        try:
            for row in queued:
                try:
                    self._place(row, turn)
                    self.row_errors.pop(row["id"], None)
                except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the queue
                    self._row_failed(row, e)
        finally:
            self.taken.clear()
            self.placer.end_pass(self.lock_dir if turn.get("gpu_wait") else None)
        return turn["blocked"] is not None

    def _place(self, row, turn):
        """Start `row` if it can start now; else note why it waits."""
        n = row["gpus_requested"]
        why = self.gates.hold(row)  # its dependencies, its group's limit: it waits, blocking none
        if why is not None:
            return
        if not self._prepared(row):
            if n and turn["blocked"] is None:
                turn["blocked"] = row["id"]  # first in line for GPUs: the others wait behind it
            return
        if n == 0:
            self.start(row, [], [])
            return
        if turn["blocked"] is not None:
            self.placer.wants(row)
            self._say_why(row, "waiting behind job %d (first in line for GPUs)" % turn["blocked"])
            return
        settings = Settings.from_dict(json.loads(row["settings"] or "{}"))
        lock_dir, lock_error = self._lock_dir(settings, turn)
        self.lock_dir = lock_dir
        if lock_error:
            turn["blocked"] = row["id"]
            self._say_why(row, "waiting: %s" % lock_error)
            return
        if settings not in turn["units"]:
            turn["units"][settings] = self._units(settings, lock_dir)
        view = turn["units"][settings]
        # the tower's policy, shared GPUs, fair share between users (placement.py)
        held, why = self.placer.take(row, view.units, lock_dir, self.taken)
        if held:
            uuids = [lease.uuid for lease in held]
            self.taken.update(lease.uuid for lease in held if lease.share == 1)
            # start() hands the descriptors to the job's wrapper and closes ours
            self.start(row, uuids, [fd for lease in held for fd in lease.fds], lock_dir)
        else:
            turn["blocked"] = turn["gpu_wait"] = row["id"]
            self._say_why(row, why or self._why_waiting(n, view, lock_dir))

    def _lock_dir(self, settings, turn):
        """(the lease dir of these settings, or None; why it can't be used, or None)."""
        path = settings.resolved_lock_dir()
        if path not in turn["dirs"]:
            try:
                turn["dirs"][path] = (leases.ensure_dir(path), None)
            except leases.LockDirError as e:  # GPU jobs wait, saying why; CPU jobs run
                turn["dirs"][path] = (None, str(e))
        return turn["dirs"][path]

    def _row_failed(self, row, e):
        """A job that could not be looked at or started: say so; the third time in a row, fail it
        (it would stand at the head of the queue for ever)."""
        traceback.print_exc()
        sys.stderr.flush()
        count = self.row_errors[row["id"]] = self.row_errors.get(row["id"], 0) + 1
        try:
            if count < 3:
                self._say_why(row, "could not start it yet (%s: %s); trying again" % (type(e).__name__, e))
                return
            self.row_errors.pop(row["id"], None)
            append_log(self.home, row["id"], "rtrain: could not start the job: %s: %s\n" % (
                type(e).__name__, e))
            with db.Tx(self.con):
                self.con.execute("UPDATE jobs SET state='failed', ended_at=?, message=? WHERE id=? AND "
                                 "state='queued'", (time.time(), "rtrain could not start it: %s: %s" % (
                                     type(e).__name__, e), row["id"]))
            ended(self.con, self.home, row["id"])
        except Exception:  # noqa: BLE001 - the database itself is in trouble: next pass
            traceback.print_exc()

    def _prepared(self, row):
        """True once the job's data, work dir and environment are ready (prepare.py)."""
        if self.prep is None:
            self.prep = Prep(self.home, self.con, self.store, self.own_fds, self.poke_self)
        return self.prep.ready(row, self._workdir_ready)

    def _workdir_ready(self, row):
        """True once the job's work dir is built; else see that it is being built."""
        job_id = row["id"]
        if workdirs.ready(self.home, job_id):
            return True
        failed = workdirs.error(self.home, job_id)
        if failed is None:
            if job_id in self.builders:
                return False
            if job_id in self.built:  # its builder ended, yet there is no work dir
                failed = "its builder (pid %d) died" % self.built.pop(job_id)
        if failed is not None:
            self._fail_unbuilt(row, failed)
            return False
        if workdirs.inline(row["files"], row["bytes"]):
            failed = workdirs.build(self.home, job_id, self.store)
            if failed is None:
                return True
            self._fail_unbuilt(row, failed)
            return False
        if len(self.builders) < workdirs.MAX_BUILDERS:
            self.builders[job_id] = workdirs.spawn(self.home, job_id, self.own_fds, self.poke_self)
        return False

    def _fail_unbuilt(self, row, why):
        append_log(self.home, row["id"], "rtrain: cannot build the job's work dir: %s\n" % why)
        with db.Tx(self.con):
            self.con.execute("UPDATE jobs SET state='failed', ended_at=?, message=? WHERE id=? AND "
                             "state='queued'", (time.time(), "cannot build its work dir: %s" % why,
                                                row["id"]))
        ended(self.con, self.home, row["id"])

    def _why_waiting(self, n, view, lock_dir):
        if view.error:
            return "waiting: cannot read the GPUs: %s" % view.error
        if not view.units:
            return "waiting: nvidia-smi lists no GPUs"
        free = sum(1 for u in view.units
                   if u["state"] == "free" and not leases.is_held(lock_dir, u["uuid"]))
        unknown = sum(1 for u in view.units if u["state"] == "unknown")
        return "waiting for %d GPU%s: %d of %d free%s" % (
            n, "" if n == 1 else "s", free, len(view.units),
            ", %d unknown (see rtrain gpus)" % unknown if unknown else "")

    def _say_why(self, row, message):
        """Tell `rtrain status` why a queued job waits (written only when it changes)."""
        if row["message"] != message:
            self.con.execute("UPDATE jobs SET message=? WHERE id=? AND state='queued'",
                             (message, row["id"]))

    def _units(self, settings, lock_dir):
        """nvidia-smi's view under `settings` (see the module's doc for when it is asked again)."""
        view = self.views.get(settings)
        if view is not None and time.monotonic() - view.at < SNAPSHOT_MAX_AGE_S:
            now = tuple(leases.is_held(lock_dir, u["uuid"]) for u in view.units)
            if not any(was and not held and u["state"] != "free"
                       for u, was, held in zip(view.units, view.lease_view, now)):
                return view
        sessions = {r["wrapper_pid"] for r in
                    self.con.execute("SELECT wrapper_pid FROM jobs WHERE state='running'")
                    if r["wrapper_pid"]}
        try:
            units, error = gpus.read(settings, is_own=lambda pid: fsutil.session_id(pid) in sessions), None
        except gpus.NvidiaSmiError as e:
            # fail closed: no free unit; a missing nvidia-smi is simply no GPUs
            units, error = [], (None if e.kind == "not_found" else e.message)
        if error is None:
            inventory.save(self.home, settings.gpu_count_key(), len(units))
        else:
            inventory.forget(self.home)  # let the next submit ask, and say what is wrong
        view = self.views[settings] = _View(
            units, error, tuple(leases.is_held(lock_dir, u["uuid"]) for u in units))
        return view

    # provided by the daemon (daemon.py)
    def start(self, row, uuids, fds, lock_dir=None):
        raise NotImplementedError

    def poke_self(self):
        raise NotImplementedError
