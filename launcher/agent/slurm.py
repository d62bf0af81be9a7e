"""Slurm, the pure part: the sbatch argv, the batch wrapper, and the parsers of what sbatch,
squeue, scontrol, sinfo and scancel print. Nothing here runs a command or touches a file
(slurmjobs.py does); every function is pinned by tests/unit/test_slurm_outputs.py on real captures
(tests/fixtures/slurm/). The design: docs/contracts.md, "Slurm backend".

Job ids: a Slurm job is named by a string, "123" for a plain job and "123_4" for task 4 of
array job 123 (what squeue and scancel accept).

Facts of Slurm 22.05 this is built on: `squeue --json` ignores -j/-t/-u (the
caller filters), lists finished jobs for MinJobAge seconds and gives `exit_code` as the raw wait
status (exit 3 -> 768, SIGKILL -> 9); pending array tasks come as one record (`array_task_string`
"2-4%2"); there is no `scontrol --json` (23.02) and, without slurmdbd, no sacct: the wrapper's
exit.json is what outlives MinJobAge.
"""
import hashlib
import json
import re
import time

# The batch script of every rtrain job on Slurm: a fixed text (no user text is ever spliced into
# it). sbatch copies it into the job at submit time. $1 is the job's folder (for an array: a folder
# of links named by task index to the jobs' folders). It runs the file `command` there with bash
# in the job's work/, with the environment of the NUL-separated file env0 (NAME=VALUE entries),
# writes start.json when it starts and exit.json (the format of runner.py's, plus a few keys) when
# the command ends. An exit status above 128 is recorded as the signal 128 - status (a command
# that exits with 137 on its own reads as killed by SIGKILL: bash reports both the same way).
# Slurm signals every process of the job on scancel, time limit and preemption; the traps let the
# wrapper outlive that signal to write the record. (A signal sent to the batch shell only,
# `--signal=B:USR1@60`, reaches the wrapper, not the command: it runs in the foreground so that
# it keeps SIGINT, which bash ignores in background jobs.)
WRAPPER = r"""#!/bin/bash
# rtrain: the batch wrapper of a job on Slurm (launcher/agent/slurm.py).
d=$1
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  d=$1/$SLURM_ARRAY_TASK_ID
  real=$(cd -P "$d" 2>/dev/null && pwd) && d=$real
fi
now() { local t=${EPOCHREALTIME:-}; if [ -n "$t" ]; then echo "${t/,/.}"; else date +%s; fi; }
put() { printf '%s\n' "$2" > "$d/$1.tmp$$" && mv -f "$d/$1.tmp$$" "$d/$1"; }
node=${SLURMD_NODENAME:-$(hostname)}
case $node in *[!A-Za-z0-9._-]*) node= ;; esac
jid=${SLURM_JOB_ID:-}
[ -z "${SLURM_ARRAY_JOB_ID:-}" ] || jid=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}
case $jid in *[!0-9_]*) jid= ;; esac
restarts=${SLURM_RESTART_COUNT:-0}
case $restarts in ''|*[!0-9]*) restarts=0 ;; esac
started=$(now)
rm -f "$d/exit.json"
info="\"node\": \"$node\", \"slurm_job_id\": \"$jid\", \"restarts\": $restarts"
put start.json "{\"started_at\": $started, $info}"
terminated=false
trap 'terminated=true' TERM INT HUP
trap ':' USR1 USR2
if [ -f "$d/env0" ]; then
  while IFS= read -r -d '' kv; do export "$kv"; done < "$d/env0"
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-}
if cmd=$(cat "$d/command") && cd -P "$d/work"; then
  # (stderr of this group to /dev/null: bash's own "Killed" notice; the job's goes to fd 3)
  { /bin/bash -c "$cmd" 2>&3 3>&-; rc=$?; } 3>&2 2>/dev/null
else
  echo "rtrain: cannot start the job (its folder $d is not readable from $node)" >&2
  rc=127
fi
sig=null
if [ "$rc" -gt 128 ] && [ "$rc" -lt 193 ] && n=$(kill -l $((rc - 128)) 2>/dev/null); then
  sig="\"SIG$n\""
fi
cancelled=false
[ ! -e "$d/cancel" ] || cancelled=true
ended=$(now)
put exit.json "{\"exit_code\": $rc, \"signal\": $sig, \"ended_at\": $ended, \"cancelled\": $cancelled,\
 \"terminated\": $terminated, \"started_at\": $started, $info}"
exit $rc
"""
WRAPPER_HASH = hashlib.sha256(WRAPPER.encode()).hexdigest()[:16]
WRAPPER_NAME = "wrapper-%s.sh" % WRAPPER_HASH

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


