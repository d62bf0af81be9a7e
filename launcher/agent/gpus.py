"""Read the GPUs of this host from nvidia-smi and decide which ones are free.

Standard library only, Python >= 3.8 (this module ships inside the agent zipapp).

Only the machine-readable interfaces are used (see shared/fixtures/nvidia-smi/NOTES.md):
  nvidia-smi --query-gpu=GPU_FIELDS --format=csv,nounits
  nvidia-smi --query-compute-apps=APP_FIELDS --format=csv,nounits
  nvidia-smi -L  and  nvidia-smi -q -x   (only when some GPU has MIG enabled)
The default table is never parsed: its layout drifts between drivers and truncates names.

Everything is keyed on UUIDs (indexes can change at each boot). Anything that can't be read makes
the GPU "unknown", never "free" (fail closed).
"""
import os
import re
import shlex
import subprocess
import xml.etree.ElementTree as ET

GPU_FIELDS = ["index", "uuid", "pci.bus_id", "name", "mig.mode.current", "compute_mode",
              "memory.total", "memory.used", "memory.free", "utilization.gpu"]
APP_FIELDS = ["gpu_uuid", "pid", "used_memory", "process_name"]

# Fields nvidia-smi accepts under two names; the header always prints one of them.
_ALIAS_GROUPS = [
    ("name", "gpu_name"), ("serial", "gpu_serial"), ("uuid", "gpu_uuid"),
    ("pci.bus_id", "gpu_bus_id"), ("used_memory", "used_gpu_memory"),
    ("inforom.img", "inforom.image"), ("inforom.pwr", "inforom.power"),
    ("gom.current", "gpu_operation_mode.current"), ("gom.pending", "gpu_operation_mode.pending"),
    ("retired_pages.single_bit_ecc.count", "retired_pages.sbe"),
    ("retired_pages.double_bit.count", "retired_pages.dbe"),
    ("remapped_rows.correctable", "remapped_rows.sbe"),
    ("remapped_rows.uncorrectable", "remapped_rows.dbe"),
    ("power.draw.average", "gpu.power.draw.average"),
    ("power.draw.instant", "gpu.power.draw.instant"),
    ("power.limit", "gpu.power.requested_limit"),
    ("enforced.power.limit", "gpu.power.current_limit"),
    ("power.default_limit", "gpu.power.default_limit"),
    ("power.min_limit", "gpu.power.min_limit"), ("power.max_limit", "gpu.power.max_limit"),
    ("module.power.limit", "module.power.requested_limit"),
    ("module.enforced.power.limit", "module.power.current_limit"),
    ("clocks.current.graphics", "clocks.gr"), ("clocks.current.sm", "clocks.sm"),
    ("clocks.current.memory", "clocks.mem"), ("clocks.current.video", "clocks.video"),
    ("clocks.applications.graphics", "clocks.applications.gr"),
    ("clocks.applications.memory", "clocks.applications.mem"),
    ("clocks.default_applications.graphics", "clocks.default_applications.gr"),
    ("clocks.default_applications.memory", "clocks.default_applications.mem"),
    ("clocks.max.graphics", "clocks.max.gr"), ("clocks.max.memory", "clocks.max.mem"),
]
_CANON = {}
for _group in _ALIAS_GROUPS:
    for _n in _group:
        _CANON[_n] = _group[0]
for _ev in ("supported", "active", "gpu_idle", "applications_clocks_setting", "sw_power_cap",
            "hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
            "sw_thermal_slowdown", "sync_boost"):
    _CANON["clocks_throttle_reasons." + _ev] = "clocks_event_reasons." + _ev

# Fields whose values are numbers (anything else is kept as a string).
_NUMERIC_PREFIXES = ("memory.", "utilization.", "temperature.", "power.", "clocks.current.",
                     "clocks.max.", "clocks.applications.", "clocks.default_applications.",
                     "protected_memory.", "module.power.", "enforced.power", "encoder.stats.")
_NUMERIC = {"index", "pid", "used_memory", "used_gpu_memory", "fan.speed", "count",
            "clocks.gr", "clocks.sm", "clocks.mem", "clocks.video"}
_TO_MIB = {"KiB": 1.0 / 1024, "MiB": 1, "MB": 1, "GiB": 1024, "GB": 1024, "KB": 1.0 / 1024}

ERROR_KINDS = ("not_found", "driver_not_loaded", "nvml_mismatch", "no_devices", "device_handle",
               "gpu_lost", "nvml_unknown", "timeout", "bad_output", "failed")


