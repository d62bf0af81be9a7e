"""Helpers for the simulated nvidia-smi in tests/fakes/nvidia-smi (its docstring has the state
file format)."""
import json
import os
import shutil
from pathlib import Path

FAKE = Path(__file__).resolve().parent / "fakes" / "nvidia-smi"
STATE_NAME = "nvidia-smi-state.json"

# name -> memory.total MiB (what nvidia-smi reports for these boards)
MEMORY = {"NVIDIA A100-SXM4-40GB": 40960, "NVIDIA A100-SXM4-80GB": 81920,
          "NVIDIA H100 80GB HBM3": 81559, "NVIDIA H200": 143771,
          "NVIDIA GeForce RTX 3090": 24576, "Tesla V100-SXM2-16GB": 16384}


def gpu_uuid(i, seed=0):
    """A stable, realistic-looking GPU UUID (8-4-4-4-12 hex)."""
    h = "%08x" % ((0x5f3a91c2 + 0x1000193 * (i + 1) + 0x9e3779b1 * seed) & 0xffffffff)
    return "GPU-%s-%04x-%04x-%04x-%012x" % (h, (0x1b2c + 17 * i) & 0xffff, (0x4d5e + i) & 0xffff,
                                          (0x8f90 + 31 * i) & 0xffff,
                                          (0x0a1b2c3d4e5f + 0x111111 * i + seed) & 0xffffffffffff)


def mig_uuid(gpu_i, dev, seed=0):
    return "MIG-%08x-%04x-5%03x-%04x-%012x" % (
        (0x2c7d4a10 + 0x10001 * gpu_i + 0x9e3779b1 * seed) & 0xffffffff, (0x6e1f + dev) & 0xffff,
        (0x0a0 + 16 * gpu_i + dev) & 0xfff, (0xa3b4 + dev) & 0xffff,
        (0x1f2e3d4c5b6a + 0x10101 * gpu_i + dev) & 0xffffffffffff)


def make_gpu(i, name="NVIDIA A100-SXM4-40GB", seed=0, **fields):
    g = {"index": i, "uuid": gpu_uuid(i, seed), "name": name,
         "pci.bus_id": "00000000:%02X:00.0" % (0x07 + 0x08 * i if i < 30 else i),
         "memory.total": MEMORY.get(name, 40960), "memory.used": 3, "memory.reserved": 0,
         "utilization.gpu": 0, "utilization.memory": 0, "compute_mode": "Default",
         "temperature.gpu": 31 + i, "power.draw": 52.31 + i, "pstate": "P0",
         "serial": "13240%08d" % (1000 + i), "mig": None}
    g.update(fields)
    return g


def make_mig(gpu_i, profiles=("3g.20gb", "2g.10gb", "1g.5gb"), seed=0):
    """MIG devices for one GPU: one GPU instance per profile, compute instance 0."""
    sizes = {"1g.5gb": 4864, "1g.10gb": 9728, "2g.10gb": 9856, "3g.20gb": 19968,
             "4g.20gb": 19968, "7g.40gb": 40192, "1g.18gb": 16384, "2g.35gb": 32512,
             "3g.71gb": 69632}
    out = []
    for d, p in enumerate(profiles):
        base = p.split(".", 1)[1] if p.count(".") == 2 else p
        out.append({"uuid": mig_uuid(gpu_i, d, seed), "profile": p, "gi": d + 1, "ci": 0,
                    "memory.used": 13, "memory.total": sizes.get(base, sizes.get(p, 9728))})
    return out


def build_state(gpus=4, name="NVIDIA A100-SXM4-40GB", apps=(), error=None, **overrides):
    """The state dict. `gpus` is a count or a list of GPU dicts (missing keys are filled in).
    `overrides`: top-level keys (driver_version, delay_s, ...), or `gpu<N>={...}` to update GPU N,
    or `mig={N: [profiles]}` to enable MIG on GPU N."""
    if isinstance(gpus, int):
        glist = [make_gpu(i, name) for i in range(gpus)]
    else:
        glist = [dict(make_gpu(g.get("index", i), g.get("name", name)), **g)
                 for i, g in enumerate(gpus)]
    mig = overrides.pop("mig", None) or {}
    for i, profiles in mig.items():
        glist[int(i)]["mig"] = make_mig(int(i), profiles)
    for key in list(overrides):
        if key.startswith("gpu") and key[3:].isdigit():
            glist[int(key[3:])].update(overrides.pop(key))
    state = {"driver_version": "550.127.05", "cuda_version": "12.4", "gpus": glist,
             "apps": [dict(a) for a in apps], "error": error, "delay_s": 0}
    state.update(overrides)
    return state


def write_state(path, gpus=4, name="NVIDIA A100-SXM4-40GB", apps=(), error=None, **overrides):
    """Write a realistic fake-nvidia-smi state to `path` (atomically); returns the state dict."""
    state = build_state(gpus=gpus, name=name, apps=apps, error=error, **overrides)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp%d" % os.getpid())
    tmp.write_text(json.dumps(state, indent=1))
    os.chmod(str(tmp), 0o644)  # other users (other uids) run the same fake
    os.replace(str(tmp), str(path))
    return state


def install(bin_dir, state=None, **kw):
    """Copy the fake nvidia-smi into bin_dir (mode 755) next to its state file
    (bin_dir/nvidia-smi-state.json, which it reads when FAKE_NVIDIA_SMI_STATE is unset).
    `state`: a dict to write as is; else write_state(**kw). Returns the state file's path."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    dest = bin_dir / "nvidia-smi"
    shutil.copyfile(str(FAKE), str(dest))
    os.chmod(str(dest), 0o755)
    state_path = bin_dir / STATE_NAME
    if state is not None:
        state_path.write_text(json.dumps(state, indent=1))
        os.chmod(str(state_path), 0o644)
    else:
        write_state(state_path, **kw)
    return state_path
