"""How many GPUs this host has, as nvidia-smi last said, kept in RTRAIN_HOME (gpus.json).

A submit must refuse more GPUs than the host has. Asking nvidia-smi for that on every submit
costs tens of milliseconds (more with many GPUs), and the answer changes only when the driver or
the hardware does; so the daemon and submit record each answer here, and submit trusts one that
is younger than MAX_AGE_S and was given by the same nvidia-smi for the same visible GPUs
(Settings.gpu_count_key).
"""
import json
import os
import time

MAX_AGE_S = 30.0


def save(home, k, count):
    tmp = "%s.tmp%d" % (home.gpu_inventory, os.getpid())
    try:
        with open(tmp, "w") as f:
            json.dump({"key": k, "count": count, "at": time.time()}, f)
        os.replace(tmp, home.gpu_inventory)
    except OSError:
        pass  # only a cache


def forget(home):
    try:
        os.unlink(home.gpu_inventory)
    except OSError:
        pass


def cached_count(home, k, max_age=MAX_AGE_S):
    """The recorded count for key k if it is fresh, else None."""
    try:
        with open(home.gpu_inventory) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("key") != k:
        return None
    age = time.time() - float(rec.get("at") or 0)
    if not 0 <= age < max_age:
        return None
    return rec.get("count")
