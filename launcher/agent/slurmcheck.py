"""What `rtrain hosts` checks on a Slurm login node (the `hello` of the Slurm backend): Slurm's
commands on PATH, the cluster answering (its GPUs per node, of the host's partition), which
squeue format serves, the container tool named in hosts.yaml, and that the compute nodes see
RTRAIN_HOME: a tiny job (slurmwrap.FSCHECK, with the host's partition, account, qos...) copies a
random token there. The job may wait in a busy queue: the check waits FSCHECK_WAIT_S, then says
so and looks at that job's result on the next `rtrain hosts`; a success is remembered for a day
(slurm/fscheck.json). Standard library only, Python >= 3.8.
"""
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time

from . import fsutil, slurm, slurmjobs
from .protocol import AgentError

COMMANDS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
FSCHECK_WAIT_S = 20.0
FSCHECK_FRESH_S = 86400.0
CHECK_KEYS = ("partition", "account", "qos", "constraint", "mem")


def report(ctx, settings):
    """{"commands": {name: path|None}, "path", "version", "nodes" | "error", "squeue",
    "fscheck": {"ok": True|False|None, "detail", ...}, "container": {...}|None}."""
    out = {"commands": {n: shutil.which(n) for n in COMMANDS}, "path": os.environ.get("PATH", ""),
           "version": None, "nodes": None, "error": None, "squeue": None, "fscheck": None,
           "container": _container(settings.get("container_engine"))}
    if not all(out["commands"].values()):
        return out
    try:
        rc, text, _ = slurmjobs.run(["sinfo", "--version"], timeout=20)
        out["version"] = text.strip() or None
        out["nodes"] = slurmjobs.gpus(partition=settings.get("partition"))
        mode = settings.get("squeue_format") or "auto"
        out["squeue"] = {"setting": mode, "json": slurmjobs.json_works(ctx.home)}
        out["fscheck"] = shared_fs(ctx.home, settings, float(ctx.req.get("fscheck_wait", FSCHECK_WAIT_S)))
    except AgentError as e:
        out["error"] = e.message
    return out


def _container(engine):
    if not engine:
        return None
    if engine == "pyxis":
        try:
            p = subprocess.run(["srun", "--help"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=20)
            found = b"--container-image" in p.stdout
        except (OSError, subprocess.SubprocessError):
            found = False
        return {"engine": engine, "found": found, "what": "srun --container-image (pyxis)"}
    return {"engine": engine, "found": shutil.which(engine) is not None, "what": engine}


def shared_fs(home, settings, wait_s=FSCHECK_WAIT_S):
    """{"ok": True|False|None, "detail", "job", "node", "cached"}: does a compute node see home?"""
    d = slurmjobs.slurm_dir(home)
    cache = os.path.join(d, "fscheck.json")
    opts = {k: settings.get(k) for k in CHECK_KEYS if settings.get(k) not in (None, "")}
    opts["sbatch_args"] = list(settings.get("sbatch_args") or ())
    key = hashlib.sha256(json.dumps([home.root, opts], sort_keys=True).encode()).hexdigest()[:16]
    rec = fsutil.read_json(cache) or {}
    if rec.get("key") == key and rec.get("ok") and time.time() - rec.get("at", 0) < FSCHECK_FRESH_S:
        return dict(rec, cached=True)
    if rec.get("key") == key and rec.get("pending") and os.path.isdir(rec.get("dir", "")):
        folder, sid = rec["dir"], rec["pending"]
    else:
        folder, sid = _submit_check(home, d, opts)
    deadline = time.monotonic() + wait_s
    asked = 0.0
    while True:
        res = _seen(folder, sid, home)
        if res is None and time.monotonic() - asked >= 1.0:  # squeue once a second, not 5 times
            asked = time.monotonic()
            res = _ended(folder, sid, home, settings)
        if res is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if res is None:
        view = slurmjobs.query(home, [sid], mode=settings.get("squeue_format") or "auto").get(sid) or {}
        fsutil.write_json_atomic(cache, {"key": key, "pending": sid, "dir": folder, "at": time.time()},
                                 durable=False)
        return {"ok": None, "job": sid, "detail": "the check job %s still waits (%s); `rtrain hosts` "
                "looks at its result next time" % (sid, view.get("reason") or view.get("state") or "?")}
    shutil.rmtree(folder, ignore_errors=True)
    res.update(key=key, at=time.time(), job=sid)
    fsutil.write_json_atomic(cache, res, durable=False)
    return res


def _submit_check(home, d, opts):
    script = slurmjobs.ensure_script(home, slurm.FSCHECK_NAME, slurm.FSCHECK)
    folder = tempfile.mkdtemp(prefix="fscheck-", dir=d)
    with open(os.path.join(folder, "token"), "w") as f:
        f.write(os.urandom(16).hex())
    spec = dict(opts, wrapper=script, folder=folder, output=os.path.join(folder, "out"),
                chdir=folder, name="rtrain-check", gpus=0, time="1")
    try:
        argv = slurm.sbatch_argv(spec)
    except ValueError as e:
        raise AgentError("bad_request", str(e))
    rc, out, err = slurmjobs.run(argv)
    if rc != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise AgentError("sbatch_refused", "sbatch refused the check job: %s" % slurm.slurm_error(
            err, "sbatch failed (exit %d)" % rc))
    return folder, slurm.parse_sbatch(out)


def _read(folder, name):
    try:
        with open(os.path.join(folder, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def _seen(folder, sid, home):
    """The check's success once its job has copied the token, else None."""
    token, seen = _read(folder, "token"), _read(folder, "seen")
    if seen is None or seen != token:
        return None
    node = _read(folder, "node")
    return {"ok": True, "node": node, "detail": "compute node %s sees %s (check job %s)" % (
        node, home.root, sid)}


def _ended(folder, sid, home, settings):
    """The check's failure once its job ended without copying the token, else None."""
    view = slurmjobs.query(home, [sid], mode=settings.get("squeue_format") or "auto").get(sid)
    if view is not None and view["state"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        return None
    time.sleep(0.5)  # what the job wrote may reach this node a moment after Slurm says it ended
    if _seen(folder, sid, home) is not None:
        return _seen(folder, sid, home)
    return {"ok": False, "node": (view or {}).get("nodes"), "detail": "the check job %s ended (%s on "
            "%s) without seeing %s from there" % (sid, view["state"] if view else "gone",
                                                   (view or {}).get("nodes") or "?", home.root)}
