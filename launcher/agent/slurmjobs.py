"""Slurm, the acting part: submit, status, cancel, GPUs of rtrain jobs on a Slurm cluster, run on
the login node as the user (docs/contracts.md, "Slurm backend"). Commands run as argv, with a
timeout, in the environment the agent was started with (SLURM_CONF and PATH of the ssh session).

A job on Slurm keeps rtrain's folder layout (paths.Home: jobs/N/ with work/, log, exit.json) on
the file system the login node shares with the compute nodes, plus:
    argv0        what the wrapper runs: NUL-separated arguments (bash -c COMMAND, or the login
                 shell, or a container engine's command)
    env.sh       its variables, `export NAME=...` lines that expand $VAR on the compute node (0600)
    slurm.json   {"slurm_job_id": "123" | "123_4", "submitted_at": epoch, "requeue": bool|None}
    start.json   written by the wrapper when the command starts (node, GPUs, time, restarts)
    cancel       rtrain was asked to cancel it
and, shared, slurm/wrapper-HASH.sh (the batch wrapper) and slurm/arrays/A/ (an array's links,
task index -> the job's folder).
"""
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time

from . import fsutil, runtime, slurm
from .protocol import AgentError

TIMEOUT = 60.0   # seconds a Slurm command may take (a busy slurmctld answers slowly)


def run(argv, env=None, timeout=TIMEOUT):
    """(returncode, stdout, stderr) of one Slurm command. A missing command or one that does not
    answer is an AgentError (no_slurm, slurm_timeout)."""
    try:
        p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except FileNotFoundError:
        raise AgentError("no_slurm", "%s is not on PATH on this host" % argv[0],
                         "is this a Slurm login node? `scheduler: slurm` needs sbatch, squeue, "
                         "scancel and sinfo there")
    except subprocess.TimeoutExpired:
        raise AgentError("slurm_timeout", "%s did not answer in %d s" % (argv[0], timeout),
                         "slurmctld may be down or overloaded; try again")
    return (p.returncode, p.stdout.decode("utf-8", "replace"),
            p.stderr.decode("utf-8", "replace"))


def slurm_dir(home):
    d = os.path.join(home.root, "slurm")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def ensure_script(home, name, text):
    """A fixed script of ours in slurm/ (written once per version: its name holds its hash)."""
    path = os.path.join(slurm_dir(home), name)
    if not os.path.exists(path):
        tmp = "%s.tmp%d" % (path, os.getpid())
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    return path


def ensure_wrapper(home):
    """The batch wrapper's path."""
    return ensure_script(home, slurm.WRAPPER_NAME, slurm.WRAPPER)


def env_script(assignments):
    """env.sh: one `export NAME=...` line per (name, raw value), in order, each expanding $VAR
    and ${VAR} when the job's shell reads it on the compute node ($$ is a literal $): the
    quoting of runtime.shell_assignment, so no value is ever read as shell code."""
    out = []
    for k, v in assignments:
        k, v = str(k), str(v)
        if "\0" in v:
            raise AgentError("bad_env", "the value of %s holds a NUL byte" % k)
        try:
            out.append(runtime.shell_assignment(k, v))
        except ValueError:
            raise AgentError("bad_env", "not a valid environment variable: %r" % k)
    return "".join(out).encode("utf-8")


def fixed_vars(job_id):
    """What every job gets (as on a tower: runner.fixed_vars), taken literally. Slurm sets
    CUDA_VISIBLE_DEVICES; the wrapper sets it empty for a job without GPUs."""
    return [("RTRAIN_JOB_ID", str(job_id)), ("PYTHONUNBUFFERED", "1"),
            ("CUDA_DEVICE_ORDER", "PCI_BUS_ID")]


def job_assignments(job):
    """The job's variables in the order they apply: `vars` ([name, raw value]: $VAR expands),
    then `env` ({name: value}, taken literally), then rtrain's own."""
    out = [(k, v) for k, v in job.get("vars") or ()]
    out += [(k, str(v).replace("$", "$$")) for k, v in (job.get("env") or {}).items()]
    return out + [(k, v.replace("$", "$$")) for k, v in fixed_vars(job["id"])]


def prepare(home, job):
    """Write a job's argv0, env.sh and empty log into its folder (which holds work/ already).
    job: {"id": N, "argv": [...] or "command": str (run as bash -c COMMAND), "vars": [[name,
    raw value]], "env": {name: literal value}}."""
    d = home.job(job["id"]).dir
    argv = job.get("argv") or [runtime.SHELL, "-c", job["command"]]
    if not argv or any("\0" in str(a) for a in argv):
        raise AgentError("bad_request", "a job's argv must be strings without NUL bytes")
    fsutil.write_private(os.path.join(d, "argv0"), b"".join(str(a).encode("utf-8") + b"\0" for a in argv))
    fsutil.write_private(os.path.join(d, "env.sh"), env_script(job_assignments(job)))
    fd = os.open(home.job(job["id"]).log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)


