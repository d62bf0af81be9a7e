"""hosts.yaml -> frozen dataclasses. Unknown keys and wrong types are errors that say where."""
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from . import slurmhost
from .errors import ConfigError

HOST_KEYS = {
    "kind": "local or ssh (default: ssh when `ssh` is set)",
    "ssh": "an alias from ~/.ssh/config, or user@host[:port]",
    "identity_file": "path of the private key to use",
    "python": "python3 on the host (default python3)",
    "gpus": "all, or a list of GPU indexes or UUIDs rtrain may use",
    "home": "RTRAIN_HOME on the host (default ~/.rtrain)",
    "mem_busy_mib": "a GPU using more memory than this (MiB) is busy (default 1024)",
    "accept_new_host_key": "trust an unknown host key on first use (default false)",
    "connect_timeout": "seconds to wait for the host (default 10)",
    "io_timeout": "seconds an SSH call may go without a byte from the host before it fails "
                  "(default 60; `logs -f` has its own stall check)",
    "max_tree_mb": "ask before syncing a tree larger than this (default 100)",
    "max_points": "ask before queueing a sweep or an array of more jobs than this (default 1000)",
    "env": "variables set for every job on this host",
    "lock_dir": "shared sticky directory of GPU lease files (default /run/lock, else /tmp)",
    "nvidia_smi": "nvidia-smi command on the host (default nvidia-smi)",
    "prune_older_than": "`rtrain prune` removes work dirs of jobs ended longer ago (default 14d)",
    "prune_keep": "`rtrain prune` keeps the work dirs of this many newest ended jobs (default 0)",
    "autostop": "stop an idle host: {idle: 30m, command: 'sudo shutdown -h now', gpu_util_busy: 5, "
                "sessions: true, warn: 5m}",
    "notify": "a webhook told when jobs end or stall: {url: ..., format: json|slack|discord|ntfy, "
              "on: [failed, succeeded, stalled]}",
    "stall_after": "mark a running job whose GPUs stay idle this long (e.g. 30m; default: off)",
    "on_stall": "what to do with a stalled job besides saying so: notify (default) or cancel",
    "gpu_util_busy": "a GPU at or below this utilization (percent) counts as idle (default 5)",
    "price_per_gpu_hour": "what one GPU-hour costs on this host (status and usage show costs)",
    "compare_price": "a GPU-hour's price elsewhere (a cloud's), that usage compares with",
    "transport": "openssh or paramiko (default: openssh where an OpenSSH client is installed)",
    "control_persist": "how long a shared OpenSSH connection stays open after use: seconds or "
                       "10m/1h (default 10m); 0 or no: no sharing",
    "container_engine": "docker or podman: what runs container jobs (--image, image: in rtrain.yaml); "
                        "default: podman where you can run it rootless, else docker",
}
HOST_KEYS.update(slurmhost.KEYS)  # scheduler: slurm, and the sbatch options of such a host
TOP_KEYS = ("default", "hosts")


@dataclass(frozen=True)
class Host:
    name: str
    kind: str = "local"
    ssh: Optional[str] = None
    identity_file: Optional[str] = None
    python: str = "python3"
    gpus: Union[str, Tuple[str, ...]] = "all"
    home: Optional[str] = None
    mem_busy_mib: int = 1024
    accept_new_host_key: bool = False
    connect_timeout: float = 10.0
    io_timeout: float = 60.0
    max_tree_mb: int = 100
    max_points: int = 1000
    env: Tuple[Tuple[str, str], ...] = ()
    lock_dir: Optional[str] = None
    nvidia_smi: Optional[str] = None
    prune_older_than: Optional[str] = None
    prune_keep: Optional[int] = None
    autostop: Optional[dict] = field(default=None, hash=False)   # checked by agent/autostop.py
    notify: Optional[dict] = field(default=None, hash=False)     # checked by agent/notify.py
    stall_after: Optional[float] = None
    on_stall: str = "notify"
    gpu_util_busy: float = 5
    price_per_gpu_hour: Optional[float] = None
    compare_price: Optional[float] = None
    transport: Optional[str] = None  # None: openssh where it can be used (sshcommon.transport_of)
    control_persist: str = "10m"     # "no": no connection sharing
    container_engine: Optional[str] = None
    slurm: Optional[dict] = field(default=None, hash=False)  # scheduler: slurm (slurmhost.py)


LOCAL = Host(name="local")


@dataclass(frozen=True)
class Config:
    path: Optional[str]
    default: Optional[str]
    hosts: dict = field(default_factory=dict)

    def get(self, name):
        if name not in self.hosts:
            where = (" in %s" % self.path) if self.path else ""
            raise ConfigError("no such host '%s'; hosts%s: %s" % (name, where, ", ".join(self.hosts)),
                              "add it under `hosts:` (see hosts.example.yaml)" if self.path else
                              "create hosts.yaml (see hosts.example.yaml) or use the `local` host")
        return self.hosts[name]


