"""Read the GPUs of this host from nvidia-smi and decide which ones are free.

Standard library only, Python >= 3.8 (this module ships inside the agent zipapp).

Only the machine-readable interfaces are used (smi.py parses them; tests/fixtures/nvidia-smi/NOTES.md):
  nvidia-smi --query-gpu=GPU_FIELDS --format=csv,nounits
  nvidia-smi --query-compute-apps=APP_FIELDS --format=csv,nounits
  nvidia-smi -L  and  nvidia-smi -q -x   (only when some GPU has MIG enabled)
The default table is never parsed: its layout drifts between drivers and truncates names.

Everything is keyed on UUIDs (indexes can change at each boot). Anything that can't be read makes
the GPU "unknown", never "free" (fail closed).
"""
import os
import shlex
import subprocess

from .smi import (APP_FIELDS, GPU_FIELDS, NvidiaSmiError, first_line, parse_csv, parse_list,
                  parse_xml, raise_if_error)

__all__ = ["NvidiaSmiError", "base_argv", "classify", "query", "read"]


# ------------------------------------------------------------------ running nvidia-smi

def _default_run(timeout):
    def run(argv):
        env = dict(os.environ)
        env["LC_ALL"] = "C"
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise NvidiaSmiError("timeout", "nvidia-smi did not answer within %gs (%s); the "
                                 "driver may be hung" % (timeout, " ".join(argv[1:])))
        except FileNotFoundError:
            raise NvidiaSmiError("not_found", "%s not found on PATH" % argv[0])
        except PermissionError:
            raise NvidiaSmiError("not_found", "%s is not executable" % argv[0])
        except OSError as e:
            raise NvidiaSmiError("failed", "cannot run %s: %s" % (argv[0], e))
        return (p.returncode, p.stdout.decode("utf-8", "replace"),
                p.stderr.decode("utf-8", "replace"))
    return run


def base_argv(nvidia_smi):
    if os.path.sep in nvidia_smi and os.path.exists(nvidia_smi):
        return [nvidia_smi]
    try:
        argv = shlex.split(nvidia_smi)
    except ValueError:
        argv = [nvidia_smi]
    return argv or ["nvidia-smi"]


def _csv_query(run, base, flag, fields):
    argv = base + ["%s=%s" % (flag, ",".join(fields)), "--format=csv,nounits"]
    rc, out, err = run(argv)
    if rc == 127 and not out.strip() and ("not found" in err or "No such file" in err):
        raise NvidiaSmiError("not_found", "%s not found on PATH" % base[0])
    try:
        rows = parse_csv(out, fields, require_header=True)
        raw = parse_csv(out, fields, raw=True, require_header=True)
    except NvidiaSmiError as e:
        if e.kind == "bad_output":
            raise_if_error(out + "\n" + err)
            if rc != 0:
                raise NvidiaSmiError("failed", "nvidia-smi %s failed (exit %d): %s" % (
                    flag, rc, first_line(out.strip() and out or err)))
        raise
    return rows, raw


def query(nvidia_smi="nvidia-smi", timeout=10.0, run=None):
    """Ask nvidia-smi for the GPUs and their compute processes. Returns a snapshot for classify():
    {"gpus": [rows keyed by GPU_FIELDS], "gpus_raw": [same, cell strings], "apps": [rows keyed by
    APP_FIELDS], "list": parse_list() or None, "xml": parse_xml() or None, "mig_error": str|None}.
    Raises NvidiaSmiError; "No devices were found" gives an empty snapshot."""
    run = run or _default_run(timeout)
    base = base_argv(nvidia_smi)
    snap = {"gpus": [], "gpus_raw": [], "apps": [], "list": None, "xml": None, "mig_error": None}
    fields = list(GPU_FIELDS)
    try:
        try:
            gpus, raw = _csv_query(run, base, "--query-gpu", fields)
        except NvidiaSmiError as e:
            # Pre-R450 drivers don't know mig.mode.current: ask again without it.
            if e.kind == "failed" and '"mig.mode.current"' in e.message:
                fields.remove("mig.mode.current")
                gpus, raw = _csv_query(run, base, "--query-gpu", fields)
                for r in gpus + raw:
                    r["mig.mode.current"] = None
            else:
                raise
        if not gpus:
            return snap
        apps, _ = _csv_query(run, base, "--query-compute-apps", APP_FIELDS)
    except NvidiaSmiError as e:
        if e.kind == "no_devices":
            return snap
        raise
    snap["gpus"], snap["gpus_raw"], snap["apps"] = gpus, raw, apps
    if any(g.get("mig.mode.current") == "Enabled" for g in gpus):
        try:
            rc, out, err = run(base + ["-L"])
            snap["list"] = parse_list(out)
            if not snap["list"]:
                raise_if_error(err)
            rc, out, err = run(base + ["-q", "-x"])
            snap["xml"] = parse_xml(out)
        except NvidiaSmiError as e:
            snap["mig_error"] = e.message
    return snap


