"""Slurm, what it says about jobs and nodes: `squeue --json`, `squeue -o`, `scontrol show job`
and sinfo's GRES, each parsed into one shape. Pure functions, pinned by
tests/unit/test_slurm_outputs.py on real captures (tests/fixtures/slurm/).

Facts of Slurm 22.05 this is built on: `squeue --json` ignores -j/-t/-u (the caller filters
with pick()), lists finished jobs for MinJobAge seconds and gives `exit_code` as the raw wait
status (exit 3 -> 768, SIGKILL -> 9); pending array tasks come as one record
(`array_task_string` "2-4%2"); there is no `scontrol --json` (23.02). Standard library only,
Python >= 3.8."""
import json
import re
import time

# -- job records: squeue --json, squeue -o, scontrol show job -> one shape
#
#   {"id": "123" | "123_4", "job_id": int, "array_job_id": int|None, "array_task_id": int|None,
#    "pending_tasks": [int] (a pending array's tasks not started yet, else []),
#    "state": "PENDING", "flags": [...], "reason": "Resources" | None, "nodes": "node1" | None,
#    "start": epoch|None, "end": epoch|None, "exit_status": raw wait status | None,
#    "name": str, "user": str, "restarts": int|None}


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

