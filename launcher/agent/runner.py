"""Start one job detached: its own session, its snapshot as cwd, its log, its exit status.

The daemon forks; the child (the wrapper) calls run_wrapper(), which never returns. The
wrapper starts the user's command in a process group of its own, holds the GPU lease fds
(and passes them to the command, so the lease lives as long as any of the job's processes),
forwards a cancel to that group (SIGTERM, then SIGKILL once the grace period is over, unless
the whole group ended before), and writes exit.json atomically when the command ends, into
room it reserved before the job started (a job that fills the disk still gets its exit
recorded). Nothing here talks to the database.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

from . import containerhost, containers, fsutil, jobcontainer, jobprocs, leases, runtime

SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
# The job gets a process group of its own (cancel signals the group). process_group= (3.11+)
# lets subprocess use vfork; preexec_fn forces a slower fork.
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def fixed_vars(job_id, gpu_uuids):
    """rtrain's own variables of a job, set after the user's."""
    # CUDA_VISIBLE_DEVICES is always set, even for CPU jobs: an empty value hides every GPU.
    return [("RTRAIN_JOB_ID", str(job_id)), ("PYTHONUNBUFFERED", "1"),
            ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"), ("CUDA_VISIBLE_DEVICES", ",".join(gpu_uuids))]


def job_env(base, job_id, gpu_uuids, extra):
    env = dict(base)
    env.update(extra or {})
    env.update(fixed_vars(job_id, gpu_uuids))
    return env


def run_wrapper(home, job, lock_fds, poke, close_fds=()):
    """Never returns. `job` is a dict with id, command, env, grace, gpus (UUIDs).
    close_fds: the daemon's own descriptors (its lock above all), which must not outlive it here."""
    code = 1
    try:
        state = {"child": None, "cancelled": False, "term_at": None,
                 "tag": jobprocs.tag(home.root, job["id"]), "procs": {}}
        grace = max(1, int(round(job.get("grace", 10))))

        def on_term(signum, frame):
            state["cancelled"] = True
            if state["child"] is not None and state["term_at"] is None:
                state["term_at"] = time.monotonic()
                if state.get("container"):
                    # the engine stops it: SIGTERM, SIGKILL after the grace period
                    _container_stop(state["container"], grace)
                    signal.signal(signal.SIGALRM, lambda s, f: _container_kill(state))
                    signal.alarm(grace + CONTAINER_STOP_SLACK_S)
                    return
                _killpg(state["child"], signal.SIGTERM)
                # and its processes that left the group (setsid, double fork: jobprocs.py)
                jobprocs.signal_all(state["tag"], state["procs"], signal.SIGTERM)
                signal.signal(signal.SIGALRM, lambda s, f: _killpg(state["child"], signal.SIGKILL))
                signal.alarm(grace)

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
        code = _wrap(home, job, lock_fds, poke, state, grace)
    finally:
        os._exit(code)


# The exit record must be writable when the job has filled the disk: the wrapper reserves its
# room (EXIT_ROOM bytes of spaces) before the job starts, and writes the JSON over it in place
# (JSON allows the trailing spaces), then renames it to exit.json. Overwriting reserved blocks
# needs no new space on ext4/xfs/tmpfs; on a copy-on-write file system (btrfs, zfs) it may.
EXIT_ROOM = 4096


