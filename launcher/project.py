"""The project file, rtrain.yaml at the project's root -> a frozen Project: the defaults of
`rtrain submit` (the command line wins), the job's environment, data, mounts and outputs.
Unknown keys, wrong types and bad values are one error line with the file and line number."""
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import ConfigError

FILENAME = "rtrain.yaml"
KEYS = {
    "project": "a name for the project on the hosts (outputs are kept per project; default: "
               "the folder's name)",
    "run": "the command a bare `rtrain submit` runs (a string for the shell, or a list)",
    "gpus": "GPUs a job needs (default 0; 0.5, 0.33, 0.25: a share of one GPU)",
    "host": "the host to submit to (default: hosts.yaml's default)",
    "env": "variables for the jobs; $VAR and ${VAR} expand on the host, $$ is a $",
    "setup": "commands that build the project's environment on the host (e.g. pip install -r "
             "requirements.txt); built once per content and reused",
    "setup_files": "files the setup reads (default: requirements*.txt, pyproject.toml, uv.lock, "
                   "environment.yml at the root)",
    "python": "the interpreter on the host (default python3): jobs get it as python and python3",
    "venv": "an existing venv on the host to run jobs in",
    "conda": "an environment.yml in the project: the environment is a conda env built from it",
    "conda_env": "an existing conda env on the host (a name or a path)",
    "shell": "login: run jobs (and the setup) through your login shell (profiles, module load)",
    "data": "paths sent even when ignored, shared read-only by the jobs (not copied per job)",
    "mounts": "work-dir path: host path, for data that already lives on the host",
    "outputs": "work-dir paths kept per project and host, shared by its jobs (checkpoints)",
    "image": "run the jobs in this container image (docker or podman on the host)",
    "build": "a Dockerfile in the project: the jobs' image is built on the host from the job's "
             "snapshot, once per content of the Dockerfile and the files it copies",
    "container": "container settings: network (host), shm_size (8g), ipc, pull (missing), "
                 "build_network (none unless the Dockerfile has RUN steps)",
    "hosts": "per host: python, venv, conda_env, env, mounts, image, build for that host only",
    "sweep": "variables to sweep: one job per combination, {name} in `run` is its value "
             "(lr: [1e-3, 3e-4], seed: 0..4)",
    "notify": "a webhook told when the jobs end or stall (over the host's notify:): {url, format: "
              "json|slack|discord|ntfy, on: [failed, succeeded, stalled]}",
    "stall_after": "mark a running job whose GPUs stay idle this long (30m; over the host's)",
    "on_stall": "notify (default) or cancel a stalled job",
}
HOST_OVERRIDES = ("python", "venv", "conda_env", "env", "mounts", "image", "build")
ENV_KEYS = ("setup", "conda", "python", "venv", "conda_env")  # a host environment: not in a container
SETUP_FILES = ("requirements*.txt", "pyproject.toml", "uv.lock", "environment.yml")
_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,99}\Z")
_VAR = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Project:
    path: Optional[str] = None           # the file; None: no project file
    root: str = "."
    project: str = "default"
    run: Optional[Tuple[str, ...]] = None  # one string: a shell command; several: an argv
    gpus: Optional[float] = None
    sweep: Tuple[Tuple[str, object], ...] = ()  # (name, tuple of values or "a..b")
    host: Optional[str] = None
    env: Tuple[Tuple[str, str], ...] = ()
    setup: Optional[str] = None
    setup_files: Optional[Tuple[str, ...]] = None
    python: Optional[str] = None
    venv: Optional[str] = None
    conda: Optional[str] = None
    conda_env: Optional[str] = None
    shell: Optional[str] = None
    data: Tuple[str, ...] = ()
    mounts: Tuple[Tuple[str, str], ...] = ()
    outputs: Tuple[str, ...] = ()
    image: Optional[str] = None
    build: Optional[str] = None            # a Dockerfile, relative to the root
    container: Tuple[Tuple[str, str], ...] = ()
    hosts: dict = field(default_factory=dict)  # host -> {key: value} of HOST_OVERRIDES
    notify: Optional[dict] = field(default=None, hash=False)  # checked by agent/notify.py
    stall_after: Optional[float] = None
    on_stall: Optional[str] = None

    def for_host(self, name):
        """The project with `hosts: NAME:`'s values applied (env and mounts are merged)."""
        over = self.hosts.get(name)
        if not over:
            return self
        import dataclasses
        kw = {k: v for k, v in over.items() if k in ("python", "venv", "conda_env")}
        if "env" in over:
            kw["env"] = tuple(dict(dict(self.env), **dict(over["env"])).items())
        if "mounts" in over:
            kw["mounts"] = tuple(dict(dict(self.mounts), **dict(over["mounts"])).items())
        if "venv" in kw or "conda_env" in kw:  # an environment named for this host wins
            kw.setdefault("venv", None if "conda_env" in kw else kw.get("venv"))
            kw.setdefault("conda_env", None)
            kw["setup"], kw["conda"] = None, None
            kw["image"], kw["build"] = None, None
        if "image" in over or "build" in over:  # a container for this host: the image is its environment
            kw["image"], kw["build"] = over.get("image"), over.get("build")
        return dataclasses.replace(self, **kw)

    def with_image(self, image):
        """The project as a job of --image IMAGE runs it: in that image, with no host environment."""
        import dataclasses
        return dataclasses.replace(self, image=image, build=None)

    def host_env_keys(self):
        """The keys of a host environment this project sets (a container job does not use them)."""
        return [k for k in ENV_KEYS if getattr(self, k)] + (["shell"] if self.shell else [])