def submit(home, jobs, options, env=None):
    """Submit rtrain jobs (their folders built) as one sbatch call: one job, or an array of
    len(jobs) tasks (task i = jobs[i]) when there are several or options["array"] is set.
    options: the keys of slurm.sbatch_argv's spec but wrapper/folder/output/chdir/name/array
    (gpus, gpu_option, partition..., array_limit, after_ok, after_any, requeue, sbatch_args).
    Returns the Slurm ids, one per job ("123", or "123_0", "123_1"...). An sbatch refusal is
    AgentError("sbatch_refused", one line with Slurm's reason)."""
    if not jobs:
        raise AgentError("bad_request", "nothing to submit")
    for job in jobs:
        prepare(home, job)
    spec = {k: v for k, v in options.items() if k not in ("wrapper", "folder", "output", "chdir",
                                                          "name", "array")}
    spec["wrapper"] = ensure_wrapper(home)
    as_array = len(jobs) > 1 or bool(options.get("array"))
    first = jobs[0]["id"]
    if as_array:
        arrays = os.path.join(slurm_dir(home), "arrays")
        os.makedirs(arrays, mode=0o700, exist_ok=True)
        # a new folder per submit (a submit sbatch refused may be tried again with the same jobs)
        arr = tempfile.mkdtemp(prefix="%s-" % first, dir=arrays)
        for i, job in enumerate(jobs):
            os.symlink(home.job(job["id"]).dir, os.path.join(arr, str(i)))
        spec.update(folder=arr, output=os.path.join(arr, "%a", "log"), chdir=arr,
                    array=len(jobs), name=options.get("name") or "rtrain-%s" % first)
    else:
        d = home.job(first).dir
        spec.update(folder=d, output=home.job(first).log, chdir=home.job(first).work, array=None,
                    name=options.get("name") or "rtrain-%s" % first)
    try:
        argv = slurm.sbatch_argv(spec)
    except ValueError as e:
        raise AgentError("bad_request", str(e))
    try:
        rc, out, err = run(argv, env=env)
    except AgentError:
        if as_array:
            shutil.rmtree(spec["folder"], ignore_errors=True)
        raise
    if rc != 0:
        if as_array:
            shutil.rmtree(spec["folder"], ignore_errors=True)
        raise AgentError("sbatch_refused", slurm.slurm_error(err, "sbatch failed (exit %d)" % rc),
                         data={"stderr": err[-2000:]})
    base = slurm.parse_sbatch(out)
    ids = ["%s_%d" % (base, i) for i in range(len(jobs))] if as_array else [base]
    now = time.time()
    for job, sid in zip(jobs, ids):
        fsutil.write_json_atomic(os.path.join(home.job(job["id"]).dir, "slurm.json"),
                                 {"slurm_job_id": sid, "submitted_at": now,
                                  "requeue": options.get("requeue")}, durable=False)
    return ids


def slurm_id(home, job_id):
    rec = fsutil.read_json(os.path.join(home.job(job_id).dir, "slurm.json")) or {}
    return rec.get("slurm_job_id")


# -- the state of many jobs: one squeue call

def _user():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def _json_cache(home, env):
    """Whether `squeue --json` works here: remembered per squeue binary (path, size, mtime) in
    slurm/squeue.json, so a cluster without it costs one failed call, once."""
    exe = None
    path = (env or os.environ).get("PATH", os.defpath)
    for d in path.split(os.pathsep):
        p = os.path.join(d or ".", "squeue")
        if os.access(p, os.X_OK):
            exe = p
            break
    if exe is None:
        raise AgentError("no_slurm", "squeue is not on PATH on this host",
                         "is this a Slurm login node?")
    st = os.stat(exe)
    key = "%s:%d:%d" % (exe, st.st_size, int(st.st_mtime))
    cache = os.path.join(slurm_dir(home), "squeue.json")
    rec = fsutil.read_json(cache) or {}
    return key, cache, (rec.get("json") if rec.get("key") == key else None)


