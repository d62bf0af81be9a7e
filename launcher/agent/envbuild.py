"""A job's Python environment on the host (docs/design.md "Environments"): one built from the
project's `setup:` (a venv made with uv when the host has it, else `python -m venv` and pip; a
conda env when `conda:` names an environment.yml), cached by the hash of what defines it, or
one that already exists (`python:`, `venv:`, `conda_env:`).

plan() turns a job's `env` spec (from its project.json) into what the scheduler needs: the
environment to activate, the interpreter to put first on PATH, and the build to run first, with
its key. build() is what builds.py runs in its child. Standard library only, Python >= 3.8.
"""
import hashlib
import json
import os
import subprocess
import time

from . import runtime
from .builds import BuildError

PROBE_TTL_S = 60.0
MARK = "RTRAIN-PROBE"
# Fixed text: the user's interpreter name travels in $RTRAIN_PYTHON, never in the script.
PROBE = (
    'echo %s\n'
    'PY=$(command -v "$RTRAIN_PYTHON") || { echo; echo; echo; echo; exit 0; }\n'
    'echo "$PY"\n'
    '"$PY" -c "import sys; print(sys.executable); print(sys.version.split()[0])" 2>/dev/null || '
    '{ echo; echo; }\n'
    'command -v uv || echo\n'
    'command -v conda || command -v mamba || command -v micromamba || echo\n') % MARK
# uv's pip in a setup script: `pip install -r requirements.txt` means `uv pip install ...`
UV_PRELUDE = 'pip() { uv pip "$@"; }\npip3() { uv pip "$@"; }\n'
_probes = {}  # (shell, python, PATH) -> (at, result)


class EnvError(Exception):
    """An environment that cannot be planned: a named venv that is not there, no interpreter."""


def probe(python, env, shell=None):
    """{"python": its path on PATH, "executable", "version", "uv", "conda"} (empty strings for
    what is missing), asked through the job's own shell: a login shell's PATH counts."""
    k = (shell, python, env.get("PATH", ""))
    hit = _probes.get(k)
    if hit and time.monotonic() - hit[0] < PROBE_TTL_S:
        return hit[1]
    rt = {"shell": shell}
    penv = dict(env, RTRAIN_PYTHON=python)
    try:
        p = subprocess.run(runtime.argv(rt, PROBE), env=penv, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60)
        out = p.stdout.decode("utf-8", "replace").splitlines()
    except (OSError, subprocess.SubprocessError):
        out = []
    lines = out[out.index(MARK) + 1:] if MARK in out else []
    lines += [""] * (5 - len(lines))
    res = dict(zip(("python", "executable", "version", "uv", "conda"), [x.strip() for x in lines[:5]]))
    _probes[k] = (time.monotonic(), res)
    return res