# -- job records: squeue --json, squeue -o, scontrol show job -> one shape
#
#   {"id": "123" | "123_4", "job_id": int, "array_job_id": int|None, "array_task_id": int|None,
#    "pending_tasks": [int] (a pending array's tasks not started yet, else []),
#    "state": "PENDING", "flags": [...], "reason": "Resources" | None, "nodes": "node1" | None,
#    "start": epoch|None, "end": epoch|None, "exit_status": raw wait status | None,
#    "name": str, "user": str, "restarts": int|None}

def squeue_json_argv(user, squeue="squeue"):
    """Slurm 22.05 ignores the filters of --json (pick() filters); where a later release honours
    them, they keep the answer to this user's jobs, finished ones included."""
    return [squeue, "--json", "-t", "all", "-u", user]


# The text format (clusters without --json): one line per job, array tasks one per line (-r),
# finished jobs too (-t all); the name last (it may hold the separator).
SQUEUE_TEXT_FORMAT = "%i|%F|%K|%T|%r|%N|%S|%e|%u|%j"


def squeue_text_argv(user, squeue="squeue"):
    return [squeue, "-h", "-r", "-t", "all", "-u", user, "-o", SQUEUE_TEXT_FORMAT]


def _int_or_none(v):
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, dict):  # 23.02+: {"set": true, "infinite": false, "number": 3}
        if not v.get("set", True) or v.get("infinite"):
            return None
        v = v.get("number")
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _epoch(v):
    """A time from squeue --json (epoch seconds, 0 = unset)."""
    n = _int_or_none(v)
    return float(n) if n else None