def _reserve_exit(path):
    """An open fd on `path` holding EXIT_ROOM bytes of spaces, or None if there is no room."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC |
                     getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError:
        return None
    try:
        room = b" " * EXIT_ROOM
        while room:
            room = room[os.write(fd, room):]
        # Blocks really allocated, not only reserved by delayed allocation. (No fsync: the room
        # matters, not its durability, and a journal commit here would delay the job's start.)
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, EXIT_ROOM)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        return fd
    except OSError:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None


def _write_exit(home, job_id, reserved, record):
    """exit.json, at once (no fsync: the caller makes it durable off its hot path)."""
    data = json.dumps(record).encode()
    if reserved is not None and len(data) <= EXIT_ROOM:
        try:
            os.pwrite(reserved, data, 0)
            os.rename(home.job(job_id).exit_pending, home.job(job_id).exit)
            return
        except OSError:
            pass
    fsutil.write_json_atomic(home.job(job_id).exit, record, durable=False)


def _write_best_effort(path, obj):
    """pid.json and the like: nice to have, never a reason to leave a running job."""
    try:
        fsutil.write_json_atomic(path, obj, durable=False)
    except (OSError, ValueError):
        try:
            os.unlink("%s.tmp%d" % (path, os.getpid()))
        except OSError:
            pass


def _wrap(home, job, lock_fds, poke, state, grace=10):
    job_id = job["id"]
    try:
        log_fd = os.open(home.job(job_id).log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
    except OSError:
        log_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    reserved = _reserve_exit(home.job(job_id).exit_pending)
    if os.path.exists(home.job(job_id).cancel):
        state["cancelled"] = True
    try:
        if state["cancelled"]:
            _log(log_fd, "rtrain: cancelled before it started\n")
            _write_exit(home, job_id, reserved, {
                "exit_code": None, "signal": None, "ended_at": time.time(), "cancelled": True})
            poke()
            return _durable(home, job_id, reserved)
        # the job's variables expanded, its environment activated, its shell (runtime.py)
        # with the tag every descendant inherits (jobprocs.py)
        fixed = fixed_vars(job_id, job["gpus"]) + [(jobprocs.TAG_VAR, state["tag"])]
        argv, env = runtime.job_process(home, job, fixed)
        if job.get("container"):
            argv, env, state["container"] = _container_command(home, job)
            env[jobprocs.TAG_VAR] = state["tag"]  # the engine's client is the job's (not the container)
        cgroup = _enter_cgroup(state["tag"])
        try:
            child = subprocess.Popen(
                argv, cwd=home.job(job_id).work, env=env,
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                pass_fds=tuple(lock_fds), close_fds=True, **_OWN_GROUP)
        finally:
            cgroup = _leave_cgroup(cgroup)
    except containers.ContainerError as e:
        _log(log_fd, e.lines())
        _write_exit(home, job_id, reserved, {
            "exit_code": CONTAINER_CANNOT_RUN, "signal": None, "ended_at": time.time(),
            "cancelled": state["cancelled"], "message": e.message})
        poke()
        return _durable(home, job_id, reserved)
    except (OSError, ValueError) as e:  # ValueError: a variable subprocess refuses
        _log(log_fd, "rtrain: cannot start the job: %s\n" % e)
        _write_exit(home, job_id, reserved, {
            "exit_code": 127, "signal": None, "ended_at": time.time(), "cancelled": state["cancelled"]})
        poke()
        return _durable(home, job_id, reserved)
    state["procs"] = {"pgid": child.pid, "sid": os.getsid(0), "cgroup": cgroup,
                      "pgid_start": fsutil.proc_start_time(child.pid),
                      "sid_start": fsutil.proc_start_time(os.getsid(0))}
    _write_best_effort(home.job(job_id).pids, dict(state["procs"], **{
        "wrapper_pid": os.getpid(), "wrapper_start": fsutil.proc_start_time(os.getpid()),
        "tag": state["tag"],
        "boot_id": fsutil.boot_id(), "started_at": time.time()}))
    state["child"] = child.pid
    if state["cancelled"]:
        os.kill(os.getpid(), signal.SIGTERM)  # a cancel that came during the start
    rc = child.wait()
    if state["term_at"] is not None:
        # Cancelled: the grace period is the whole group's, not only its first process's (a
        # child may still be writing its checkpoint). SIGALRM ends it at the latest.
        deadline = state["term_at"] + grace
        while time.monotonic() < deadline and _group_alive(child.pid):
            time.sleep(0.05)
        # and every process it started goes, wherever it went (jobprocs.py), before the lease
        # descriptors are let go: the GPU is free only once the last of them is gone
        while time.monotonic() < deadline and jobprocs.find(state["tag"], state["procs"]):
            time.sleep(0.05)
        jobprocs.end_all(state["tag"], state["procs"])
    signal.alarm(0)
    # The command is done; anything it left running in its group goes with it.
    _killpg(child.pid, signal.SIGKILL)
    if state["term_at"] is None:
        _note_leftovers(log_fd, job_id, state)
    os.close(log_fd)
    jobprocs.remove_cgroup(state["procs"].get("cgroup"))  # if empty
    if state.get("container"):
        # the GPU leases last as long as the container: it is gone before they are let go
        jobcontainer.gone(state["container"], rc, state["cancelled"], home, job_id)
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
    _write_exit(home, job_id, reserved, {
        "exit_code": rc, "signal": sig, "ended_at": time.time(),
        "cancelled": state["cancelled"] or os.path.exists(home.job(job_id).cancel)})
    poke()
    if lock_fds and job.get("lock_dir"):
        # other users' daemons waiting for these GPUs (ours was poked above)
        leases.wake_waiters(job["lock_dir"], skip=leases.waiter_path(job["lock_dir"], home.root))
    return _durable(home, job_id, reserved)


def _enter_cgroup(job_tag):
    """The job's own cgroup (jobprocs.py) with this wrapper in it, so that the command is born
    there; or None where there is none to have."""
    cgroup = jobprocs.make_cgroup(job_tag)
    if cgroup is not None and not jobprocs.move(cgroup):
        jobprocs.remove_cgroup(cgroup)
        return None
    return cgroup


def _leave_cgroup(cgroup):
    """Move the wrapper back out of the job's cgroup (ending the cgroup must not end the
    wrapper, which records the exit). If it cannot, the cgroup is not the job's alone: None."""
    if cgroup is None or jobprocs.move(os.path.dirname(cgroup)):
        return cgroup
    return None