# ------------------------------------------------------------------ classification

def _get(row, *names):
    for n in names:
        if n in row:
            return row[n]
    return None


def _plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "es" if word.endswith("s") else "s")


def _visible_set(visible):
    if visible is None:
        return None
    if isinstance(visible, (str, int)):
        visible = [visible]
    out = set()
    for v in visible:
        for part in str(v).split(","):
            if part.strip():
                out.add(part.strip())
    return out


def _exclusive(mode):
    return mode is not None and mode.replace(" ", "").lower() in (
        "exclusive_process", "e.process", "exclusive_thread", "e.thread")


def _judge(procs, mem_used, mem_total, mem_busy_mib, own, raw_mem, compute_mode):
    """Set state/reason of `unit` (procs: [{"pid","used_memory","name"}])."""
    foreign = [p for p in procs if p["pid"] not in own]
    if foreign:
        return "busy", "%s" % _plural(len(foreign), "foreign process")
    if compute_mode is not None and compute_mode.lower() == "prohibited":
        return "busy", "compute mode Prohibited"
    if _exclusive(compute_mode) and procs:
        return "busy", "compute mode %s with %s" % (compute_mode, _plural(len(procs), "process"))
    if mem_used is None:
        return "unknown", "memory not readable: %s" % (raw_mem or "N/A")
    own_mem = sum(p["used_memory"] or 0 for p in procs if p["pid"] in own)
    if mem_used - own_mem > mem_busy_mib:
        return "busy", "memory %s/%s MiB in use" % (mem_used, mem_total if mem_total is not None
                                                    else "?")
    return "free", ""


def _proc(pid, used, name):
    return {"pid": pid, "used_memory": used, "name": name or ""}


def classify(snapshot, mem_busy_mib=1024, own_pids=(), visible=None):
    """Schedulable units (docs/contracts.md "GPU state") from a query() snapshot."""
    own = set()
    for p in own_pids or ():
        try:
            own.add(int(p))
        except (TypeError, ValueError):
            pass
    vis = _visible_set(visible)
    raws = snapshot.get("gpus_raw") or []
    apps = snapshot.get("apps") or []
    listing = {g["uuid"]: g for g in (snapshot.get("list") or [])}
    xml = snapshot.get("xml") or {}
    units = []
    for pos, g in enumerate(snapshot.get("gpus") or []):
        raw = raws[pos] if pos < len(raws) else {}
        uuid = _get(g, "uuid", "gpu_uuid")
        if not uuid:
            continue
        idx = _get(g, "index")
        idx = str(idx if idx is not None else pos)
        name = _get(g, "name", "gpu_name") or "?"
        cmode = _get(g, "compute_mode")
        mem_used = _get(g, "memory.used")
        mem_total = _get(g, "memory.total")
        procs = [_proc(a.get("pid"), _get(a, "used_memory", "used_gpu_memory"),
                       a.get("process_name"))
                 for a in apps if _get(a, "gpu_uuid", "uuid") == uuid and a.get("pid") is not None]
        if _get(g, "mig.mode.current") == "Enabled":
            if vis is not None and idx not in vis and uuid not in vis:
                vis_parent = False
            else:
                vis_parent = True
            units.extend(u for u in _mig_units(snapshot, g, idx, uuid, name, cmode, procs,
                                               listing, xml, mem_busy_mib, own)
                         if vis_parent or u["index"] in vis or u["uuid"] in vis)
            continue
        if vis is not None and idx not in vis and uuid not in vis:
            continue
        state, reason = _judge(procs, mem_used, mem_total, mem_busy_mib, own,
                               (raw.get("memory.used") or "").strip(), cmode)
        units.append({"index": idx, "uuid": uuid, "name": name, "memory_used": mem_used,
                      "memory_total": mem_total, "utilization": _get(g, "utilization.gpu"),
                      "compute_mode": cmode, "state": state, "reason": reason,
                      "processes": procs, "parent_uuid": None})
    return units


