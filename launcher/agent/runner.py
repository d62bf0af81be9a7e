"""Start one job detached: its own session, its snapshot as cwd, its log, its exit status.

The daemon forks; the child (the wrapper) calls run_wrapper(), which never returns. The
wrapper starts the user's command in a process group of its own, holds the GPU lease fds
(and passes them to the command, so the lease lives as long as any of the job's processes),
forwards a cancel (SIGTERM, then SIGKILL after the grace period) to that group, and writes
exit.json atomically when the command ends. Nothing here talks to the database.
"""
import os
import signal
import subprocess
import sys
import time

from . import fsutil, leases

SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
# The job gets a process group of its own (cancel signals the group). process_group= (3.11+)
# lets subprocess use vfork; preexec_fn forces a slower fork.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def job_env(base, job_id, gpu_uuids, extra):
    env = dict(base)
    env.update(extra or {})
    env["RTRAIN_JOB_ID"] = str(job_id)
    env["PYTHONUNBUFFERED"] = "1"
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    # Always set, even for CPU jobs: an empty value hides every GPU from CUDA.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_uuids)
    return env


def run_wrapper(home, job, lock_fds, poke, close_fds=()):
    """Never returns. `job` is a dict with id, command, env, grace, gpus (UUIDs).
    close_fds: the daemon's own descriptors (its lock above all), which must not outlive it here."""
    code = 1
    try:
        state = {"child": None, "cancelled": False}

        def on_term(signum, frame):
            state["cancelled"] = True
            if state["child"] is not None:
                _killpg(state["child"], signal.SIGTERM)
                signal.signal(signal.SIGALRM, lambda s, f: _killpg(state["child"], signal.SIGKILL))
                signal.alarm(max(1, int(round(job.get("grace", 10)))))

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        code = _wrap(home, job, lock_fds, poke, state)
    finally:
        os._exit(code)


def _wrap(home, job, lock_fds, poke, state):
    job_id = job["id"]
    log_fd = os.open(home.log(job_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = job_env(os.environ, job_id, job["gpus"], job.get("env"))
    if os.path.exists(home.cancel_file(job_id)):
        state["cancelled"] = True
    try:
        if state["cancelled"]:
            raise OSError("cancelled before it started")
        child = subprocess.Popen(
            [SHELL, "-c", job["command"]], cwd=home.work(job_id), env=env,
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
            pass_fds=tuple(lock_fds), close_fds=True, **_OWN_GROUP)
    except OSError as e:
        os.write(log_fd, ("rtrain: cannot start the job: %s\n" % e).encode())
        fsutil.write_json_atomic(home.exit_file(job_id), {
            "exit_code": 127, "signal": None, "ended_at": time.time(), "cancelled": state["cancelled"]})
        poke()
        return 0
    os.close(log_fd)
    fsutil.write_json_atomic(home.pid_file(job_id), {
        "wrapper_pid": os.getpid(), "wrapper_start": fsutil.proc_start_time(os.getpid()),
        "pgid": child.pid, "pgid_start": fsutil.proc_start_time(child.pid),
        "boot_id": fsutil.boot_id(), "started_at": time.time()})

    state["child"] = child.pid
    if state["cancelled"]:
        os.kill(os.getpid(), signal.SIGTERM)  # a cancel that came during the start
    rc = child.wait()
    signal.alarm(0)
    # The command is done; anything it left running in its group goes with it.
    _killpg(child.pid, signal.SIGKILL)
    for fd in lock_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    sig = None
    if rc < 0:
        sig = signal.Signals(-rc).name
        rc = 128 - rc
    # Tell the daemon first (the next job waits on it), make the record durable after.
    fsutil.write_json_atomic(home.exit_file(job_id), {
        "exit_code": rc, "signal": sig, "ended_at": time.time(),
        "cancelled": state["cancelled"] or os.path.exists(home.cancel_file(job_id))}, durable=False)
    poke()
    if lock_fds and job.get("lock_dir"):
        # other users' daemons waiting for these GPUs (ours was poked above)
        leases.wake_waiters(job["lock_dir"], skip=leases.waiter_path(job["lock_dir"], home.root))
    fsutil.fsync_path(home.exit_file(job_id))
    fsutil.fsync_path(home.job_dir(job_id))
    return 0


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def read_exit(home, job_id):
    return fsutil.read_json(home.exit_file(job_id))


def read_pids(home, job_id):
    return fsutil.read_json(home.pid_file(job_id)) or {}

