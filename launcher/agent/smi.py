"""nvidia-smi's outputs, parsed: CSV queries, `-L` listings, `-q -x` XML, and the error texts
it prints instead (see tests/fixtures/nvidia-smi/NOTES.md for what a parser must survive).

Standard library only, Python >= 3.8 (this module ships inside the agent zipapp).
Only the machine-readable interfaces are used; the default table is never parsed: its layout
drifts between drivers and truncates names.
"""
import re
import xml.etree.ElementTree as ET

GPU_FIELDS = ["index", "uuid", "pci.bus_id", "name", "mig.mode.current", "compute_mode",
              "memory.total", "memory.used", "memory.free", "utilization.gpu"]
APP_FIELDS = ["gpu_uuid", "pid", "used_memory", "process_name"]

# Fields nvidia-smi accepts under two names (`nvidia-smi --help-query-gpu` lists both), as
# NAME=ALIAS: the header always prints the NAME.
_ALIASES = """
name=gpu_name serial=gpu_serial uuid=gpu_uuid pci.bus_id=gpu_bus_id used_memory=used_gpu_memory
inforom.img=inforom.image inforom.pwr=inforom.power gom.current=gpu_operation_mode.current
gom.pending=gpu_operation_mode.pending retired_pages.single_bit_ecc.count=retired_pages.sbe
retired_pages.double_bit.count=retired_pages.dbe remapped_rows.correctable=remapped_rows.sbe
remapped_rows.uncorrectable=remapped_rows.dbe power.draw.average=gpu.power.draw.average
power.draw.instant=gpu.power.draw.instant power.limit=gpu.power.requested_limit
enforced.power.limit=gpu.power.current_limit power.default_limit=gpu.power.default_limit
power.min_limit=gpu.power.min_limit power.max_limit=gpu.power.max_limit
module.power.limit=module.power.requested_limit
module.enforced.power.limit=module.power.current_limit clocks.current.graphics=clocks.gr
clocks.current.sm=clocks.sm clocks.current.memory=clocks.mem clocks.current.video=clocks.video
clocks.applications.graphics=clocks.applications.gr
clocks.applications.memory=clocks.applications.mem
clocks.default_applications.graphics=clocks.default_applications.gr
clocks.default_applications.memory=clocks.default_applications.mem
clocks.max.graphics=clocks.max.gr clocks.max.memory=clocks.max.mem
"""
_ALIAS_GROUPS = [tuple(pair.split("=")) for pair in _ALIASES.split()]
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


class NvidiaSmiError(Exception):
    """nvidia-smi could not tell us the GPUs. `kind` names the failure (not_found, driver_not_loaded,
    nvml_mismatch, no_devices, device_handle, gpu_lost, nvml_unknown, timeout, bad_output,
    failed), `message` is one line."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


# What nvidia-smi prints instead of an answer: (a regex on one line of it, the kind of failure,
# the key of its message in _SAYS). Specific patterns before the general ones.
_ERRORS = [
    (r"^NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", "driver_not_loaded", "driver"),
    (r"^NVIDIA-SMI couldn't find libnvidia-ml\.so", "driver_not_loaded", "nvml_lib"),
    (r"(?i)^Failed to initialize NVML: Driver/library version mismatch", "nvml_mismatch", "mismatch"),
    (r"^Failed to initialize NVML: Unknown Error", "nvml_unknown", "nvml_container"),
    (r"^Failed to initialize NVML: (.*)", "nvml_unknown", "nvml"),
    (r"^No devices were found", "no_devices", "no_devices"),
    (r"^Unable to determine the device handle for GPU ?(\S+?): GPU is lost", "gpu_lost", "lost"),
    (r"^Unable to determine the device handle for GPU ?(\S+?): (.*)", "device_handle", "handle"),
    (r'^Field "([^"]*)" is not a valid field to query', "failed", "field"),
]
_ERRORS = [(re.compile(rx), kind, says) for rx, kind, says in _ERRORS]

# The one line each says: what happened, then what to do. {line} is nvidia-smi's own line, {g1}
# and {g2} what the pattern caught.
_SAYS = {
    "driver": "nvidia-smi cannot communicate with the NVIDIA driver (kernel module not loaded). "
              "Install or load the driver, or reboot after a driver upgrade.",
    "nvml_lib": "nvidia-smi: the NVML library is missing ({line}). Install the NVIDIA driver.",
    "mismatch": "nvidia-smi: driver/library version mismatch ({line}). The driver was upgraded "
                "without reloading the kernel module: reboot the host.",
    "nvml_container": "nvidia-smi: NVML failed to initialize ({line}). Inside a container this usually "
                      "means it lost its GPU device access: restart the container.",
    "nvml": "nvidia-smi: NVML failed to initialize ({line}).",
    "no_devices": "nvidia-smi: no devices were found (the driver is loaded but lists no GPU).",
    "lost": "nvidia-smi: GPU is lost (Unable to determine the device handle for GPU {g1}). "
            "Reboot the host to recover it.",
    "handle": "nvidia-smi: cannot reach GPU {g1} ({g2}); every GPU of this host is treated as unknown "
              "until it is fixed (usually a reboot).",
    "field": "nvidia-smi: this driver does not know the field \"{g1}\" ({line})",
}


def detect_error(text):
    """The NvidiaSmiError that `text` (any nvidia-smi output) reports, or None."""
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        for rx, kind, says in _ERRORS:
            m = rx.match(line)
            if m:
                groups = {"g%d" % (i + 1): g for i, g in enumerate(m.groups())}
                return NvidiaSmiError(kind, _SAYS[says].format(line=line, **groups))
    return None


def raise_if_error(text):
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
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
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
        raise_if_error(line)
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
        raise_if_error(text)
        raise NvidiaSmiError("bad_output", "nvidia-smi printed no CSV header: %s" % first_line(text))
    return rows


def first_line(text):
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
            raise_if_error(line)
    if not gpus:
        raise_if_error(text)
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


# Fields of a MIG device and of a process in `nvidia-smi -q -x`: (key, path under the element).
_MIG_DEVICE_NUMBERS = (("index", "index"), ("gpu_instance_id", "gpu_instance_id"),
                       ("compute_instance_id", "compute_instance_id"),
                       ("memory_used", "fb_memory_usage/used"), ("memory_total", "fb_memory_usage/total"))
_PROCESS_NUMBERS = (("pid", "pid"), ("gpu_instance_id", "gpu_instance_id"),
                    ("compute_instance_id", "compute_instance_id"), ("used_memory", "used_memory"))
_PROCESS_TEXTS = (("process_name", "process_name"), ("type", "type"))


def _records(el, path, numbers, texts=()):
    """One dict per element at `path` under el: its numeric fields and its text fields."""
    return [dict([(k, _xnum(x, p)) for k, p in numbers] + [(k, _txt(x, p)) for k, p in texts])
            for x in el.findall(path)]


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
        raise_if_error(text)
        raise NvidiaSmiError("bad_output", "nvidia-smi -q -x printed no XML: %s" % first_line(text))
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
        devs = _records(gpu, "mig_devices/mig_device", _MIG_DEVICE_NUMBERS)
        procs = _records(gpu, "processes/process_info", _PROCESS_NUMBERS, _PROCESS_TEXTS)
        for p in procs:
            p["process_name"] = p["process_name"] or ""
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