def find_hosts_file(explicit=None, env=None, cwd=None):
    env = os.environ if env is None else env
    if explicit:
        if not os.path.isfile(explicit):
            raise ConfigError("hosts file %s does not exist" % explicit,
                              "check the path given to --hosts (hosts.example.yaml shows the format)")
        return explicit
    if env.get("RTRAIN_HOSTS"):
        p = env["RTRAIN_HOSTS"]
        if not os.path.isfile(p):
            raise ConfigError("RTRAIN_HOSTS names %s, which does not exist" % p,
                              "fix or unset RTRAIN_HOSTS")
        return p
    for p in (os.path.join(cwd or os.getcwd(), "hosts.yaml"),
              os.path.expanduser("~/.config/rtrain/hosts.yaml")):
        if os.path.isfile(p):
            return p
    return None


def load(explicit=None, env=None, cwd=None):
    path = find_hosts_file(explicit, env, cwd)
    if path is None:
        return Config(path=None, default="local", hosts={"local": LOCAL})
    from .parsecache import cached
    return cached(path, parse)


def _loader():
    import yaml
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def compose(path, hint="fix the YAML at that line (hosts.example.yaml shows the format)"):
    """A YAML file's root node (line numbers kept), or one ConfigError saying where."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("cannot read %s: %s" % (path, e.strerror))
    try:
        return yaml.compose(text, Loader=_loader())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = "%s:%d:%d" % (path, mark.line + 1, mark.column + 1) if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("%s: YAML syntax error: %s" % (where, problem), hint)


def parse(path):
    import yaml
    root = compose(path)
    # `local` (this machine) is a host only where the file lists it (`local:` alone will do),
    # so a file that names only towers never asks this machine anything
    hosts = {}
    if root is None:
        return Config(path=path, default="local", hosts={"local": LOCAL})
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError("%s:%d: the file must be a mapping with `hosts:`" % (path, root.start_mark.line + 1),
                          "see hosts.example.yaml")
    default = None
    default_line = 0
    for knode, vnode in root.value:
        key = knode.value
        line = knode.start_mark.line + 1
        if key not in TOP_KEYS:
            raise ConfigError("%s:%d: unknown key '%s'; valid keys: %s" % (path, line, key, ", ".join(TOP_KEYS)))
        if key == "default":
            if not isinstance(vnode, yaml.ScalarNode) or not vnode.value:
                raise ConfigError("%s:%d: 'default' must be a host name" % (path, line))
            default, default_line = vnode.value, line
        else:
            if not isinstance(vnode, yaml.MappingNode):
                raise ConfigError("%s:%d: 'hosts' must be a mapping of host names to settings" % (path, line),
                                  "see hosts.example.yaml")
            for hk, hv in vnode.value:
                hosts[hk.value] = _host(path, hk.value, hk.start_mark.line + 1, hv)
    if not hosts:
        raise ConfigError("%s: `hosts:` lists no host" % path,
                          "add one (see hosts.example.yaml), or remove the file to use this machine")
    if default is not None and default not in hosts:
        raise ConfigError("%s:%d: default host '%s' is not defined; hosts: %s" % (
            path, default_line, default, ", ".join(hosts)), "add it under `hosts:` or fix the name")
    return Config(path=path, default=default, hosts=hosts)


def _host(path, name, line, node):
    import yaml
    empty = node is None or (isinstance(node, yaml.ScalarNode) and node.value in ("", "null", "~"))
    if name == "local" and empty:
        return LOCAL
    if empty:
        raise ConfigError("%s:%d: host '%s' has no settings" % (path, line, name),
                          "give it at least `ssh: user@host` (see hosts.example.yaml)")
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("%s:%d: host '%s' must be a mapping of settings" % (path, line, name))
    data = yaml.load(yaml.serialize(node), Loader=_loader())
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    for key in data:
        if key not in HOST_KEYS:
            raise ConfigError("%s:%d: unknown key '%s' in host '%s'; valid keys: %s" % (
                path, lines.get(key, line), key, name, ", ".join(sorted(HOST_KEYS))),
                "check the spelling (hosts.example.yaml documents every key)")

    def bad(key, what):
        raise ConfigError("%s:%d: host '%s': '%s' must be %s, got %r" % (
            path, lines.get(key, line), name, key, what, data[key]))

    kw = {"name": name}
    for key in ("ssh", "identity_file", "python", "home", "lock_dir", "nvidia_smi"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                bad(key, "a non-empty string")
            kw[key] = data[key]
    kind = data.get("kind", "ssh" if "ssh" in data else "local" if name == "local" else None)
    if kind not in ("local", "ssh"):
        if kind is None:
            raise ConfigError("%s:%d: host '%s' has no `ssh:` (and is not `kind: local`)" % (path, line, name),
                              "add `ssh: user@host` or an alias from ~/.ssh/config")
        bad("kind", "'local' or 'ssh'")
    if kind == "ssh" and "ssh" not in data:
        raise ConfigError("%s:%d: host '%s' is kind ssh but has no `ssh:`" % (path, line, name),
                          "add `ssh: user@host` or an alias from ~/.ssh/config")
    if name == "local" and kind != "local":
        bad("kind", "'local' for the host named local")
    kw["kind"] = kind
    if "gpus" in data:
        g = data["gpus"]
        if g == "all":
            kw["gpus"] = "all"
        elif isinstance(g, list) and g and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in g):
            kw["gpus"] = tuple(str(x) for x in g)
        else:
            bad("gpus", "'all' or a list of GPU indexes or UUIDs")
    for key, typ, what in (("mem_busy_mib", int, "a whole number of MiB"),
                           ("max_tree_mb", int, "a whole number of MB"),
                           ("max_points", int, "a whole number of jobs"),
                           ("connect_timeout", (int, float), "a number of seconds"),
                           ("io_timeout", (int, float), "a number of seconds above 0")):
        if key in data:
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, typ) or v < 0 or (key == "io_timeout" and v == 0):
                bad(key, what)
            kw[key] = v
    if "prune_older_than" in data:
        from .prune import seconds
        try:
            seconds(data["prune_older_than"])
        except Exception:  # noqa: BLE001 - said as this file's error
            bad("prune_older_than", "an age such as 14d, 12h or 30m")
        kw["prune_older_than"] = str(data["prune_older_than"])
    if "prune_keep" in data:
        if isinstance(data["prune_keep"], bool) or not isinstance(data["prune_keep"], int) or \
                data["prune_keep"] < 0:
            bad("prune_keep", "a whole number, 0 or more")
        kw["prune_keep"] = data["prune_keep"]
    if "accept_new_host_key" in data:
        if not isinstance(data["accept_new_host_key"], bool):
            bad("accept_new_host_key", "true or false")
        kw["accept_new_host_key"] = data["accept_new_host_key"]
    if "transport" in data:
        if data["transport"] not in ("openssh", "paramiko"):
            bad("transport", "openssh or paramiko")
        kw["transport"] = data["transport"]
    if "control_persist" in data:
        kw["control_persist"] = _persist(data["control_persist"]) or bad(
            "control_persist", "a number of seconds, a time like 10m or 1h, or 0/no")
    if "env" in data:
        e = data["env"]
        if not isinstance(e, dict) or not all(isinstance(k, str) for k in e):
            bad("env", "a mapping of NAME: value")
        kw["env"] = tuple((k, "" if v is None else str(v)) for k, v in e.items())
        from .agent.settings import env_problem
        if env_problem(dict(kw["env"])):
            bad("env", "a mapping of NAME: value (%s)" % env_problem(dict(kw["env"])))
    _watch_keys(data, bad, kw)
    if "container_engine" in data and data.get("scheduler") != "slurm":  # (Slurm's: slurmhost.py)
        if data["container_engine"] not in ("docker", "podman"):
            bad("container_engine", "docker or podman")
        kw["container_engine"] = data["container_engine"]
    slurmhost.parse(data, bad, kw)
    return Host(**kw)


def _watch_keys(data, bad, kw):
    """autostop, notify, stall_after, on_stall, gpu_util_busy, prices: checked by the agent's own
    rules (agent/autostop.py, agent/notify.py), so the laptop refuses what the host would."""
    from .agent import autostop, notify
    for key, check in (("autostop", autostop.check), ("notify", notify.check)):
        if key in data:
            try:
                kw[key] = check(data[key])
            except ValueError as e:
                bad(key, "valid (%s)" % e)
    if "stall_after" in data:
        try:
            kw["stall_after"] = autostop.seconds(data["stall_after"], "stall_after")
        except ValueError:
            bad("stall_after", "a duration like 30m or 2h")
    if "on_stall" in data:
        if data["on_stall"] not in ("notify", "cancel"):
            bad("on_stall", "notify or cancel")
        kw["on_stall"] = data["on_stall"]
    for key, top in (("gpu_util_busy", 100), ("price_per_gpu_hour", None), ("compare_price", None)):
        if key in data:
            v = data[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (top and v > top):
                bad(key, "a number from 0 to 100" if top else "a number >= 0")
            kw[key] = v


def _persist(v):
    """control_persist -> what OpenSSH's ControlPersist takes ("no": sharing off), or None."""
    import re
    if v is False or v == 0 or (isinstance(v, str) and v.strip().lower() in ("0", "no", "false", "off")):
        return "no"
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int) and v > 0:
        return str(v)
    if isinstance(v, str) and re.fullmatch(r"(\d+[smhdwSMHDW]?)+", v.strip()):
        return v.strip()
    return None