def find(root):
    """The project file of the tree at root, or None."""
    p = os.path.join(os.path.abspath(root), FILENAME)
    return p if os.path.isfile(p) else None


def load(root):
    path = find(root)
    root = os.path.abspath(root)
    if path is None:
        return Project(root=root, project=_default_name(root))
    from .parsecache import cached
    return cached(path, parse, root)


def _default_name(root):
    name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(root.rstrip("/")) or "default")
    name = name.lstrip(".-") or "default"
    return name[:100]


def parse(path, root=None):
    import yaml

    from .config import _loader, compose
    root = os.path.abspath(root or os.path.dirname(path))
    node = compose(path, "fix the YAML at that line (`rtrain init` writes a commented example)")
    if node is None:
        return Project(path=path, root=root, project=_default_name(root))
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("%s:%d: the project file must be a mapping of keys" % (
            path, node.start_mark.line + 1), "`rtrain init` writes a commented example")
    kw = {"path": path, "root": root, "project": _default_name(root)}
    for knode, vnode in node.value:
        key, line = knode.value, knode.start_mark.line + 1
        if key not in KEYS:
            raise ConfigError("%s:%d: unknown key '%s'; valid keys: %s" % (
                path, line, key, ", ".join(KEYS)), "check the spelling (the README lists every key)")
        value = yaml.load(yaml.serialize(vnode), Loader=_loader()) if vnode is not None else None
        where = "%s:%d" % (path, vnode.start_mark.line + 1 if vnode is not None else line)
        if key == "hosts":
            kw["hosts"] = _hosts(value, vnode, path, where)
        else:
            kw[key] = _value(key, value, where)
    _check_combination(kw, path)
    return Project(**kw)


def _bad(where, key, what, value):
    raise ConfigError("%s: '%s' must be %s, got %r" % (where, key, what, value),
                      "see the README's `rtrain.yaml` section")


def _relpath(where, key, p):
    if not isinstance(p, str) or not p.strip():
        _bad(where, key, "a list of paths inside the project", p)
    q = p.strip().rstrip("/")
    while q.startswith("./"):
        q = q[2:]
    parts = q.split("/")
    if q.startswith("/") or not q or any(x in ("", ".", "..") for x in parts):
        raise ConfigError("%s: '%s': %r is not a path inside the project" % (where, key, p),
                          "give it relative to the project's root, without `..`")
    return q


