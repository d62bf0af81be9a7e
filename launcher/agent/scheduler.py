"""The per-user scheduler daemon: one instance per RTRAIN_HOME, guarded by a lock.

Event-driven: a submit or a finishing job writes a byte to the daemon's FIFO, which wakes
it at once. While a job waits for GPUs held by someone else, the daemon re-tries the
leases every 0.2 s (cheap: non-blocking flocks).

nvidia-smi is the second check after the leases, and it is slow (tens of ms for a real one,
more with many GPUs), so it stays off the hand-off path: the daemon keeps its last answer for
up to SNAPSHOT_MAX_AGE_S, and in it the compute processes of this user's own running jobs
(found by session id: every job runs in the session its wrapper made) count as "ours", not as
foreign. When a job of ours ends and its lease is freed, its GPUs are therefore free in the
snapshot already and the next job starts at once. nvidia-smi is asked again when the snapshot
is older than that, or when a lease someone else held was freed on a GPU the snapshot saw busy.
"""
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback

from . import db, fsutil, gpus, inventory, leases, paths, runner, store, workdirs

IDLE_EXIT_S = float(os.environ.get("RTRAIN_DAEMON_IDLE_S", "600"))
SNAPSHOT_MAX_AGE_S = 2.0


_config_cache = {}


def load_config(home):
    """The host settings the last submit brought (config.json), re-read when it changes."""
    try:
        st = os.stat(home.config)
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
    except OSError:
        stamp = None
    cached = _config_cache.get(home.config)
    if cached is not None and stamp is not None and cached[0] == stamp:
        return dict(cached[1])
    cfg = fsutil.read_json(home.config) or {}
    cfg = {
        "mem_busy_mib": int(cfg.get("mem_busy_mib", 1024)),
        "visible": cfg.get("visible"),
        "lock_dir": cfg.get("lock_dir") or None,
        "nvidia_smi": cfg.get("nvidia_smi") or "nvidia-smi",
    }
    if stamp is not None:
        _config_cache[home.config] = (stamp, cfg)
    return dict(cfg)


def gpu_units(cfg, sessions=()):
    """(units, error message or None). A failing nvidia-smi yields no free unit (fail closed).
    Compute processes in one of `sessions` (the wrapper pids of our running jobs) are ours."""
    try:
        snap = gpus.query(cfg["nvidia_smi"])
    except gpus.NvidiaSmiError as e:
        if e.kind == "not_found":
            return [], None
        return [], e.message
    own = [a["pid"] for a in snap.get("apps") or ()
           if a.get("pid") is not None and fsutil.session_id(a["pid"]) in sessions]
    return gpus.classify(snap, mem_busy_mib=cfg["mem_busy_mib"], own_pids=own,
                         visible=cfg["visible"]), None


# ---------------------------------------------------------------- waking the daemon

def poke(home, spawn_argv=None):
    """Wake the daemon. If none is running and spawn_argv is given, start one. True if woken."""
    try:
        fd = os.open(home.daemon_fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.ENOENT):
            raise
        if spawn_argv:
            spawn(home, spawn_argv)
        return False
    try:
        os.write(fd, b"x")
    except OSError:
        pass  # a full FIFO already holds a wake-up
    finally:
        os.close(fd)
    return True


