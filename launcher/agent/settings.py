"""Scheduling settings: which GPUs rtrain may hand out on a host, and how it judges them.

One type, with its defaults written once (DEFAULTS). The client makes them from hosts.yaml
(launcher/hosts.py), sends them with each request that needs them (`"settings"`), and submit
stores them with the job: every job is scheduled by the settings it was submitted with, never by
those of whichever submit came last (docs/design.md, "Settings per job").
"""
import collections
import os
import shutil

DEFAULTS = collections.OrderedDict([
    ("mem_busy_mib", 1024),      # a GPU using more memory than this (MiB) is busy
    ("visible", None),           # None: every GPU; else a tuple of indexes or UUIDs
    ("lock_dir", None),          # None: $RTRAIN_LOCK_DIR, else /run/lock or /tmp (paths.py)
    ("nvidia_smi", "nvidia-smi"),
])


class SettingsError(ValueError):
    pass


class Settings(collections.namedtuple("Settings", list(DEFAULTS), defaults=list(DEFAULTS.values()))):
    """Immutable and hashable: the daemon keeps one nvidia-smi view per distinct Settings."""

    __slots__ = ()

    @classmethod
    def from_dict(cls, d):
        """From a request or a job row (JSON); missing keys take their defaults. Raises
        SettingsError on a value of the wrong type."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise SettingsError("settings must be an object, got %r" % (d,))
        kw = {}
        mem = d.get("mem_busy_mib")
        if mem is not None:
            if isinstance(mem, bool) or not isinstance(mem, int) or mem < 0:
                raise SettingsError("mem_busy_mib must be a whole number >= 0, got %r" % (mem,))
            kw["mem_busy_mib"] = mem
        vis = d.get("visible")
        if vis is not None:
            if not isinstance(vis, (list, tuple)) or not all(isinstance(x, str) for x in vis):
                raise SettingsError("visible must be a list of GPU indexes or UUIDs, got %r" % (vis,))
            kw["visible"] = tuple(vis)
        for key in ("lock_dir", "nvidia_smi"):
            v = d.get(key)
            if v is not None:
                if not isinstance(v, str) or not v:
                    raise SettingsError("%s must be a non-empty string, got %r" % (key, v))
                kw[key] = v
        return cls(**kw)

    def to_dict(self):
        d = self._asdict()
        d["visible"] = None if self.visible is None else list(self.visible)
        return dict(d)

    def gpu_count_key(self):
        """What the number of schedulable GPUs depends on (inventory.py caches it by this):
        `resolved` is None when nvidia-smi is not on PATH."""
        from . import gpus
        return {"nvidia_smi": self.nvidia_smi, "visible": self.to_dict()["visible"],
                "resolved": shutil.which(gpus.base_argv(self.nvidia_smi)[0])}

    def resolved_lock_dir(self):
        from . import paths
        return paths.lock_dir(self.lock_dir)


def env_problem(env):
    """Why a job's variables cannot be set (a name with "=" or NUL, or empty; a value with NUL),
    or None. Checked by the client (hosts.yaml `env:`, --env) and by the agent's submit."""
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            return "%r is not a variable name (a name holds neither '=' nor NUL)" % (k,)
        if not isinstance(v, str) or "\0" in v:
            return "the value of %s is not text without NUL bytes" % k
    return None


def from_legacy_config(path):
    """The settings the last submit left in RTRAIN_HOME/config.json before they were stored per
    job (db.py's migration gives them to the jobs of that time)."""
    from . import fsutil
    if not os.path.exists(path):
        return Settings()
    try:
        return Settings.from_dict(fsutil.read_json(path))
    except SettingsError:
        return Settings()
