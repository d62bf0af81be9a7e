"""What a job's process gets on the host: its environment (the job's variables with `$VAR` and
`${VAR}` expanded, an environment activated), and the argv that runs its command (bash, or the
user's login shell with `shell: login`). Used by the job wrapper (runner.py) and by the builds
that run a project's `setup:` (envbuild.py), so both see the same environment.

The scheduler writes what a job runs with into its folder, runtime.json (docs/design.md
"Environments"): {"activate": {"kind": "venv"|"conda", "path": DIR} | null, "python": PATH |
null, "shell": "login" | null}. Standard library only, Python >= 3.8.
"""
import os
import pwd
import re
import shlex

from . import fsutil

SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
POSIX_SHELLS = ("bash", "sh", "zsh", "ksh", "dash", "mksh")
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(r"\$(\$|\{(%s)\}|(%s))" % (_NAME, _NAME))


def parts(value):
    """A variable's value as [("text", s) | ("var", NAME)]: `$NAME` and `${NAME}` name a
    variable, `$$` is a literal `$`, any other `$` is itself."""
    out = []
    pos = 0
    for m in _TOKEN.finditer(value):
        if m.start() > pos:
            out.append(("text", value[pos:m.start()]))
        if m.group(1) == "$":
            out.append(("text", "$"))
        else:
            out.append(("var", m.group(2) or m.group(3)))
        pos = m.end()
    if pos < len(value):
        out.append(("text", value[pos:]))
    return out


def expand(value, env):
    """`value` with its variables replaced by their values in `env` (unset: empty)."""
    return "".join(s if kind == "text" else env.get(s, "") for kind, s in parts(value))


def valid_name(name):
    """True for a name a POSIX shell can assign."""
    return bool(re.match(r"\A%s\Z" % _NAME, name))


def shell_assignment(name, value):
    """`export NAME=...` in POSIX shell syntax that expands `value`'s variables when it runs:
    text single-quoted, variables as "${NAME}": nothing of the value is ever read as code."""
    if not valid_name(name):
        raise ValueError("bad variable name %r" % (name,))
    words = [shlex.quote(s) if kind == "text" else '"${%s}"' % s for kind, s in parts(value)]
    return "export %s=%s\n" % (name, "".join(words) or "''")


def read(home, job_id):
    rec = fsutil.read_json(home.job(job_id).dir + "/runtime.json")
    return rec if isinstance(rec, dict) else {}


def activation(rt):
    """[(name, value)] that activate the job's environment or interpreter, in order."""
    out = []
    act = rt.get("activate")
    if isinstance(act, dict) and act.get("path"):
        path = act["path"]
        out.append(("PATH", path.replace("$", "$$") + "/bin:$PATH"))
        if act.get("kind") == "conda":
            out += [("CONDA_PREFIX", path.replace("$", "$$")),
                    ("CONDA_DEFAULT_ENV", (act.get("name") or path).replace("$", "$$"))]
        else:
            out.append(("VIRTUAL_ENV", path.replace("$", "$$")))
    if rt.get("python_bin"):
        out.append(("PATH", rt["python_bin"].replace("$", "$$") + ":$PATH"))
    return out


def variables(rt, job_vars, fixed):
    """[(name, raw value)] set for a job, in the order they apply: activation, the job's own
    variables (host env, project env, --env: later ones win), then rtrain's own (`fixed`,
    taken literally)."""
    out = activation(rt) + list((job_vars or {}).items())
    out += [(k, v.replace("$", "$$")) for k, v in fixed]
    return out


def environment(base, assignments):
    """The environment after `assignments`, each expanded against the one before it."""
    env = dict(base)
    env.pop("PYTHONHOME", None)
    for name, value in assignments:
        env[name] = expand(value, env)
    return env


def login_shell():
    try:
        sh = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        sh = ""
    if sh and os.path.basename(sh) in POSIX_SHELLS and os.access(sh, os.X_OK):
        return sh
    return SHELL


def argv(rt, command, env_file=None, prelude=""):
    """The argv that runs `command`. With `shell: login` it runs in the user's login shell
    (its profiles, `module load`), and the job's variables are set again after the profiles
    ran, from env_file (shell_assignment lines), so they expand against the login's values."""
    if rt.get("shell") == "login":
        script = ". %s\n%s%s" % (shlex.quote(env_file), prelude, command) if env_file else prelude + command
        return [login_shell(), "-l", "-c", script]
    return [SHELL, "-c", prelude + command]


def write_env_file(path, assignments):
    """The login shell's assignments file (0600: values may be secrets)."""
    data = "".join(shell_assignment(k, v) for k, v in assignments)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def job_process(home, job, fixed, base=None):
    """(argv, env) of a job: `job` as the wrapper gets it (id, command, env); `fixed` rtrain's
    own variables (RTRAIN_JOB_ID, CUDA_VISIBLE_DEVICES...)."""
    base = os.environ if base is None else base
    rt = read(home, job["id"])
    assignments = variables(rt, job.get("env"), fixed)
    env = environment(base, assignments)
    env_file = None
    if rt.get("shell") == "login":
        env_file = home.job(job["id"]).dir + "/login-env.sh"
        write_env_file(env_file, assignments)
    return argv(rt, job["command"], env_file), env
