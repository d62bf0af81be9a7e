"""The per-user scheduler daemon: one instance per RTRAIN_HOME, guarded by a lock.

Event-driven: a submit or a finishing job writes a byte to the daemon's FIFO, which wakes it at
once. While a job waits for GPUs held by someone else, the daemon re-tries the leases every
0.2 s (cheap: non-blocking flocks) and listens for other users' jobs freeing GPUs (leases.py).
Placement is scheduler.py's; state changes after a start are jobstate.py's.

The daemon started by one agent build is replaced when another build pokes it (an rtrain
upgrade, or two laptops with different versions): the lock file names the argv it was started
with, and poke() asks a daemon of another build to finish its pass and go.
"""
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback

from . import db, detach, fsutil, jobcontainer, jobprocs, leases, logind, runner, store
from .jobstate import append_log, reconcile
from .scheduler import Scheduler

IDLE_EXIT_S = float(os.environ.get("RTRAIN_DAEMON_IDLE_S", "600"))
OTHERS_WAKE_GAP_S = 0.05


# ---------------------------------------------------------------- waking the daemon

def poke(home, spawn_argv=None):
    """Wake the daemon. If none is running (or one of another agent build) and spawn_argv is
    given, start one. True if a daemon of this build was woken."""
    info = daemon_info(home) if spawn_argv else None
    if info and info.get("argv") not in (None, list(spawn_argv)) and running(home):
        try:
            os.kill(int(info["pid"]), signal.SIGTERM)  # it ends its pass, then lets go of the lock
        except (OSError, TypeError, ValueError):
            pass
        spawn(home, spawn_argv)
        return False
    if fsutil.poke_fifo(home.daemon_fifo):
        return True
    if spawn_argv:
        spawn(home, spawn_argv)
    return False


def running(home):
    """True if a daemon holds the lock for this home."""
    return fsutil.flock_held(home.daemon_lock, create=True)


def daemon_info(home):
    """{"pid", "argv"} of the daemon that last held the lock ({"pid"} alone from an older
    agent), or None."""
    try:
        with open(home.daemon_lock) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if isinstance(info, int):
        return {"pid": info}
    return info if isinstance(info, dict) else None


def daemon_pid(home):
    info = daemon_info(home) or {}
    return info.get("pid") or None


def spawn(home, argv):
    """Start a daemon detached from us (own session, stdio to its log): it outlives ssh."""
    detach.start(argv, "daemon", home, home.daemon_log)


# ---------------------------------------------------------------- the daemon

class Daemon(Scheduler):
    def __init__(self, home, agent_argv):
        Scheduler.__init__(self, home, home.open_db(), store.Store(home.store))
        self.agent_argv = agent_argv
        self.waiter = None      # (read fd, write fd, path): wake-ups from others' jobs

    def poke_self(self):
        poke(self.home, self.agent_argv)

    def serve(self):
        """The daemon's loop. Returns when idle for IDLE_EXIT_S, or at once if another daemon runs."""
        if self._moved_into_scope():
            return 0
        lock = os.open(self.home.daemon_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _lock_soon(lock):
            os.close(lock)
            return 0
        self.own_fds.append(lock)
        os.ftruncate(lock, 0)
        os.write(lock, json.dumps({"pid": os.getpid(), "argv": list(self.agent_argv)}).encode())
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
        others_woke = 0.0
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
                elif any(r is None or r["state"] == "running" for r in rows) or \
                        (self.prep is not None and self.prep.busy()):  # builds: say progress
                    timeout = 1.0
                else:
                    # the wake FIFO in the shared lease dir says "a daemon waits for GPUs" (the
                    # monitor's autostop reads it): it is there only while one does
                    self._stop_listening()
                    timeout = 1.0 if any(r is None or r["state"] == "running" for r in rows) else 5.0
                fds = [rfd] + ([self.waiter[0]] if self.waiter else [])
                ready, _, _ = select.select(fds, [], [], timeout)
                for fd in ready:
                    _drain(fd)
                if ready and rfd not in ready:
                    # woken through the shared lock dir alone, which anyone can write to: a
                    # flood of such wake-ups must not turn into a busy loop (the first is
                    # served at once)
                    now = time.monotonic()
                    if now - others_woke < OTHERS_WAKE_GAP_S:
                        time.sleep(OTHERS_WAKE_GAP_S - (now - others_woke))
                    others_woke = time.monotonic()
        finally:
            if rfd is not None:
                self._close_fifo(rfd, keep)
            self._stop_listening()

    def _moved_into_scope(self):
        """Start this daemon again in a scope of the user's systemd manager, out of the ssh
        session logind may end (logind.py), and leave the lock to it: True once it holds it.
        False where there is no user manager, or it could not be done: this one serves."""
        argv = logind.scope_argv(list(self.agent_argv) + ["daemon"],
                                 "rtrain-daemon-" + jobprocs.tag(self.home.root, os.getpid()))
        if argv is None:
            return False
        try:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, close_fds=True,
                                 env=dict(detach.environment(self.home), **{logind.IN_SCOPE_VAR: "1"}))
            p.stdin.write(json.dumps({"home": self.home.root}).encode() + b"\n")
            p.stdin.close()
        except OSError:
            return False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if p.poll() is not None:
                if p.returncode == 0:
                    return True  # it served and is done already
                sys.stderr.write("rtrain: could not start the daemon in a systemd user scope "
                                 "(%s exited %d); it runs in the ssh session\n" % (argv[0], p.returncode))
                return False
            if running(self.home):
                return True
            time.sleep(0.02)
        return False

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

    def start(self, row, uuids, fds, lock_dir=None):
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
                    append_log(self.home, job_id, "rtrain: attempt %d of %d\n" % (
                        row["attempts"] + 1, row["retries"] + 1))
                self.con.execute(
                    "UPDATE jobs SET state='running', gpus=?, started_at=?, ended_at=NULL, exit_code=NULL,"
                    " signal=NULL, message='', attempts=attempts+1, boot_id=?, wrapper_pid=NULL,"
                    " wrapper_start=NULL WHERE id=?",
                    (json.dumps(uuids), time.time(), fsutil.boot_id(), job_id))
            env = fsutil.read_json(self.home.job(job_id).env)
            env = dict(env if isinstance(env, dict) else {}, **json.loads(row["vars"] or "{}"))  # a point's
            spec = {"id": job_id, "command": row["command"], "env": env,
                    "grace": row["grace"], "gpus": uuids, "lock_dir": lock_dir,
                    "container": jobcontainer.spec(self.home, job_id)}
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
            if self.prep is not None:
                self.prep.ended(pid)  # a data tree's or an environment's builder (prepare.py)


def _lock_soon(fd, wait_s=5.0):
    """Take the daemon lock; wait a little for it: a daemon that is exiting (it stopped reading
    its FIFO, which is why we were started) lets go of it in milliseconds."""
    return fsutil.flock_within(fd, wait_s)


class _NotQueued(Exception):
    """The job left the queue (cancelled) between the pass and its start."""


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
