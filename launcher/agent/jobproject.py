"""What a job takes from its project file (rtrain.yaml): its environment spec, its shell, its
data, mounts and outputs. The client sends it with the submit as "project"; submit checks it
and writes it into the job's folder as project.json (per job, like its settings: docs/design.md
"Settings per job"); the daemon reads it from there. worklinks() puts the job's data, outputs
and mounts into its work dir. Standard library only, Python >= 3.8.
"""
import os
import re
import stat

from . import datatree, fsutil
from .manifest import ManifestError, check_path
from .protocol import AgentError

PROJECT_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,99}\Z")
ENV_KEYS = ("setup", "files", "conda", "python", "venv", "conda_env")


def check(project, data_entries):
    """The project.json record of a submit's "project" (None: none), checked. Raises AgentError."""
    if not project and not data_entries:
        return None
    if not isinstance(project, dict):
        raise AgentError("bad_request", "project must be an object")

    def bad(what):
        raise AgentError("bad_request", "bad project: %s" % what)

    name = project.get("name") or "default"
    if not isinstance(name, str) or not PROJECT_NAME.match(name):
        bad("its name %r (letters, digits, . _ -)" % (name,))
    env = project.get("env") or {}
    if not isinstance(env, dict) or any(k not in ENV_KEYS for k in env):
        bad("env")
    for k in ("setup", "conda", "python", "venv", "conda_env"):
        if env.get(k) is not None and not isinstance(env[k], str):
            bad("env.%s must be a string" % k)
    files = env.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        bad("env.files")
    shell = project.get("shell")
    if shell not in (None, "login", "plain"):
        bad("shell %r" % (shell,))
    rec = {"name": name, "env": env, "shell": "login" if shell == "login" else None}
    taken = []
    for key in ("data", "outputs"):
        paths = project.get(key) or []
        if not isinstance(paths, list):
            bad("%s must be a list" % key)
        rec[key] = [_rel(p, key, bad) for p in paths]
        taken += rec[key]
    mounts = project.get("mounts") or []
    if not isinstance(mounts, list) or not all(isinstance(m, list) and len(m) == 2 for m in mounts):
        bad("mounts must be [[path, host path], ...]")
    rec["mounts"] = []
    for rel, target in mounts:
        if not isinstance(target, str) or not (target.startswith("/") or target.startswith("~")):
            bad("mount %r: the host path must be absolute" % (rel,))
        rec["mounts"].append([_rel(rel, "mounts", bad), target])
        taken.append(rec["mounts"][-1][0])
    for a in taken:
        for b in taken:
            if a is not b and (a == b or b.startswith(a + "/")):
                bad("%s and %s overlap (data, outputs and mounts must be apart)" % (a, b))
    for e in data_entries:
        if not any(e.get("path") == p or str(e.get("path")).startswith(p + "/") for p in rec["data"]):
            bad("data file %r is under no data path" % (e.get("path"),))
    rec["data_key"] = datatree.key_of(data_entries) if data_entries else None
    return rec


def _rel(p, key, bad):
    try:
        check_path(p)
    except ManifestError:
        bad("%s: %r is not a relative path inside the project" % (key, p))
    return p


def read(home, job_id):
    rec = fsutil.read_json(os.path.join(home.job(job_id).dir, "project.json"))
    return rec if isinstance(rec, dict) else {}


def outputs_dir(home, name, rel):
    return os.path.join(home.root, "projects", name, "outputs", rel)


def link_targets(home, rec, data_root=None):
    """[(path in the work dir, what it links to, kind)] of a job."""
    out = []
    for rel in rec.get("data") or []:
        out.append((rel, os.path.join(data_root, rel) if data_root else None, "data"))
    for rel in rec.get("outputs") or []:
        out.append((rel, outputs_dir(home, rec["name"], rel), "outputs"))
    for rel, target in rec.get("mounts") or []:
        out.append((rel, os.path.expanduser(target), "mounts"))
    return out


def data_root(home, rec):
    key = rec.get("data_key")
    return os.path.join(home.root, "builds", "data", key) if key else None


def worklinks(home, job_id, work):
    """Put the job's data, outputs and mounts into the work dir being built (`work`): one
    symlink each. Raises OSError with a message that says which."""
    rec = read(home, job_id)
    for rel, target, kind in link_targets(home, rec, data_root(home, rec)):
        full = _parent_dirs(work, rel)
        if os.path.lexists(full):
            raise OSError("%s %s: the snapshot already has %s there" % (kind, rel, rel))
        if kind == "outputs":
            os.makedirs(target, mode=0o700, exist_ok=True)
        elif kind == "data" and not os.path.lexists(target):
            os.mkdir(full, 0o755)  # an empty data folder
            continue
        elif kind == "mounts" and not os.path.exists(target):
            raise OSError("mount %s: %s does not exist on this host" % (rel, target))
        os.symlink(target, full)


def _parent_dirs(work, rel):
    """work/rel's parent folders made (never through a symlink); returns work/rel."""
    cur = work
    for p in rel.split("/")[:-1]:
        cur = os.path.join(cur, p)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise OSError("%s: %s is not a folder in the snapshot" % (rel, os.path.relpath(cur, work)))
    return os.path.join(work, rel)