def _value(key, v, where):
    if key in ("project",):
        if not isinstance(v, str) or not _NAME.match(v):
            _bad(where, key, "a name of letters, digits, '.', '_' or '-'", v)
        return v
    if key == "run":
        if isinstance(v, str) and v.strip():
            return (v,)
        if isinstance(v, list) and v and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                             for x in v):
            return tuple(str(x) for x in v)
        _bad(where, key, "a command (a string, or a list of arguments)", v)
    if key == "gpus":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v != int(v) and v > 1):
            _bad(where, key, "a whole number, 0 or more, or a share of one GPU (0.5, 0.33, 0.25)", v)
        return v
    if key == "sweep":
        if not isinstance(v, dict) or not v or not all(isinstance(k, str) and _VAR.match(k) for k in v):
            _bad(where, key, "a mapping of variable names to values (lr: [1e-3, 3e-4], seed: 0..4)", v)
        out = []
        for k, x in v.items():
            if isinstance(x, list) and x and all(isinstance(y, (str, int, float)) and not isinstance(y, bool)
                                                 for y in x):
                out.append((k, tuple(str(y) for y in x)))
            elif isinstance(x, str) and x.strip():
                out.append((k, x))
            else:
                _bad(where, "sweep: %s" % k, "a non-empty list of values or a range a..b", x)
        return tuple(out)
    if key in ("host", "python", "venv", "conda", "conda_env", "build"):
        if not isinstance(v, str) or not v.strip():
            _bad(where, key, "a non-empty string", v)
        return _relpath(where, key, v) if key in ("conda", "build") else v.strip()
    if key in ("image", "container"):
        return _container_value(key, v, where)
    if key in ("notify", "stall_after", "on_stall"):
        return _watch_value(key, v, where)
    if key == "shell":
        if v not in ("login", "plain"):
            _bad(where, key, "'login' or 'plain'", v)
        return None if v == "plain" else v
    if key == "setup":
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            return "\n".join(v)
        if isinstance(v, str) and v.strip():
            return v
        _bad(where, key, "a command or a list of commands", v)
    if key == "env":
        if not isinstance(v, dict) or not all(isinstance(k, str) and _VAR.match(k) for k in v):
            _bad(where, key, "a mapping of NAME: value", v)
        if any(isinstance(x, (dict, list)) for x in v.values()):
            _bad(where, key, "a mapping of NAME: value (values are strings)", v)
        return tuple((k, "" if x is None else (str(x).lower() if isinstance(x, bool) else str(x)))
                     for k, x in v.items())
    if key == "mounts":
        if not isinstance(v, dict) or not all(isinstance(x, str) and x.strip() for x in v.values()):
            _bad(where, key, "a mapping of work-dir path: host path", v)
        out = []
        for rel, target in v.items():
            if not (target.startswith("/") or target.startswith("~")):
                raise ConfigError("%s: 'mounts': %s: the host path %r must be absolute" % (
                    where, rel, target), "write it as /datasets/x or ~/datasets/x")
            out.append((_relpath(where, key, rel), target))
        return tuple(out)
    # data, outputs, setup_files: lists of paths (one path alone will do)
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        _bad(where, key, "a list of paths inside the project", v)
    if key == "setup_files":
        return tuple(_relpath(where, key, x) for x in v)
    return tuple(_relpath(where, key, x) for x in v)


def _container_value(key, v, where):
    """`image:` and `container:`, checked by the agent's own rules (agent/containers.py)."""
    from .agent import containers
    if key == "image":
        if not isinstance(v, str) or not v.strip():
            _bad(where, key, "an image name such as python:3.12-slim", v)
        raw = {"image": v.strip()}
    else:
        if not isinstance(v, dict) or not all(k in containers.PROJECT_KEYS for k in v):
            _bad(where, key, "a mapping of %s" % ", ".join(containers.PROJECT_KEYS), v)
        raw = dict({k: str(x) for k, x in v.items()}, image="x")
    try:
        containers.settings(raw)
    except containers.ContainerError as e:
        raise ConfigError("%s: '%s': %s" % (where, key, e.message), e.hint or "see the README's `rtrain.yaml` section")
    return v.strip() if key == "image" else tuple((k, str(x)) for k, x in v.items())


def _hosts(v, node, path, where):
    import yaml
    if not isinstance(v, dict) or not isinstance(node, yaml.MappingNode):
        _bad(where, "hosts", "a mapping of host names to settings", v)
    out = {}
    for hk, hv in node.value:
        lines = {k.value: "%s:%d" % (path, k.start_mark.line + 1) for k, _ in getattr(hv, "value", ())
                 if isinstance(hv, yaml.MappingNode)}
        settings = v[hk.value]
        if not isinstance(settings, dict):
            _bad("%s:%d" % (path, hk.start_mark.line + 1), "hosts: %s" % hk.value,
                 "a mapping of %s" % ", ".join(HOST_OVERRIDES), settings)
        over = {}
        for k, x in settings.items():
            if k not in HOST_OVERRIDES:
                raise ConfigError("%s: unknown key '%s' under hosts: %s; valid keys: %s" % (
                    lines.get(k, where), k, hk.value, ", ".join(HOST_OVERRIDES)))
            over[k] = _value(k, x, lines.get(k, where))
        out[hk.value] = over
    return out