def _text_time(v):
    """A time as squeue -o / scontrol print it (local time, "2026-11-29T23:20:26"), or None."""
    if not v or v in ("N/A", "NONE", "None", "Unknown", "(null)"):
        return None
    try:
        return float(time.mktime(time.strptime(v, "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, OverflowError):
        return None


def expand_tasks(spec):
    """Array task indexes of "0-4%2", "1,3,5-7", "[0-9:2]" -> [ints] (the %N throttle dropped)."""
    spec = (spec or "").strip().strip("[]").split("%", 1)[0]
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        step = 1
        if ":" in part:
            part, s = part.split(":", 1)
            step = int(s)
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1, step))
        else:
            out.append(int(part))
    return out


def _state(v):
    """(base state, flags) from a job_state: "RUNNING", or (23.02+) ["RUNNING", "COMPLETING"]."""
    if isinstance(v, list):
        names = [str(x) for x in v] or ["UNKNOWN"]
        return names[0], names[1:]
    s = str(v or "UNKNOWN")
    parts = s.split("+")
    return parts[0], parts[1:]


def _key(job_id, array_job_id, task):
    if array_job_id and task is not None:
        return "%d_%d" % (array_job_id, task)
    return str(job_id)


def parse_squeue_json(text):
    """Records (see above) from `squeue --json` (every job the cluster lists: filter with pick)."""
    data = json.loads(text)
    out = []
    for j in data.get("jobs") or ():
        job_id = _int_or_none(j.get("job_id"))
        if job_id is None:
            continue
        arr = _int_or_none(j.get("array_job_id")) or None
        task = _int_or_none(j.get("array_task_id"))
        pending = []
        if arr and task is None and j.get("array_task_string"):
            pending = expand_tasks(j.get("array_task_string"))
        state, flags = _state(j.get("job_state"))
        reason = j.get("state_reason")
        out.append({
            "id": _key(job_id, arr, task) if not pending else "%d" % arr,
            "job_id": job_id, "array_job_id": arr, "array_task_id": task, "pending_tasks": pending,
            "state": state, "flags": flags,
            "reason": reason if reason and reason != "None" else None,
            "nodes": j.get("nodes") or None,
            "start": _epoch(j.get("start_time")) if state != "PENDING" else None,
            "end": _epoch(j.get("end_time")) if state not in ("PENDING", "RUNNING") else None,
            "exit_status": _int_or_none(j.get("exit_code")),
            "name": j.get("name") or "", "user": j.get("user_name") or "",
            "restarts": _int_or_none(j.get("restart_cnt")),
        })
    return out


def parse_squeue_text(text):
    """Records from `squeue -h -r -t all -o SQUEUE_TEXT_FORMAT` (no exit status, no restarts)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split("|", 9)
        if len(f) < 10:
            continue
        m = re.match(r"^([0-9]+)(?:_(\[?)([^\]]*)\]?)?$", f[0].strip())
        if not m:
            continue
        arr = task = None
        pending = []
        if m.group(3) is not None:
            arr = int(m.group(1))
            if m.group(2) or not m.group(3).isdigit():
                pending = expand_tasks(m.group(3))
            else:
                task = int(m.group(3))
        state, flags = _state(f[3].strip())
        reason = f[4].strip()
        out.append({
            "id": _key(arr or int(m.group(1)), arr, task) if not pending else "%d" % arr,
            "job_id": int(m.group(1)), "array_job_id": arr, "array_task_id": task,
            "pending_tasks": pending, "state": state, "flags": flags,
            "reason": reason if reason and reason != "None" else None,
            "nodes": f[5].strip() or None,
            "start": _text_time(f[6].strip()) if state != "PENDING" else None,
            "end": _text_time(f[7].strip()) if state not in ("PENDING", "RUNNING") else None,
            "exit_status": None, "name": f[9], "user": f[8].strip(), "restarts": None,
        })
    return out


_SCONTROL_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z][A-Za-z0-9_/:]*)=")


def parse_scontrol(text):
    """`scontrol show job` (or node) output, one or several records, in the multi-line or the
    one-line (-o) layout -> a list of {Key: value}. Values may hold spaces (OS=Linux 6.1 #1 ...);
    a value that itself holds " Word=" cannot be told from a next key (Slurm's own format)."""
    records = []
    chunks = re.split(r"\n\s*\n", text.strip()) if "\n " in text or "\n\n" in text else \
        text.strip().splitlines()
    for chunk in chunks:
        flat = " ".join(x.strip() for x in chunk.splitlines())
        if not flat:
            continue
        keys = list(_SCONTROL_KEY.finditer(flat))
        rec = {}
        for i, m in enumerate(keys):
            end = keys[i + 1].start() if i + 1 < len(keys) else len(flat)
            rec[m.group(1)] = flat[m.end():end].strip()
        if rec:
            records.append(rec)
    return records


def _scontrol_exit(v):
    """ExitCode=3:0 (exit code : signal) -> a raw wait status (768)."""
    m = re.match(r"^(\d+):(\d+)$", v or "")
    if not m:
        return None
    code, sig = int(m.group(1)), int(m.group(2))
    return sig if sig else code << 8


def job_from_scontrol(rec):
    """A record (the squeue shape) from one parsed `scontrol show job` record."""
    job_id = _int_or_none(rec.get("JobId"))
    arr = _int_or_none(rec.get("ArrayJobId")) or None
    task_s = rec.get("ArrayTaskId")
    task, pending = None, []
    if arr is not None and task_s:
        if task_s.isdigit():
            task = int(task_s)
        else:
            pending = expand_tasks(task_s)
    state, flags = _state(rec.get("JobState"))
    reason = rec.get("Reason")
    nodes = rec.get("NodeList")
    user = (rec.get("UserId") or "").split("(", 1)[0]
    return {
        "id": _key(job_id, arr, task) if not pending else "%d" % arr,
        "job_id": job_id, "array_job_id": arr, "array_task_id": task, "pending_tasks": pending,
        "state": state, "flags": flags,
        "reason": reason if reason and reason not in ("None", "(null)") else None,
        "nodes": nodes if nodes and nodes != "(null)" else None,
        "start": _text_time(rec.get("StartTime")) if state != "PENDING" else None,
        "end": _text_time(rec.get("EndTime")) if state not in ("PENDING", "RUNNING") else None,
        "exit_status": _scontrol_exit(rec.get("ExitCode")),
        "name": rec.get("JobName") or "", "user": user,
        "restarts": _int_or_none(rec.get("Restarts")),
    }


def pick(records, wanted):
    """{id: record} for the ids in `wanted` ("123", "123_4"): squeue --json lists every job of
    the cluster. A task of a pending array comes from the array's one pending record."""
    wanted = set(str(w) for w in wanted)
    out = {}
    for r in records:
        if r["id"] in wanted and not r["pending_tasks"]:
            out[r["id"]] = r
        for t in r["pending_tasks"]:
            key = "%d_%d" % (r["array_job_id"], t)
            if key in wanted and key not in out:
                task = dict(r, id=key, array_task_id=t, pending_tasks=[])
                out[key] = task
    return out


# -- Slurm's state -> rtrain's

STATES = {
    "PENDING": "queued", "CONFIGURING": "queued", "RESV_DEL_HOLD": "queued",
    "REQUEUED": "requeued", "REQUEUE_FED": "requeued", "REQUEUE_HOLD": "requeued",
    "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running", "STOPPED": "running",
    "SIGNALING": "running", "STAGE_OUT": "running", "RESIZING": "running",
    "COMPLETED": "succeeded",
    "FAILED": "failed", "OUT_OF_MEMORY": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "SPECIAL_EXIT": "failed",
    "CANCELLED": "cancelled", "REVOKED": "cancelled",
    "PREEMPTED": "preempted",
}
# Why a job that ended that way failed, in words.
FAILURES = {
    "OUT_OF_MEMORY": "out of memory", "TIMEOUT": "time limit reached", "NODE_FAIL": "node failure",
    "BOOT_FAIL": "node boot failure", "DEADLINE": "deadline reached",
    "SPECIAL_EXIT": "special exit",
}
ENDED = ("succeeded", "failed", "cancelled", "preempted", "lost")


def map_state(state, reason=None):
    """(rtrain state, reason) of a Slurm state and its reason, Slurm's own words where it has
    them: PENDING/Resources -> ("queued", "Resources"); TIMEOUT -> ("failed", "time limit
    reached"); CANCELLED/DependencyNeverSatisfied -> ("cancelled", "DependencyNeverSatisfied");
    a reason left over from the wait (a job cancelled while it waited for Resources) is dropped."""
    rt = STATES.get(state, "running" if state else "lost")
    reason = None if reason in (None, "", "None", "(null)") else reason
    if state in FAILURES:
        return rt, FAILURES[state]
    if state == "SUSPENDED":
        return rt, "suspended"
    if rt in ("queued", "requeued"):
        return rt, reason
    if rt == "failed" and reason != "NonZeroExitCode":
        return rt, reason
    if rt == "cancelled" and reason == "DependencyNeverSatisfied":
        return rt, reason
    return rt, None


def split_status(status):
    """A raw wait status -> (exit code, signal name): 768 -> (3, None); 9 -> (137, "SIGKILL")."""
    if status is None:
        return None, None
    sig = status & 0x7F
    if sig:
        return 128 + sig, "SIG" + _SIGNAMES.get(sig, str(sig))
    return (status >> 8) & 0xFF, None


_SIGNAMES = {1: "HUP", 2: "INT", 3: "QUIT", 4: "ILL", 5: "TRAP", 6: "ABRT", 7: "BUS", 8: "FPE",
             9: "KILL", 10: "USR1", 11: "SEGV", 12: "USR2", 13: "PIPE", 14: "ALRM", 15: "TERM"}


def _this_run(record, rec):
    """Whether the wrapper's record `rec` is of the run Slurm reports now (a requeued job runs
    again in the same folder; the wrapper removes the old exit.json as it starts, but Slurm says
    RUNNING a moment before that)."""
    if record.get("restarts") is not None and rec.get("restarts") is not None:
        return record["restarts"] == rec["restarts"]
    if record.get("start") and rec.get("started_at"):
        return rec["started_at"] >= record["start"] - 1
    return True


def job_view(record, exit_rec=None, start_rec=None, cancel_requested=False):
    """What rtrain shows for one job on Slurm, from what Slurm says (a record, or None once it
    forgot the job: MinJobAge), what the wrapper wrote (exit.json, start.json), and whether
    rtrain was asked to cancel it:

    {"state", "reason", "slurm_state", "slurm_job_id", "node", "exit_code", "signal",
     "started_at", "ended_at", "restarts"}

    Slurm tells the state (a time limit, a node failure, a preemption, a cancel are Slurm's to
    tell); the wrapper tells the exit code (Slurm's is the wrapper's own, and forgotten after
    MinJobAge). A job Slurm still shows running whose command has ended is shown ended. A job
    that waits again after it ran (preempted or its node failed, and --requeue) is "requeued"."""
    v = {"state": None, "reason": None, "slurm_state": None, "slurm_job_id": None, "node": None,
         "exit_code": None, "signal": None, "started_at": None, "ended_at": None, "restarts": None}
    ran = exit_rec or start_rec or {}
    v.update(started_at=ran.get("started_at"), node=ran.get("node") or None,
             restarts=ran.get("restarts"))
    by_exit = None
    if exit_rec:
        v.update(exit_code=exit_rec.get("exit_code"), signal=exit_rec.get("signal"),
                 ended_at=exit_rec.get("ended_at"))
        if exit_rec.get("cancelled") or (cancel_requested and exit_rec.get("terminated")):
            by_exit = ("cancelled", None)
        elif exit_rec.get("exit_code") == 0:
            by_exit = ("succeeded", None)
        else:
            by_exit = ("failed", _exit_words(exit_rec.get("exit_code"), exit_rec.get("signal")))
    if record is None:
        v["slurm_job_id"] = ran.get("slurm_job_id") or None
        if by_exit:
            v["state"], v["reason"] = by_exit
        elif cancel_requested:
            v["state"] = "cancelled"
        else:
            v["state"] = "lost"
            v["reason"] = "Slurm no longer knows the job, and it left no exit record"
        return v
    v["slurm_job_id"] = record["id"]
    v["slurm_state"] = record["state"]
    if record.get("restarts") is not None:
        v["restarts"] = record["restarts"]
    state, why = map_state(record["state"], record.get("reason"))
    if state == "queued" and (record.get("restarts") or ran):
        state = "requeued"
    if state in ("queued", "requeued"):
        v.update(started_at=None, ended_at=None, exit_code=None, signal=None, node=None)
    elif state == "running":
        if by_exit and _this_run(record, exit_rec):
            state, why = by_exit
        else:
            v.update(ended_at=None, exit_code=None, signal=None)
            v["started_at"] = v["started_at"] or record.get("start")
            v["node"] = v["node"] or record.get("nodes")
    else:
        if record.get("nodes"):  # it ran (a job cancelled while it waited has no node)
            v["node"] = v["node"] or record["nodes"]
            v["started_at"] = v["started_at"] or record.get("start")
            if not exit_rec:
                v["exit_code"], v["signal"] = split_status(record.get("exit_status"))
                v["ended_at"] = record.get("end")
        if state == "failed" and why is None:
            why = _exit_words(v["exit_code"], v["signal"])
    v["state"], v["reason"] = state, why
    return v


def _exit_words(code, sig):
    if sig:
        return "killed by %s" % sig
    if code is None:
        return None
    return "exit %d" % code


# -- sinfo: GPUs per node

SINFO_ARGV = ["sinfo", "-h", "-N", "-O", "NodeList:|,StateLong:|,Partition:|,Gres:|,GresUsed:|"]
_UNUSABLE = ("down", "drain", "fail", "maint", "reserved", "inval", "unknown", "future",
             "not_responding", "reboot")


def split_gres(s):
    """"gpu:a100:2(S:0-1),gpu:v100:1(IDX:0,2)" -> the entries, split at commas outside ( )."""
    out, depth, cur = [], 0, ""
    for ch in s or "":
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return [x.strip() for x in out if x.strip() and x.strip() not in ("(null)", "N/A")]


def gpu_counts(gres):
    """{type or "": count} of the GPU entries of a Gres/GresUsed string ("gpu:4",
    "gpu:a100:2(IDX:0-1)", "gpu:tesla:2(S:0)"); other kinds (shard, mps) are left out."""
    out = {}
    for entry in split_gres(gres):
        body = entry.split("(", 1)[0]
        parts = body.split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) == 1:
            kind, n = "", 1
        elif len(parts) == 2:
            kind, n = ("", parts[1]) if parts[1].isdigit() else (parts[1], 1)
        else:
            kind, n = parts[1], parts[2]
        try:
            n = int(n)
        except ValueError:
            continue
        out[kind] = out.get(kind, 0) + n
    return out


def node_usable(state):
    """Whether the scheduler can hand out a node in this sinfo state ("mixed", "idle~",
    "drained", "down*"): "*" (not responding) and down/drain/fail... are not."""
    s = (state or "").lower()
    if "*" in s:
        return False
    base = s.rstrip("~#!%$@^-+")
    return not any(base.startswith(x) for x in _UNUSABLE) and base != ""


def parse_sinfo_gres(text):
    """`sinfo -h -N -O NodeList:|,StateLong:|,Partition:|,Gres:|,GresUsed:|` (SINFO_ARGV) ->
    one dict per node (sinfo prints a node once per partition):
    {"node", "state", "partitions", "gres", "gres_used", "usable", "gpus_total", "gpus_used",
     "gpus_free", "types": {type: {"total", "used"}}}."""
    nodes = {}
    for line in text.splitlines():
        f = line.split("|")
        if len(f) < 5 or not f[0].strip():
            continue
        name, state, part, gres, used = (x.strip() for x in f[:5])
        n = nodes.get(name)
        if n is None:
            n = nodes[name] = {"node": name, "state": state, "partitions": [], "gres": gres,
                               "gres_used": used}
        p = part.rstrip("*")
        if p and p not in n["partitions"]:
            n["partitions"].append(p)
    out = []
    for n in nodes.values():
        total, used = gpu_counts(n["gres"]), gpu_counts(n["gres_used"])
        kinds = sorted(set(total) | set(used))
        n["types"] = {k: {"total": total.get(k, 0), "used": used.get(k, 0)} for k in kinds}
        n["gpus_total"] = sum(total.values())
        n["gpus_used"] = min(sum(used.values()), n["gpus_total"])
        n["usable"] = node_usable(n["state"])
        n["gpus_free"] = n["gpus_total"] - n["gpus_used"] if n["usable"] else 0
        out.append(n)
    return out


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

