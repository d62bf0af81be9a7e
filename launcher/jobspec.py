"""A project file (project.py) made into a submit's parts: the data files to send, the
manifest split into code and data, and the request's "project" (docs/contracts.md "Project")."""
import fnmatch
import os
import stat

from .errors import RtrainError
from .project import SETUP_FILES


def data_files(root, project):
    """The relative paths of every file and symlink under the project's data paths, whatever
    .gitignore says (folders named .git left out)."""
    out = []
    for rel in project.data:
        full = os.path.join(root, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            raise RtrainError("data path %s does not exist in %s" % (rel, root),
                              "fix `data:` in %s" % (project.path or "rtrain.yaml"))
        if stat.S_ISLNK(st.st_mode):
            raise RtrainError("data path %s is a symlink" % rel,
                              "name the folder it points to, or use `mounts:` for a path on the host")
        if not stat.S_ISDIR(st.st_mode):
            out.append(rel)
            continue
        for d, dirs, names in os.walk(full):
            dirs[:] = sorted(x for x in dirs if x != ".git" and not os.path.islink(os.path.join(d, x)))
            base = os.path.relpath(d, root).replace(os.sep, "/")
            out += [base + "/" + n for n in names]
            # a symlink to a folder is an entry of its own, never followed
            out += [base + "/" + x for x in os.listdir(d)
                    if os.path.islink(os.path.join(d, x)) and os.path.isdir(os.path.join(d, x))]
    return out


def _under(path, prefixes):
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def split(manifest, project):
    """(code entries, data entries): data paths' entries go to data; what lies under an
    output or a mount is not sent (the host has it)."""
    data_paths = project.data
    apart = tuple(project.outputs) + tuple(p for p, _ in project.mounts)
    if not data_paths and not apart:  # most trees: all of it is code
        return list(manifest["entries"]), []
    code, data = [], []
    for e in manifest["entries"]:
        if _under(e["path"], data_paths):
            data.append(e)
        elif not _under(e["path"], apart):
            code.append(e)
    return code, data


def setup_files(code, project):
    """{path: hash} of the files the environment's setup reads."""
    pats = project.setup_files or SETUP_FILES
    if project.conda:
        pats = tuple(pats) + (project.conda,)
    out = {}
    for e in code:
        if e.get("type", "file") != "file":
            continue
        p = e["path"]
        if any(fnmatch.fnmatchcase(p, pat) for pat in pats):
            out[p] = e["hash"]
    missing = [f for f in (project.setup_files or ()) + ((project.conda,) if project.conda else ())
               if not any(ch in f for ch in "*?[") and f not in out]
    if missing:
        raise RtrainError("%s, named in %s, is not in the snapshot" % (
            missing[0], project.path or "rtrain.yaml"),
            "the setup files must be files rtrain sends (not ignored)")
    return out


def request(project, code, in_container=False):
    """The submit request's "project" (None when the project file asks nothing of the host).
    A container job gets no host environment: its image is its environment."""
    env = {}
    if (project.setup or project.conda) and not in_container:
        env = {"setup": project.setup, "conda": project.conda, "files": setup_files(code, project)}
    for k in ("python", "venv", "conda_env"):
        if getattr(project, k):
            env[k] = getattr(project, k)
    env = {} if in_container else {k: v for k, v in env.items() if v is not None}
    shell = None if in_container else project.shell
    if not (env or shell or project.data or project.mounts or project.outputs):
        return None
    return {"name": project.project, "env": env, "shell": shell, "data": list(project.data),
            "mounts": [list(m) for m in project.mounts], "outputs": list(project.outputs)}


def container(project, code, engine=None):
    """The submit request's "container" (docs/contracts.md "Containers"): the image, or the
    Dockerfile to build it from (which must be in the snapshot), the project's `container:`
    settings and hosts.yaml's container_engine; None for a host job. Checked here by the
    agent's own rules, so a bad value is refused before anything is sent."""
    from .agent import containers
    if not project.image and not project.build:
        return None
    req = dict(project.container, engine=engine, image=project.image)
    if project.build:
        if not any(e["path"] == project.build and e.get("type", "file") == "file" for e in code):
            raise RtrainError("build: %s is not in the snapshot" % project.build,
                              "name a Dockerfile in the project that rtrain sends (not ignored)")
        req["build"] = {"dockerfile": project.build, "project": project.project}
    try:
        containers.settings(req)
    except containers.ContainerError as e:
        raise RtrainError(e.message, e.hint)
    return req