def _check_combination(kw, path):
    if kw.get("image") and kw.get("build"):
        raise ConfigError("%s: image and build cannot go together: build makes the jobs' image" % path,
                          "keep one of them")
    ctr = [k for k in ("image", "build") if kw.get(k)]
    env = [k for k in ENV_KEYS + ("shell",) if kw.get(k)]
    if ctr and env:
        raise ConfigError("%s: %s and %s cannot go together: in a container the image is the "
                          "environment" % (path, ctr[0], " and ".join(env)),
                          "install the requirements in a Dockerfile (`build:`), or set %s per host "
                          "under `hosts:`" % ctr[0])
    named = [k for k in ("venv", "conda_env") if kw.get(k)]
    built = [k for k in ("setup", "conda") if kw.get(k)]
    if len(named) > 1 or (named and built):
        raise ConfigError("%s: %s cannot go together: one names an environment, the other %s" % (
            path, " and ".join(named + built), "builds one" if built else "names another"),
            "keep one of them")
    taken = [(p, k) for k in ("data", "outputs") for p in kw.get(k, ())] + \
            [(p, "mounts") for p, _ in kw.get("mounts", ())]
    for a, ka in taken:
        for b, kb in taken:
            if (a, ka) != (b, kb) and (a == b or b.startswith(a + "/")):
                raise ConfigError("%s: %s (in %s) and %s (in %s) overlap" % (path, a, ka, b, kb),
                                  "a path is data, an output or a mount, not two of them")


STARTER = """\
# rtrain.yaml: this project's defaults for `rtrain submit` (the command line wins).
# Every key is optional; see the README's "rtrain.yaml" section.

# The command a bare `rtrain submit` runs.
run: python3 train.py

# GPUs per job (0.5: two jobs share one GPU), and the host (a name from hosts.yaml).
# gpus: 1
# host: tower

# One job per combination: {lr} and {seed} in `run` are the values (rtrain submit --sweep ... too).
# sweep:
#   lr: [1e-3, 3e-4]
#   seed: 0..4

# The environment, built once on each host and reused while these lines and the files they
# read (requirements*.txt, pyproject.toml, uv.lock, environment.yml) stay the same.
# A venv (made with uv where the host has it); jobs run with it activated.
setup: pip install -r requirements.txt
# python: python3.11          # the interpreter to build it with (default python3)
# conda: environment.yml      # or a conda env built from this file
# venv: ~/venvs/torch         # or run in an existing venv / conda env instead
# conda_env: torch

# Or run the jobs in a container (docker or podman on the host) instead of an environment:
# image: nvcr.io/nvidia/pytorch:24.05-py3
# build: Dockerfile           # or an image built on the host from this Dockerfile, once per content
# container: {network: host, shm_size: 8g}

# Variables for the jobs: $VAR and ${VAR} expand on the host, $$ is a literal $.
# env:
#   PATH: /opt/cuda/bin:$PATH
#   WANDB_MODE: offline

# Run jobs through your login shell (your profile, `module load`).
# shell: login

# Data: sent even when .gitignore'd, by content (only what changed), shared read-only by
# the jobs at the same relative path, never copied per job.
# data:
#   - data/shakespeare_char
# Data that already lives on the host, linked into the work dir.
# mounts:
#   data/imagenet: /datasets/imagenet

# Outputs kept per project and host, shared by its jobs (job 2 resumes from job 1's
# checkpoint); `rtrain pull JOB out` fetches them.
# outputs:
#   - out
"""


def write_starter(root, force=False):
    """Write a commented rtrain.yaml at root; returns its path."""
    path = os.path.join(os.path.abspath(root), FILENAME)
    if os.path.exists(path) and not force:
        from .errors import RtrainError
        raise RtrainError("%s exists already" % path, "edit it, or pass --force to replace it")
    with open(path, "w") as f:
        f.write(STARTER)
    return path


def _watch_value(key, v, where):
    """notify, stall_after, on_stall: the agent's own rules (agent/notify.py, autostop.py)."""
    from .agent import autostop, notify
    try:
        if key == "notify":
            return notify.check(v)
        if key == "stall_after":
            return autostop.seconds(v, "stall_after")
    except ValueError as e:
        _bad(where, key, "valid (%s)" % e, v)
    if v not in ("notify", "cancel"):
        _bad(where, key, "notify or cancel", v)
    return v