def query(home, slurm_ids, mode="auto", env=None):
    """{slurm id: record} (slurm.py's record shape) for the ids Slurm still knows, with ONE
    squeue call: `squeue --json` (mode "json", or "auto" where it works) filtered here, else the
    text format for this user's jobs (mode "text"). Slurm 22.05 ignores the filters of --json
    and lists every job of the cluster: on a busy cluster the text format is far cheaper
    (bench/slurm.py)."""
    wanted = [s for s in slurm_ids if s]
    if not wanted:
        return {}
    key = cache = None
    if mode == "auto":
        key, cache, works = _json_cache(home, env)
        mode = "text" if works is False else "json"
    if mode == "json":
        rc, out, err = run(slurm.squeue_json_argv(_user()), env=env)
        if rc == 0:
            if cache and key:
                fsutil.write_json_atomic(cache, {"key": key, "json": True}, durable=False)
            try:
                return slurm.pick(slurm.parse_squeue_json(out), wanted)
            except ValueError as e:
                raise AgentError("slurm_output", "squeue --json printed what is not JSON: %s" % e)
        if "json" not in err.lower() and "unrecognized" not in err.lower() and \
                "invalid option" not in err.lower():
            raise AgentError("squeue_failed", slurm.slurm_error(err, "squeue failed (exit %d)" % rc))
        if cache and key:
            fsutil.write_json_atomic(cache, {"key": key, "json": False}, durable=False)
    rc, out, err = run(slurm.squeue_text_argv(_user()), env=env)
    if rc != 0:
        raise AgentError("squeue_failed", slurm.slurm_error(err, "squeue failed (exit %d)" % rc))
    return slurm.pick(slurm.parse_squeue_text(out), wanted)


def status(home, job_ids, mode="auto", env=None):
    """{rtrain job id: slurm.job_view(...)} for rtrain jobs submitted to Slurm, one squeue call
    for all of them."""
    sids = {j: slurm_id(home, j) for j in job_ids}
    records = query(home, [s for s in sids.values() if s], mode=mode, env=env)
    out = {}
    for j, sid in sids.items():
        d = home.job(j).dir
        out[j] = slurm.job_view(records.get(sid) if sid else None,
                                fsutil.read_json(os.path.join(d, "exit.json")),
                                fsutil.read_json(os.path.join(d, "start.json")),
                                os.path.exists(home.job(j).cancel))
        if sid and not out[j]["slurm_job_id"]:
            out[j]["slurm_job_id"] = sid
    return out


def show_job(slurm_job_id, env=None):
    """`scontrol show job ID`, parsed: the raw {Key: value} records (several for an array), or []
    once Slurm forgot the job."""
    rc, out, err = run(["scontrol", "show", "job", str(slurm_job_id)], env=env)
    if rc != 0:
        if "invalid job id" in err.lower():
            return []
        raise AgentError("scontrol_failed", slurm.slurm_error(err, "scontrol failed (exit %d)" % rc))
    return slurm.parse_scontrol(out)


def cancel(home, job_ids, env=None):
    """Cancel rtrain jobs on Slurm: mark each (the `cancel` file: the wrapper and job_view read
    it), then one scancel for all. Returns {rtrain id: None, or Slurm's reason it could not}."""
    sids = {}
    for j in job_ids:
        fsutil.write_private(home.job(j).cancel, b"")
        sid = slurm_id(home, j)
        if sid:
            sids[j] = sid
    if not sids:
        return {j: "never submitted to Slurm" for j in job_ids}
    rc, out, err = run(slurm.scancel_argv(sorted(set(sids.values()))), env=env)
    errors = slurm.parse_scancel(err)
    if rc != 0 and not errors:
        raise AgentError("scancel_failed", slurm.slurm_error(err, "scancel failed (exit %d)" % rc))
    return {j: errors.get(sids.get(j)) if j in sids else "never submitted to Slurm" for j in job_ids}


def gpus(env=None, partition=None):
    """GPUs (GRES) per node from sinfo (of one partition, or all): slurm.parse_sinfo_gres's list."""
    argv = list(slurm.SINFO_ARGV) + (["-p", str(partition)] if partition else [])
    rc, out, err = run(argv, env=env, timeout=30)
    if rc != 0:
        raise AgentError("sinfo_failed", slurm.slurm_error(err, "sinfo failed (exit %d)" % rc))
    return slurm.parse_sinfo_gres(out)


def json_works(home, env=None):
    """Whether `squeue --json` works on this cluster (known from an earlier call, else tried)."""
    key, cache, works = _json_cache(home, env)
    if works is None:
        rc, _, err = run(slurm.squeue_json_argv(_user()), env=env)
        works = rc == 0
        fsutil.write_json_atomic(cache, {"key": key, "json": works}, durable=False)
    return works


def read_start(home, job_id):
    return fsutil.read_json(os.path.join(home.job(job_id).dir, "start.json"))


def dump(obj):
    return json.dumps(obj, sort_keys=True)
