"""Slurm, the commands: the argv of sbatch, squeue, sinfo and scancel (never a shell string), and
what sbatch and scancel answer: a job id, or Slurm's own reason in one line. Pure functions,
pinned by tests/unit/test_slurm_outputs.py on real captures (tests/fixtures/slurm/).
Standard library only, Python >= 3.8."""
import re

# sbatch options rtrain sets itself: the same ones in `sbatch_args` would break the job's
# bookkeeping (its log, its folder, its array, its id).
OWNED_OPTIONS = ("--array", "-a", "--output", "-o", "--error", "-e", "--chdir", "-D",
                 "--job-name", "-J", "--wrap", "--parsable", "--open-mode", "--dependency", "-d",
                 "--kill-on-invalid-dep", "--requeue", "--no-requeue", "--input", "-i")

# A host's Slurm settings that become one sbatch option each (hosts.yaml, docs/contracts.md).
SETTINGS = (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
            ("time", "--time"), ("mem", "--mem"), ("cpus_per_gpu", "--cpus-per-gpu"),
            ("constraint", "--constraint"))


def owned_option(arg):
    """The option of OWNED_OPTIONS that `arg` (one element of sbatch_args) sets, else None."""
    for opt in OWNED_OPTIONS:
        if arg == opt or (opt.startswith("--") and arg.startswith(opt + "=")) or \
                (not opt.startswith("--") and arg.startswith(opt) and len(arg) > len(opt)):
            return opt
    return None


def sbatch_argv(spec, sbatch="sbatch"):
    """The argv of one sbatch call (never a shell string). `spec` (a dict):

    wrapper      path of the batch wrapper (WRAPPER, written by the caller)
    folder       the wrapper's argument: the job's folder, or for an array the folder of links
    output       --output: the job's log (for an array, a pattern with %a)
    chdir        --chdir: the job's work dir (for an array, the folder of links)
    name         --job-name
    gpus         GPUs per job (0: no GPU option)
    gpu_option   "gres" (--gres=gpu[:type]:N, the default), "gpus" (--gpus=[type:]N) or
                 "gpus-per-node"
    gpu_type     optional GPU type ("a100")
    partition, account, qos, time, mem, cpus_per_gpu, constraint: one option each when set
    array        None, or the number of tasks K (indexes 0..K-1)
    array_limit  at most this many tasks at once (--array=0-K-1%N)
    after_ok, after_any: Slurm job ids (--dependency=afterok:1:2,afterany:3), with
                 --kill-on-invalid-dep=yes so a job whose dependency failed is cancelled
    requeue      True: --requeue, False: --no-requeue, None: the cluster's default
    sbatch_args  more options, as a list of strings, after rtrain's own
    """
    argv = [sbatch, "--parsable", "--job-name=%s" % spec["name"], "--output=%s" % spec["output"],
            "--open-mode=append", "--chdir=%s" % spec["chdir"]]
    gpus = int(spec.get("gpus") or 0)
    if gpus < 0:
        raise ValueError("gpus must be 0 or more, not %d" % gpus)
    if gpus:
        how = spec.get("gpu_option") or "gres"
        kind = spec.get("gpu_type")
        if how == "gres":
            argv.append("--gres=gpu:%s%d" % (kind + ":" if kind else "", gpus))
        elif how in ("gpus", "gpus-per-node"):
            argv.append("--%s=%s%d" % (how, kind + ":" if kind else "", gpus))
        else:
            raise ValueError("gpu_option must be gres, gpus or gpus-per-node, not %r" % how)
    for key, opt in SETTINGS:
        value = spec.get(key)
        if value is not None and value != "":
            argv.append("%s=%s" % (opt, value))
    size = spec.get("array")
    if size is not None:
        size = int(size)
        if size < 1:
            raise ValueError("an array needs at least one task")
        arr = "0-%d" % (size - 1) if size > 1 else "0"
        limit = spec.get("array_limit")
        if limit:
            arr += "%%%d" % int(limit)
        argv.append("--array=%s" % arr)
    deps = []
    for kind in ("after_ok", "after_any"):
        ids = [str(i) for i in spec.get(kind) or ()]
        for i in ids:
            if not re.match(r"^[0-9]+(_[0-9]+)?$", i):
                raise ValueError("not a Slurm job id: %r" % i)
        if ids:
            deps.append("%s:%s" % (kind.replace("_", ""), ":".join(ids)))
    if deps:
        argv += ["--dependency=%s" % ",".join(deps), "--kill-on-invalid-dep=yes"]
    if spec.get("requeue") is True:
        argv.append("--requeue")
    elif spec.get("requeue") is False:
        argv.append("--no-requeue")
    extra = list(spec.get("sbatch_args") or ())
    for arg in extra:
        if not isinstance(arg, str):
            raise ValueError("sbatch_args must be strings, not %r" % (arg,))
        if owned_option(arg):
            raise ValueError("sbatch_args may not set %s: rtrain sets it" % owned_option(arg))
    argv += extra
    argv += [spec["wrapper"], spec["folder"]]
    return argv