def running(home):
    """True if a daemon holds the lock for this home."""
    try:
        fd = os.open(home.daemon_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def daemon_pid(home):
    try:
        with open(home.daemon_lock) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def spawn(home, argv):
    """Start a daemon detached from us (own session, stdio to its log): it outlives ssh."""
    log = os.open(home.daemon_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        p = subprocess.Popen(list(argv) + ["daemon"], stdin=subprocess.PIPE, stdout=log, stderr=log,
                             start_new_session=True, close_fds=True,
                             env=dict(os.environ, RTRAIN_HOME=home.root))
        p.stdin.write(json.dumps({"home": home.root}).encode() + b"\n")
        p.stdin.close()
    finally:
        os.close(log)


# ---------------------------------------------------------------- state transitions

def finalize_exited(con, home):
    """Record the exit of every running job whose wrapper wrote exit.json. Safe from any process."""
    changed = 0
    for row in con.execute("SELECT id FROM jobs WHERE state='running'").fetchall():
        ex = runner.read_exit(home, row["id"])
        if ex is not None:
            changed += _finish(con, home, row["id"], ex)
    return changed


def _finish(con, home, job_id, ex):
    with db.Tx(con):
        row = db.get(con, job_id)
        if row is None or row["state"] != "running":
            return 0
        if ex.get("cancelled"):
            state = "cancelled"
        elif ex["exit_code"] == 0:
            state = "succeeded"
        else:
            state = "failed"
        if state == "failed" and row["attempts"] <= row["retries"]:
            _requeue(con, home, row, "exit code %s, retrying (attempt %d of %d)" % (
                ex["exit_code"], row["attempts"] + 1, row["retries"] + 1))
            return 1
        con.execute("UPDATE jobs SET state=?, exit_code=?, signal=?, ended_at=? WHERE id=?",
                    (state, ex["exit_code"], ex.get("signal"), ex.get("ended_at") or time.time(), job_id))
    return 1


def _requeue(con, home, row, why):
    job_id = row["id"]
    for p in (home.exit_file(job_id), home.pid_file(job_id)):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    workdirs.retire(home, job_id)  # the next attempt gets a fresh copy of the snapshot
    _append_log(home, job_id, "rtrain: %s\n" % why)
    con.execute("UPDATE jobs SET state='queued', gpus='[]', wrapper_pid=NULL, wrapper_start=NULL,"
                " pgid=NULL, message=? WHERE id=?", (why, job_id))


def _append_log(home, job_id, text):
    try:
        with open(home.log(job_id), "ab") as f:
            f.write(text.encode())
    except OSError:
        pass


NEVER_STARTED_AFTER_S = 10.0


def reconcile(con, home):
    """Daemon-only: exits, plus jobs whose wrapper vanished (killed, or a reboot) -> lost/requeued."""
    finalize_exited(con, home)
    for row in con.execute("SELECT * FROM jobs WHERE state='running'").fetchall():
        if not row["wrapper_pid"] and row["boot_id"] == fsutil.boot_id():
            # a daemon died between marking the job running and recording its wrapper
            if _adopt_or_requeue(con, home, row):
                continue
            row = db.get(con, row["id"])
        pid = row["wrapper_pid"]
        if pid and fsutil.alive(pid, row["wrapper_start"]) and row["boot_id"] == fsutil.boot_id():
            continue
        ex = runner.read_exit(home, row["id"])  # it may have finished just now
        if ex is not None:
            _finish(con, home, row["id"], ex)
            continue
        _lose(con, home, row)


def _adopt_or_requeue(con, home, row):
    """A running job with no wrapper pid. Its wrapper writes pid.json once the job runs: adopt
    those pids. With no pid.json long after the start, the wrapper never was: queue it again.
    True when there is nothing more to check for now."""
    pids = runner.read_pids(home, row["id"])
    if pids.get("wrapper_pid") and pids.get("boot_id") == row["boot_id"]:
        with db.Tx(con):
            con.execute("UPDATE jobs SET wrapper_pid=?, wrapper_start=? WHERE id=? AND state='running'"
                        " AND wrapper_pid IS NULL", (pids["wrapper_pid"], pids.get("wrapper_start"),
                                                     row["id"]))
        return False
    if runner.read_exit(home, row["id"]) is not None:
        return False
    if time.time() - (row["started_at"] or 0) < NEVER_STARTED_AFTER_S:
        return True  # its wrapper may be starting right now
    with db.Tx(con):
        con.execute("UPDATE jobs SET state='queued', gpus='[]', started_at=NULL, attempts=attempts-1,"
                    " message='' WHERE id=? AND state='running' AND wrapper_pid IS NULL", (row["id"],))
    return True


def _lose(con, home, row):
    # The wrapper is gone. If its process group outlived it (same boot, same start time), end it.
    pids = runner.read_pids(home, row["id"])
    if pids.get("pgid") and pids.get("boot_id") == fsutil.boot_id() and \
            fsutil.alive(pids["pgid"], pids.get("pgid_start")):
        try:
            os.killpg(pids["pgid"], signal.SIGKILL)
        except OSError:
            pass
    with db.Tx(con):
        row = db.get(con, row["id"])
        if row["state"] != "running":
            return
        if row["attempts"] <= row["retries"]:
            _requeue(con, home, row, "job lost (its process vanished: host rebooted or killed); "
                     "retrying (attempt %d of %d)" % (row["attempts"] + 1, row["retries"] + 1))
        else:
            _append_log(home, row["id"], "rtrain: job lost: its process vanished (host rebooted or killed)\n")
            con.execute("UPDATE jobs SET state='lost', ended_at=?, message=? WHERE id=?",
                        (time.time(), "its process vanished (host rebooted or killed)", row["id"]))


# ---------------------------------------------------------------- placing jobs

class Daemon:
    def __init__(self, home, agent_argv):
        self.home = home
        self.agent_argv = agent_argv
        self.con = db.connect(home.db)
        self.store = store.Store(home.store)
        self.units = None
        self.units_at = 0.0
        self.units_cfg = None
        self.lease_view = None
        self.error = None
        self.taken = set()
        self.own_fds = []
        self.waiter = None      # (read fd, write fd, lock dir): wake-ups from others' jobs
        self.lock_error = None  # why the GPU lock dir can't be used, if it can't
        self.row_errors = {}    # job id -> passes in a row that failed on it
        self.builders = {}      # job id -> pid of the child building its work dir (workdirs.py)
        self.built = {}         # job id -> pid of a builder that has ended
        self.lock_dir = None

    def schedule(self):
        """Start what can start. Returns True if some job waits for GPUs."""
        queued = [r for r in db.active(self.con) if r["state"] == "queued"]
        if not queued:
            return False
        cfg = load_config(self.home)
        try:
            self.lock_dir, self.lock_error = leases.ensure_dir(paths.lock_dir(cfg["lock_dir"])), None
        except leases.LockDirError as e:  # GPU jobs wait, saying why; CPU jobs run
            self.lock_dir, self.lock_error = None, str(e)
        turn = {"units": None, "blocked": None}  # this pass: nvidia-smi's view, first job waiting
        try:
            for row in queued:
                try:
                    self._place(row, cfg, turn)
                    self.row_errors.pop(row["id"], None)
                except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the queue
                    self._row_failed(row, e)
        finally:
            self.taken.clear()
        return turn["blocked"] is not None

    def _place(self, row, cfg, turn):
        """Start `row` if it can start now; else note why it waits."""
        n = row["gpus_requested"]
        if not self._prepared(row):
            if n and turn["blocked"] is None:
                turn["blocked"] = row["id"]  # first in line for GPUs: the others wait behind it
            return
        if n == 0:
            self.start(row, [], [])
            return
        if turn["blocked"] is not None:
            self._say_why(row, "waiting behind job %d (first in line for GPUs)" % turn["blocked"])
            return
        if self.lock_error:
            turn["blocked"] = row["id"]
            self._say_why(row, "waiting: %s" % self.lock_error)
            return
        if turn["units"] is None:
            turn["units"] = self._units(cfg, self.lock_dir)
        fds, uuids = [], []
        try:
            for u in turn["units"]:
                if len(uuids) == n:
                    break
                if u["state"] != "free" or u["uuid"] in self.taken:
                    continue
                fd = leases.try_acquire(self.lock_dir, u["uuid"])
                if fd is None:
                    continue
                fds.append(fd)
                uuids.append(u["uuid"])
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if len(uuids) == n:
            self.taken.update(uuids)
            self.start(row, uuids, fds)
        else:
            for fd in fds:
                os.close(fd)
            turn["blocked"] = row["id"]
            self._say_why(row, self._why_waiting(n, turn["units"], self.lock_dir))

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
            _append_log(self.home, row["id"], "rtrain: could not start the job: %s: %s\n" % (
                type(e).__name__, e))
            with db.Tx(self.con):
                self.con.execute("UPDATE jobs SET state='failed', ended_at=?, message=? WHERE id=? AND "
                                 "state='queued'", (time.time(), "rtrain could not start it: %s: %s" % (
                                     type(e).__name__, e), row["id"]))
        except Exception:  # noqa: BLE001 - the database itself is in trouble: next pass
            traceback.print_exc()

    def _prepared(self, row):
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
            home, argv = self.home, self.agent_argv
            self.builders[job_id] = workdirs.spawn(home, job_id, self.own_fds, lambda: poke(home, argv))
        return False

    def _fail_unbuilt(self, row, why):
        _append_log(self.home, row["id"], "rtrain: cannot build the job's work dir: %s\n" % why)
        with db.Tx(self.con):
            self.con.execute("UPDATE jobs SET state='failed', ended_at=?, message=? WHERE id=? AND "
                             "state='queued'", (time.time(), "cannot build its work dir: %s" % why,
                                                row["id"]))

    def _why_waiting(self, n, units, lock_dir):
        if self.error:
            return "waiting: cannot read the GPUs: %s" % self.error
        if not units:
            return "waiting: nvidia-smi lists no GPUs"
        free = sum(1 for u in units if u["state"] == "free" and not leases.is_held(lock_dir, u["uuid"]))
        unknown = sum(1 for u in units if u["state"] == "unknown")
        return "waiting for %d GPU%s: %d of %d free%s" % (
            n, "" if n == 1 else "s", free, len(units),
            ", %d unknown (see rtrain gpus)" % unknown if unknown else "")

    def _say_why(self, row, message):
        """Tell `rtrain status` why a queued job waits (written only when it changes)."""
        if row["message"] != message:
            self.con.execute("UPDATE jobs SET message=? WHERE id=? AND state='queued'",
                             (message, row["id"]))

    def _units(self, cfg, lock_dir):
        """nvidia-smi's view (see the module's doc for when it is asked again)."""
        if self.units is not None and time.monotonic() - self.units_at < SNAPSHOT_MAX_AGE_S \
                and cfg == self.units_cfg:
            view = tuple(leases.is_held(lock_dir, u["uuid"]) for u in self.units)
            if not any(was and not now and u["state"] != "free"
                       for u, was, now in zip(self.units, self.lease_view, view)):
                return self.units
        sessions = {r["wrapper_pid"] for r in
                    self.con.execute("SELECT wrapper_pid FROM jobs WHERE state='running'")
                    if r["wrapper_pid"]}
        self.units, self.error = gpu_units(cfg, sessions)
        if self.error is None:
            inventory.save(self.home, inventory.key(cfg), len(self.units))
        else:
            inventory.forget(self.home)  # let the next submit ask, and say what is wrong
        self.units_at = time.monotonic()
        self.units_cfg = cfg
        self.lease_view = tuple(leases.is_held(lock_dir, u["uuid"]) for u in self.units)
        return self.units

    def serve(self):
        """The daemon's loop. Returns when idle for IDLE_EXIT_S, or at once if another daemon runs."""
        lock = os.open(self.home.daemon_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _lock_soon(lock):
            os.close(lock)
            return 0
        self.own_fds.append(lock)
        os.ftruncate(lock, 0)
        os.write(lock, str(os.getpid()).encode())
        try:
            os.mkfifo(self.home.daemon_fifo, 0o600)
        except FileExistsError:
            pass
        stop = []

        def on_term(signum, frame):  # finish the pass at hand, then go (never mid-transaction)
            stop.append(signum)
            try:
                os.write(keep, b"x")
            except OSError:
                pass

        rfd = keep = None
        try:
            while True:
                if rfd is None:
                    rfd = os.open(self.home.daemon_fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    keep = os.open(self.home.daemon_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    self.own_fds += [rfd, keep]
                    signal.signal(signal.SIGTERM, on_term)
                    idle_since = time.monotonic()
                if stop:
                    return 0
                try:
                    self.reap()
                    reconcile(self.con, self.home)
                    waiting = self.schedule()
                    rows = db.active(self.con)
                except Exception:  # noqa: BLE001 - a bad pass must not stop the queue
                    traceback.print_exc()
                    sys.stderr.flush()
                    waiting, rows = False, [None]
                    time.sleep(0.5)
                if rows:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE_EXIT_S:
                    # Stop listening first, then look once more: a submit that committed before
                    # its poke found no reader is seen here, or its poke starts a new daemon,
                    # which waits for our lock (_lock_soon).
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    self._close_fifo(rfd, keep)
                    rfd = keep = None
                    if not db.active(self.con):
                        return 0
                    continue
                if waiting:
                    timeout = 0.2
                    self._listen_for_others()
                elif any(r is None or r["state"] == "running" for r in rows):
                    timeout = 1.0
                else:
                    timeout = 5.0
                fds = [rfd] + ([self.waiter[0]] if self.waiter else [])
                ready, _, _ = select.select(fds, [], [], timeout)
                for fd in ready:
                    _drain(fd)
        finally:
            if rfd is not None:
                self._close_fifo(rfd, keep)
            self._stop_listening()

    def _close_fifo(self, rfd, keep):
        for fd in (rfd, keep):
            self.own_fds.remove(fd)
            os.close(fd)

    def _listen_for_others(self):
        """While jobs wait for GPUs, listen for other users' jobs freeing them (leases.py)."""
        if self.lock_dir is None:
            return
        path = leases.waiter_path(self.lock_dir, self.home.root)
        if self.waiter is not None and self.waiter[2] == path:
            return
        self._stop_listening()
        fds = leases.open_waiter(path)
        if fds is not None:
            self.waiter = (fds[0], fds[1], path)
            self.own_fds += list(fds)

    def _stop_listening(self):
        if self.waiter is None:
            return
        r, w, path = self.waiter
        self.waiter = None
        for fd in (r, w):
            self.own_fds.remove(fd)
            os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass

    def start(self, row, uuids, fds):
        """Mark the job running and fork its wrapper (runner.py), which takes over the lease fds.
        The wrapper's pid is recorded just after; reconcile() copes with a daemon killed between
        the two (it adopts the pids the wrapper wrote, or queues a job that never started)."""
        job_id = row["id"]
        try:
            with db.Tx(self.con):
                cur = db.get(self.con, job_id)
                if cur["state"] != "queued":
                    raise _NotQueued()
                if row["attempts"] > 0:
                    _append_log(self.home, job_id, "rtrain: attempt %d of %d\n" % (
                        row["attempts"] + 1, row["retries"] + 1))
                self.con.execute(
                    "UPDATE jobs SET state='running', gpus=?, started_at=?, ended_at=NULL, exit_code=NULL,"
                    " signal=NULL, message='', attempts=attempts+1, boot_id=?, wrapper_pid=NULL,"
                    " wrapper_start=NULL WHERE id=?",
                    (json.dumps(uuids), time.time(), fsutil.boot_id(), job_id))
            env = fsutil.read_json(self.home.env_file(job_id))
            spec = {"id": job_id, "command": row["command"],
                    "env": env if isinstance(env, dict) else json.loads(row["env"] or "{}"),
                    "grace": row["grace"], "gpus": uuids, "lock_dir": self.lock_dir}
            home, argv = self.home, self.agent_argv
            pid = os.fork()
            if pid == 0:
                runner.run_wrapper(home, spec, fds, lambda: poke(home, argv), self.own_fds)
        except _NotQueued:
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.con.execute("UPDATE jobs SET wrapper_pid=?, wrapper_start=? WHERE id=?",
                         (pid, fsutil.proc_start_time(pid), job_id))

    def reap(self):
        """Collect ended children (job wrappers, builders); forget the builders among them."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for job_id, b in list(self.builders.items()):
                if b == pid:
                    del self.builders[job_id]
                    self.built[job_id] = pid


def _lock_soon(fd, wait_s=2.0):
    """Take the daemon lock; wait a little for it: a daemon that is exiting (it stopped reading
    its FIFO, which is why we were started) lets go of it in milliseconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


class _NotQueued(Exception):
    """The job left the queue (cancelled) between the pass and its start."""


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