def _note_leftovers(log_fd, job_id, state):
    """The command ended normally, but processes it daemonized (setsid, double fork) still
    run: they keep its GPU leases. Say so in the log (and `status JOB`, `gpus` say so live)."""
    left = jobprocs.find(state["tag"], state["procs"], skip_pgid=state["child"])
    if left:
        _log(log_fd, "rtrain: the job's command ended but left %d process(es) running: %s; they "
             "keep the job's GPUs until they end (`rtrain cancel %s` ends them)\n" % (
                 len(left), jobprocs.describe(left), job_id))


# A container job: its command is `ENGINE run ...` (agent/containers.py), attached, so its
# output is the job's log and its exit status the job's. A cancel asks the engine to stop the
# container; the engine's own SIGKILL comes after the grace period, ours a little later.
CONTAINER_CANNOT_RUN = 125  # the engines' own code for "could not run the container"
CONTAINER_STOP_SLACK_S = 5


def _container_command(home, job):
    """(argv, env, (engine binary, container name, env)) of a container job (jobcontainer.py)."""
    return jobcontainer.command(home, job, fixed_vars(job["id"], job["gpus"]))


def _container_stop(container, grace):
    engine_bin, name, env = container
    try:
        subprocess.Popen(containers.stop_argv(engine_bin, name, grace), env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True)
    except OSError:
        pass


def _container_kill(state):
    engine_bin, name, env = state["container"]
    containerhost.engine_call(containers.kill_argv(engine_bin, name), env, timeout=10)
    _killpg(state["child"], signal.SIGKILL)


def _durable(home, job_id, reserved):
    """Make the exit record durable (after the daemon heard of it: off the hand-off path)."""
    if reserved is not None:
        os.close(reserved)
    fsutil.fsync_path(home.job(job_id).exit)
    fsutil.fsync_path(home.job(job_id).dir)
    return 0


def _log(fd, text):
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    except OSError:
        pass


def _group_alive(pgid):
    """True while a process of group pgid runs (zombies don't count: they may linger until
    init reaps them)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        names = None
    if names is None or not os.path.exists("/proc/self/stat"):
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        try:
            if int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
                return True
        except (IndexError, ValueError):
            continue
    return False


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def read_exit(home, job_id):
    return fsutil.read_json(home.job(job_id).exit)


def read_pids(home, job_id):
    return fsutil.read_json(home.job(job_id).pids) or {}