def key_of(kind, interpreter, spec):
    """The environment's key: what defines it, hashed (32 hex: venv paths stay short, and a
    script's #! line has room)."""
    text = json.dumps({"kind": kind, "interpreter": interpreter, "setup": spec.get("setup") or "",
                       "files": sorted((spec.get("files") or {}).items()),
                       "conda": spec.get("conda") or ""}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan(spec, env, shell=None, home_dir=None):
    """What a job's env spec means on this host, now:
    {"activate": {"kind", "path", "name"} | None, "python": interpreter path | None,
     "build": {"kind", "key", "tool", "python", "conda_exe"} | None}.
    `env` is the job's environment as its variables make it. Raises EnvError."""
    spec = spec or {}
    home_dir = home_dir or os.path.expanduser("~")
    python = spec.get("python") or "python3"
    if spec.get("venv"):
        path = _user_path(spec["venv"], home_dir)
        if not os.path.isfile(os.path.join(path, "bin", "python")):
            raise EnvError("venv %s does not exist on this host (no %s/bin/python)" % (
                spec["venv"], path))
        return {"activate": {"kind": "venv", "path": path}, "python": None, "build": None}
    if spec.get("conda_env"):
        found = probe(python, env, shell)
        path = _conda_env(spec["conda_env"], found.get("conda"), home_dir)
        return {"activate": {"kind": "conda", "path": path, "name": spec["conda_env"]},
                "python": None, "build": None}
    if not spec.get("setup") and not spec.get("conda"):
        if not spec.get("python"):
            return {"activate": None, "python": None, "build": None}
        found = probe(python, env, shell)
        if not found.get("executable"):
            raise EnvError("python %s %s on this host" % (
                python, "does not run" if found.get("python") else "is not found"))
        return {"activate": None, "python": found["python"], "build": None}
    found = probe(python, env, shell)
    if spec.get("conda"):
        if not found.get("conda"):
            raise EnvError("`conda:` needs conda, mamba or micromamba on this host's PATH")
        kind, tool, interp = "conda", os.path.basename(found["conda"]), os.path.realpath(found["conda"])
    else:
        if not found.get("executable"):
            raise EnvError("python %s %s on this host: it is needed to build the environment" % (
                python, "does not run" if found.get("python") else "is not found"))
        kind = "venv"
        tool = "uv" if found.get("uv") else "pip"
        interp = "%s %s %s" % (tool, os.path.realpath(found["executable"]), found["version"])
    key = key_of(kind, interp, spec)
    return {"activate": None, "python": None,
            "build": {"kind": kind, "key": key, "tool": tool, "python": found.get("executable"),
                      "uv": found.get("uv"), "conda_exe": found.get("conda")}}


def _user_path(p, home_dir):
    if p == "~" or p.startswith("~/"):
        p = home_dir + p[1:]
    return os.path.abspath(p)


def _conda_env(name, conda_exe, home_dir):
    if "/" in name or name.startswith("~"):
        path = _user_path(name, home_dir)
        if os.path.isdir(os.path.join(path, "conda-meta")) or os.path.isdir(os.path.join(path, "bin")):
            return path
        raise EnvError("conda env %s does not exist on this host" % name)
    bases = []
    if conda_exe:
        bases.append(os.path.dirname(os.path.dirname(os.path.realpath(conda_exe))))
    for b in ("miniforge3", "miniconda3", "anaconda3", "mambaforge", "micromamba"):
        bases.append(os.path.join(home_dir, b))
    bases.append("/opt/conda")
    for base in bases:
        if name == "base" and os.path.isdir(os.path.join(base, "conda-meta")):
            return base
        for d in (os.path.join(base, "envs", name),):
            if os.path.isdir(d):
                return d
    d = os.path.join(home_dir, ".conda", "envs", name)
    if os.path.isdir(d):
        return d
    raise EnvError("conda env %r is not found on this host" % name)


def build(b, spec, job_vars, shell, cwd):
    """The function builds.py runs to build the environment `b` (plan()'s "build") at dest,
    its output to log_fd; `cwd` the work dir of the job that asked for it first."""

    def run(dest, log_fd):
        def say(text):
            os.write(log_fd, text.encode("utf-8", "replace"))

        def call(argv, env, what, show=True):
            if show:
                say("$ %s\n" % " ".join(argv))
            try:
                rc = subprocess.call(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_fd,
                                     stderr=subprocess.STDOUT, close_fds=True)
            except OSError as e:
                raise BuildError("%s: cannot run %s: %s" % (what, argv[0], e.strerror))
            if rc != 0:
                raise BuildError("%s failed (exit code %d)" % (what, rc))

        say("rtrain: building environment %s (%s with %s) in %s\n" % (
            b["key"], b["kind"], b["tool"], dest))
        base_env = runtime.environment(os.environ, list((job_vars or {}).items()))
        if b["kind"] == "conda":
            exe = b["conda_exe"]
            yml = os.path.join(cwd, spec["conda"])
            if os.path.basename(exe) == "micromamba":
                argv = [exe, "create", "-y", "-p", dest, "-f", yml]
            else:
                argv = [exe, "env", "create", "-p", dest, "-f", yml]
            call(argv, base_env, "creating the conda env")
            act = {"kind": "conda", "path": dest}
        elif b["tool"] == "uv":
            call([b["uv"], "venv", "--python", b["python"], dest], base_env, "creating the venv")
            act = {"kind": "venv", "path": dest}
        else:
            call([b["python"], "-m", "venv", dest], base_env, "creating the venv")
            act = {"kind": "venv", "path": dest}
        setup = spec.get("setup")
        if setup:
            rt = {"activate": act, "shell": shell}
            extra = [("UV_PROJECT_ENVIRONMENT", dest.replace("$", "$$"))] if b["tool"] == "uv" else []
            assignments = runtime.variables(rt, job_vars, extra)
            env = runtime.environment(os.environ, assignments)
            env_file = None
            if shell == "login":
                env_file = dest + ".env.sh"
                runtime.write_env_file(env_file, assignments)
            # the first command that fails fails the build
            prelude = "set -e\n" + (UV_PRELUDE if b["tool"] == "uv" else "")
            say("$ %s\n" % setup.replace("\n", "\n$ "))
            try:
                call(runtime.argv(rt, setup, env_file, prelude), env, "the setup", show=False)
            finally:
                if env_file:
                    try:
                        os.unlink(env_file)
                    except OSError:
                        pass
        say("rtrain: environment %s ready\n" % b["key"])
        return {"kind": b["kind"], "tool": b["tool"]}

    return run
