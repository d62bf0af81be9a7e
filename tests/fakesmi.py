"""Helpers for the simulated nvidia-smi in tests/fakes/ (see its docstring for the state format)."""
import json
import os
import shutil
from pathlib import Path

FAKE = Path(__file__).resolve().parent / "fakes" / "nvidia-smi"
NAMES = {"NVIDIA A100-SXM4-40GB": (40960, "00000000:%02X:00.0")}


def gpu_uuid(i):
    # realistic shape (8-4-4-4-12 hex), stable across runs
    return "GPU-%08x-7f3a-b2c1-9e4d-%012x" % (0x5a1d0000 + i, 0xa0b1c2d30000 + i)


def write_state(path, gpus=4, name="NVIDIA A100-SXM4-40GB", apps=(), error=None, **overrides):
    state = {
        "driver_version": "550.54.15",
        "gpus": [{"index": i, "uuid": gpu_uuid(i), "name": name, "pci.bus_id": "00000000:%02X:00.0" % (7 + i * 8),
                  "memory.total": 40960, "memory.used": 3, "memory.reserved": 0, "utilization.gpu": 0,
                  "utilization.memory": 0, "temperature.gpu": 31, "compute_mode": "Default",
                  "mig.mode.current": "Disabled", "mig": None, "pstate": "P0", "power.draw": 54.1,
                  "serial": "13230%08d" % i} for i in range(gpus)],
        "apps": list(apps),
        "error": error,
    }
    state.update(overrides)
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, str(path))
    return state


def install(bin_dir, state=None, **kw):
    """Put the fake nvidia-smi in bin_dir with its state file next to it; return the state path."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    dst = bin_dir / "nvidia-smi"
    shutil.copy(str(FAKE), str(dst))
    os.chmod(str(dst), 0o755)
    state_path = bin_dir / "nvidia-smi-state.json"
    if state is not None:
        with open(str(state_path), "w") as f:
            json.dump(state, f)
    else:
        write_state(state_path, **kw)
    os.chmod(str(state_path), 0o644)
    return state_path