def parse_sbatch(stdout):
    """The job id `sbatch --parsable` printed ("123", or "123;cluster" on a federation)."""
    for line in stdout.splitlines():
        line = line.strip()
        if line:
            jid = line.split(";", 1)[0]
            if re.match(r"^[0-9]+$", jid):
                return jid
    raise ValueError("sbatch printed no job id: %r" % stdout[:200])


_ERR_PREFIX = re.compile(r"^(?:sbatch|scancel|squeue|sinfo|scontrol|srun|salloc):\s*(?:error:\s*)?", re.I)


def slurm_error(stderr, fallback="failed"):
    """One line with Slurm's own reason, from what a Slurm command printed on stderr:
    "sbatch: error: invalid partition specified: nope" + "sbatch: error: Batch job submission
    failed: Invalid partition name specified" -> "Invalid partition name specified (invalid
    partition specified: nope)". Warnings are left out unless they are all there is."""
    errors, others = [], []
    for raw in stderr.splitlines():
        line = raw.strip()
        if not line:
            continue
        low = line.lower()
        text = _ERR_PREFIX.sub("", line).strip()
        if "error:" in low.split(" ", 2)[:2] or low.startswith(("sbatch: error", "scancel: error",
                                                               "squeue: error", "sinfo: error",
                                                               "scontrol: error")):
            errors.append(text)
        elif "warning" not in low[:20]:
            others.append(text)
    lines = errors or others
    if not lines:
        return fallback
    main = None
    for t in lines:
        m = re.match(r"^Batch job submission failed:\s*(.*)$", t, re.I)
        if m:
            main = m.group(1).strip()
    if main is None:
        return "; ".join(_dedup(lines))
    detail = [t for t in lines if not t.lower().startswith("batch job submission failed")]
    detail = [t for t in _dedup(detail) if t.lower() != main.lower()]
    return "%s (%s)" % (main, "; ".join(detail)) if detail else main


def _dedup(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def squeue_json_argv(user, squeue="squeue"):
    """Slurm 22.05 ignores the filters of --json (pick() filters); where a later release honours
    them, they keep the answer to this user's jobs, finished ones included."""
    return [squeue, "--json", "-t", "all", "-u", user]


# The text format (clusters without --json): one line per job, array tasks one per line (-r),
# finished jobs too (-t all); the name last (it may hold the separator).
SQUEUE_TEXT_FORMAT = "%i|%F|%K|%T|%r|%N|%S|%e|%u|%j"


def squeue_text_argv(user, squeue="squeue"):
    return [squeue, "-h", "-r", "-t", "all", "-u", user, "-o", SQUEUE_TEXT_FORMAT]


# -- sinfo: GPUs per node

SINFO_ARGV = ["sinfo", "-h", "-N", "-O", "NodeList:|,StateLong:|,Partition:|,Gres:|,GresUsed:|"]


# -- scancel

def scancel_argv(ids, signal=None, scancel="scancel"):
    ids = [str(i) for i in ids]
    for i in ids:
        if not re.match(r"^[0-9]+(_[0-9]+)?$", i):
            raise ValueError("not a Slurm job id: %r" % i)
    argv = [scancel]
    if signal:
        argv.append("--signal=%s" % signal)
    return argv + ids


def parse_scancel(stderr):
    """{job id: Slurm's reason} for the ids scancel could not cancel ("Job/step already
    completing or completed", "Invalid job id specified")."""
    out = {}
    for line in stderr.splitlines():
        m = re.search(r"(?:job id|job)\s+([0-9]+(?:_[0-9]+)?)\s*:\s*(.+)$", line, re.I)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out