def _mig_units(snapshot, g, idx, uuid, name, cmode, procs, listing, xml, mem_busy_mib, own):
    entry = listing.get(uuid)
    if entry is None:
        why = snapshot.get("mig_error") or "MIG devices not listed by nvidia-smi -L"
        # Can't enumerate the MIG devices: show the parent as unknown (never schedulable).
        return [{"index": idx, "uuid": uuid, "name": name, "memory_used": _get(g, "memory.used"),
                 "memory_total": _get(g, "memory.total"), "utilization": None,
                 "compute_mode": cmode, "state": "unknown",
                 "reason": "MIG enabled but its devices are unknown: %s" % why,
                 "processes": procs, "parent_uuid": None}]
    info = xml.get(uuid) or {}
    devs = {d["index"]: d for d in info.get("mig_devices") or [] if d.get("index") is not None}
    xprocs = info.get("processes") or []
    # CSV processes (parent UUID, no GI/CI) mapped through the XML's process list by pid.
    where = {}
    for p in xprocs:
        if p.get("pid") is not None:
            where.setdefault(p["pid"], []).append(p)
    unmapped = [p for p in procs if p["pid"] not in where and p["pid"] not in own]
    units = []
    for m in entry["mig"]:
        d = devs.get(m["device"])
        unit = {"index": "%s:%d" % (idx, m["device"]), "uuid": m["uuid"],
                "name": "%s MIG %s" % (name, m["profile"]),
                "memory_used": d and d.get("memory_used"), "memory_total": d and d.get("memory_total"),
                "utilization": None, "compute_mode": cmode, "state": "unknown", "reason": "",
                "processes": [], "parent_uuid": uuid}
        units.append(unit)
        if d is None or d.get("gpu_instance_id") is None or d.get("compute_instance_id") is None:
            unit["reason"] = ("MIG device %d not found in nvidia-smi -q -x%s" % (
                m["device"], ": " + snapshot["mig_error"] if snapshot.get("mig_error") else ""))
            continue
        mine = [_proc(p["pid"], p.get("used_memory"), p.get("process_name"))
                for p in xprocs if p.get("gpu_instance_id") == d["gpu_instance_id"]
                and p.get("compute_instance_id") == d["compute_instance_id"]]
        unit["processes"] = mine
        state, reason = _judge(mine, d.get("memory_used"), d.get("memory_total"),
                               mem_busy_mib, own, "N/A", cmode)
        if state == "free" and unmapped:
            state, reason = "unknown", "%s on the parent GPU not mapped to a MIG device" % (
                _plural(len(unmapped), "process"))
        unit["state"], unit["reason"] = state, reason
    return units


def read(settings, is_own=None):
    """The schedulable units of this host under `settings` (settings.Settings): nvidia-smi asked
    and its answer judged. is_own(pid) says which compute processes are this user's own jobs'
    (not foreign: they don't make a GPU busy for the scheduler). Raises NvidiaSmiError."""
    snap = query(settings.nvidia_smi)
    own = [a["pid"] for a in snap.get("apps") or ()
           if is_own is not None and a.get("pid") is not None and is_own(a["pid"])]
    return classify(snap, mem_busy_mib=settings.mem_busy_mib, own_pids=own, visible=settings.visible)