class NvidiaSmiError(Exception):
    """nvidia-smi could not tell us the GPUs. `kind` is one of ERROR_KINDS, `message` one line."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


# (regex on one line, kind, message template using the match)
_ERRORS = [
    (re.compile(r"^NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"),
     "driver_not_loaded", "nvidia-smi cannot communicate with the NVIDIA driver (kernel module "
                          "not loaded). Install or load the driver, or reboot after a driver upgrade."),
    (re.compile(r"^NVIDIA-SMI couldn't find libnvidia-ml\.so"),
     "driver_not_loaded", "nvidia-smi: the NVML library is missing ({line}). "
                          "Install the NVIDIA driver."),
    (re.compile(r"^Failed to initialize NVML: Driver/library version mismatch", re.I),
     "nvml_mismatch", "nvidia-smi: driver/library version mismatch ({line}). The driver was "
                      "upgraded without reloading the kernel module: reboot the host."),
    (re.compile(r"^Failed to initialize NVML: Unknown Error"),
     "nvml_unknown", "nvidia-smi: NVML failed to initialize ({line}). Inside a container this "
                     "usually means it lost its GPU device access: restart the container."),
    (re.compile(r"^Failed to initialize NVML: (.*)"),
     "nvml_unknown", "nvidia-smi: NVML failed to initialize ({line})."),
    (re.compile(r"^No devices were found"),
     "no_devices", "nvidia-smi: no devices were found (the driver is loaded but lists no GPU)."),
    (re.compile(r"^Unable to determine the device handle for GPU ?(\S+?): GPU is lost"),
     "gpu_lost", "nvidia-smi: GPU is lost (Unable to determine the device handle for GPU "
                 "{g1}). Reboot the host to recover it."),
    (re.compile(r"^Unable to determine the device handle for GPU ?(\S+?): (.*)"),
     "device_handle", "nvidia-smi: cannot reach GPU {g1} ({g2}); every GPU of this host is "
                      "treated as unknown until it is fixed (usually a reboot)."),
    (re.compile(r'^Field "([^"]*)" is not a valid field to query'),
     "failed", "nvidia-smi: this driver does not know the field \"{g1}\" ({line})"),
]


def detect_error(text):
    """The NvidiaSmiError that `text` (any nvidia-smi output) reports, or None."""
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        for rx, kind, tmpl in _ERRORS:
            m = rx.match(line)
            if m:
                groups = {"g%d" % (i + 1): g for i, g in enumerate(m.groups())}
                return NvidiaSmiError(kind, tmpl.format(line=line, **groups))
    return None


def _raise_if_error(text):
    err = detect_error(text)
    if err is not None:
        raise err


# ------------------------------------------------------------------ CSV

def canonical(field):
    """The name nvidia-smi prints in the header for a queried field (units stripped)."""
    field = re.sub(r"\s*\[[^\]]*\]\s*$", "", field.strip())
    return _CANON.get(field, field)


def _is_numeric(field, unit):
    f = canonical(field)
    if unit:
        return True
    return f in _NUMERIC or f.startswith(_NUMERIC_PREFIXES)


_NUM = re.compile(r"^(-?\d+(?:\.\d+)?)\s*([A-Za-z%]*)$")


def _missing(value):
    v = value.strip()
    return (not v or (v.startswith("[") and v.endswith("]")) or v in ("N/A", "ERR!")
            or v.upper() in ("N/A", "NA", "UNKNOWN ERROR"))


def convert(value, numeric):
    """One CSV cell -> int/float/str, or None when nvidia-smi has no value for it."""
    if value is None or _missing(value):
        return None
    v = value.strip()
    if not numeric:
        return v
    m = _NUM.match(v)
    if not m:
        return None
    num, unit = m.group(1), m.group(2)
    x = float(num) if "." in num else int(num)
    factor = _TO_MIB.get(unit)
    if factor is not None and factor != 1:
        x = x * factor
        x = int(x) if float(x).is_integer() else x
    return x


_HEADER_CELL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(?: \[[^\]]*\])?$")


def parse_csv(text, fields, raw=False, require_header=False):
    """Rows of `--format=csv[,noheader][,nounits]` output as dicts keyed by `fields`.

    A header, if present, must name the requested fields (aliases and `[unit]` suffixes allowed).
    Lines that are not rows (warnings such as `WARNING: infoROM is corrupted ...`) are dropped.
    The last field may contain ", " (process names are never quoted). With raw=True the values
    are the cell strings as printed. Error texts raise NvidiaSmiError.
    """
    fields = list(fields)
    n = len(fields)
    lines = [l for l in (text or "").splitlines() if l.strip()]
    rows = []
    units = [None] * n
    header_seen = False
    want = [canonical(f) for f in fields]
    for line in lines:
        line = line.rstrip("\r")
        if not header_seen and not rows and not line.startswith("WARNING"):
            cells = [c.strip() for c in line.split(", ")]
            names = [canonical(c) for c in cells]
            if all(_HEADER_CELL.match(c) for c in cells) and (
                    any(" [" in c for c in cells) or any(x in want for x in names)):
                if names != want:
                    raise NvidiaSmiError("bad_output", "nvidia-smi: unexpected CSV header %r "
                                         "(asked for %s)" % (line.strip(), ", ".join(fields)))
                units = [(re.search(r"\[([^\]]*)\]$", c) or [None, None])[1] for c in cells]
                header_seen = True
                continue
        _raise_if_error(line)
        if line.startswith("WARNING") or line.startswith("Warning"):
            continue
        cells = line.split(", ", n - 1) if n > 1 else [line]
        if len(cells) != n:
            continue
        if raw:
            rows.append(dict(zip(fields, cells)))
        else:
            rows.append({f: convert(c, _is_numeric(f, u)) for f, c, u in zip(fields, cells, units)})
    if require_header and not header_seen:
        _raise_if_error(text)
        raise NvidiaSmiError("bad_output", "nvidia-smi printed no CSV header: %s" % _first_line(text))
    return rows


def _first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return repr(line.strip()[:200])
    return "(empty output)"


# ------------------------------------------------------------------ -L

_L_GPU = re.compile(r"^GPU (\d+): (.*?) \(UUID: ([^)]+)\)\s*$")
_L_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: ([^)]+)\)\s*$")


def parse_list(text):
    """`nvidia-smi -L` -> [{"index", "name", "uuid", "mig": [{"device", "profile", "uuid"}]}]."""
    gpus = []
    for line in (text or "").splitlines():
        m = _L_GPU.match(line)
        if m:
            gpus.append({"index": int(m.group(1)), "name": m.group(2), "uuid": m.group(3),
                         "mig": []})
            continue
        m = _L_MIG.match(line)
        if m and gpus:
            gpus[-1]["mig"].append({"device": int(m.group(2)), "profile": m.group(1),
                                    "uuid": m.group(3)})
            continue
        if line.strip():
            _raise_if_error(line)
    if not gpus:
        _raise_if_error(text)
    return gpus


# ------------------------------------------------------------------ -q -x

def _txt(el, path):
    if el is None:
        return None
    found = el.find(path)
    if found is None or found.text is None:
        return None
    return found.text.strip()


def _xnum(el, path):
    return convert(_txt(el, path), True)


def parse_xml(text):
    """`nvidia-smi -q -x` -> {gpu uuid: {"index", "name", "bus_id", "mig_mode", "memory_used",
    "memory_total", "mig_devices": [{"index", "gpu_instance_id", "compute_instance_id",
    "memory_used", "memory_total"}], "processes": [{"pid", "gpu_instance_id",
    "compute_instance_id", "used_memory", "process_name", "type"}]}}.

    Tolerates schema drift: missing elements give None, `<mig_devices>None</mig_devices>` and
    empty `<processes>` give [], "N/A" values give None.
    """
    text = text or ""
    if "<nvidia_smi_log" not in text:
        _raise_if_error(text)
        raise NvidiaSmiError("bad_output", "nvidia-smi -q -x printed no XML: %s" % _first_line(text))
    # Drop the DOCTYPE (external DTD) and anything printed before the XML declaration.
    start = text.find("<?xml")
    if start < 0:
        start = text.find("<nvidia_smi_log")
    body = re.sub(r"<!DOCTYPE[^>]*>", "", text[start:], count=1)
    end = body.rfind("</nvidia_smi_log>")
    if end >= 0:
        body = body[:end + len("</nvidia_smi_log>")]
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise NvidiaSmiError("bad_output", "nvidia-smi -q -x printed invalid XML: %s" % e)
    out = {}
    for pos, gpu in enumerate(root.findall("gpu")):
        uuid = _txt(gpu, "uuid")
        if not uuid:
            continue
        devs = []
        md = gpu.find("mig_devices")
        for d in (md.findall("mig_device") if md is not None else []):
            devs.append({
                "index": _xnum(d, "index"),
                "gpu_instance_id": _xnum(d, "gpu_instance_id"),
                "compute_instance_id": _xnum(d, "compute_instance_id"),
                "memory_used": _xnum(d, "fb_memory_usage/used"),
                "memory_total": _xnum(d, "fb_memory_usage/total"),
            })
        procs = []
        pr = gpu.find("processes")
        for p in (pr.findall("process_info") if pr is not None else []):
            procs.append({
                "pid": _xnum(p, "pid"),
                "gpu_instance_id": _xnum(p, "gpu_instance_id"),
                "compute_instance_id": _xnum(p, "compute_instance_id"),
                "used_memory": _xnum(p, "used_memory"),
                "process_name": _txt(p, "process_name") or "",
                "type": _txt(p, "type"),
            })
        mig_mode = _txt(gpu, "mig_mode/current_mig")
        out[uuid] = {
            "index": _xnum(gpu, "index") if gpu.find("index") is not None else pos,
            "name": _txt(gpu, "product_name"),
            "bus_id": gpu.get("id") or _txt(gpu, "pci/pci_bus_id"),
            "mig_mode": None if mig_mode in (None, "N/A") else mig_mode,
            "memory_used": _xnum(gpu, "fb_memory_usage/used"),
            "memory_total": _xnum(gpu, "fb_memory_usage/total"),
            "compute_mode": _txt(gpu, "compute_mode"),
            "mig_devices": devs,
            "processes": procs,
        }
    return out


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
            _raise_if_error(out + "\n" + err)
            if rc != 0:
                raise NvidiaSmiError("failed", "nvidia-smi %s failed (exit %d): %s" % (
                    flag, rc, _first_line(out.strip() and out or err)))
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
                _raise_if_error(err)
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
