"""Container jobs: what a job's container settings may be, which engine runs it (docker or
podman), and the engine command lines that run, stop and list containers. docs/containers.md
says what a container job gets and why.

Everything here is a pure function of its arguments (the argv builders are golden-tested),
except probe_engines, which looks at PATH and /etc/subuid. What runs the engine or reads the
host's GPU support is containerhost.py; a job's container, from its folder to its argv, is
jobcontainer.py. Standard library only, Python 3.8 (this module ships inside the agent).

A container job, as the wrapper (runner.py) runs it:

    ENGINE run --rm --pull=missing --name rtrain-USER-HHHHHH-JOB --label rtrain.user=USER ...
        --init [--init-path=...] --stop-timeout=GRACE --network=host --shm-size=8g
        --user UID:GID | --userns=keep-id
        --mount type=bind,source=WORK,target=WORK --workdir WORK
        --mount ... (the job's data read-only, its outputs, its mounts, its variables' file)
        -e NAME ... (values in the engine's environment, never on its argv: other users see argv)
        [--gpus "device=UUID,UUID" | --device nvidia.com/gpu=UUID ...]
        IMAGE /bin/sh -c COMMAND

The engine runs attached (no -d): its stdout/stderr are the job's, in the job's log, and its
exit status is the job's (125: the engine could not run the container; 126/127: the command
could not be run in it). The work dir is mounted at the SAME path inside, so every path the job
prints, and every path in its environment, means the same on the host and in the container.
"""
import hashlib
import os
import re
import shutil

ENGINES = ("docker", "podman")
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
GPU_KIND = "nvidia.com/gpu"
PULL_POLICIES = ("missing", "never", "always")
# Variables the engine process itself needs: a job variable of that name cannot ride in the
# engine's environment (it would change the engine), so it goes on the argv as NAME=VALUE.
ENGINE_OWN = frozenset(("PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "LD_LIBRARY_PATH",
                        "LD_PRELOAD", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT",
                        "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY", "CONTAINER_HOST",
                        "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF",
                        "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME"))
CATATONIT = ("/usr/libexec/podman/catatonit", "/usr/lib/podman/catatonit", "/usr/bin/catatonit")
TINI = ("/usr/bin/tini-static", "/usr/bin/tini", "/sbin/tini")
INSTALL_TOOLKIT = "install nvidia-container-toolkit"


class ContainerError(Exception):
    """A container job that cannot start, said in one line (+ a hint naming the fix)."""

    def __init__(self, message, hint=""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self):
        return "rtrain: error: %s\n" % self.message + ("  hint: %s\n" % self.hint if self.hint else "")


# ---------------------------------------------------------------- the job's container settings

# shm_size: the engines give a container 64 MB of /dev/shm, too little for PyTorch's DataLoader
# workers ("Bus error"); a tmpfs size is a limit, not a reservation. (--ipc=host would do too,
# but rootless podman then needs /dev/mqueue on the host, which minimal hosts lack.)
# build_network: None: none unless the Dockerfile has RUN steps or ADDs a URL (imagebuild.py).
DEFAULTS = {"image": None, "build": None, "engine": None, "network": "host", "ipc": None,
            "shm_size": "8g", "pull": "missing", "build_network": None, "mounts": [], "init": True}
# What rtrain.yaml's `container:` may set (the rest comes from `image:`, `build:`, hosts.yaml).
PROJECT_KEYS = ("network", "ipc", "shm_size", "pull", "build_network")
_NETWORK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


def settings(raw):
    """The container settings of a job (a dict, as stored with the job) checked and completed:
    image (an image name) or build ({"dockerfile": path in the project}), engine (docker |
    podman | None: pick), network (host), ipc (None: the engine's), shm_size (8g), pull
    (missing | never | always), build_network (None: see above), mounts ([{"source",
    "target", "readonly"}]), init (true)."""
    if not isinstance(raw, dict):
        raise ContainerError("a container job's settings must be a mapping, got %r" % (raw,))
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ContainerError("unknown container setting %s; valid: %s" % (
            ", ".join(unknown), ", ".join(sorted(DEFAULTS))))
    s = dict(DEFAULTS)
    s.update(raw)
    if s["build"] is not None:
        b = s["build"]
        if not isinstance(b, dict) or not isinstance(b.get("dockerfile"), str) or not b["dockerfile"] or \
                b["dockerfile"].startswith("/") or ".." in b["dockerfile"].split("/") or \
                set(b) - {"dockerfile", "project"} or not isinstance(b.get("project", ""), str):
            raise ContainerError("build must be {dockerfile: a path in the project}, got %r" % (b,))
        if s["image"] is not None:
            raise ContainerError("a container job has an image or a build, not both")
    elif not isinstance(s["image"], str) or not s["image"] or s["image"].startswith("-") or \
            any(c.isspace() for c in s["image"]):
        raise ContainerError("bad image name %r" % (s["image"],), "give an image such as python:3.12-slim")
    if s["engine"] not in (None,) + ENGINES:
        raise ContainerError("container_engine must be docker or podman, got %r" % (s["engine"],))
    if s["pull"] not in PULL_POLICIES:
        raise ContainerError("pull must be one of %s, got %r" % (", ".join(PULL_POLICIES), s["pull"]))
    for key in ("network", "ipc", "build_network"):
        v = s[key]
        if v is not None and (not isinstance(v, str) or not _NETWORK.match(v)):
            raise ContainerError("container %s must be a name such as host or none, got %r" % (key, v))
    if s["shm_size"] is not None and not re.match(r"^[0-9]+[bkmgBKMG]?$", str(s["shm_size"])):
        raise ContainerError("shm_size must be a size such as 8g, got %r" % (s["shm_size"],))
    if not isinstance(s["init"], bool):
        raise ContainerError("init must be true or false, got %r" % (s["init"],))
    mounts = []
    for m in s["mounts"] or []:
        if isinstance(m, str):
            src, _, rest = m.partition(":")
            dst, _, mode = rest.partition(":")
            m = {"source": src, "target": dst or src, "readonly": mode == "ro"}
        if not isinstance(m, dict) or not m.get("source"):
            raise ContainerError("a mount must be SOURCE[:TARGET[:ro]] or {source, target, readonly}, got %r" % (m,))
        mounts.append({"source": m["source"], "target": m.get("target") or m["source"],
                       "readonly": bool(m.get("readonly"))})
    s["mounts"] = mounts
    return s


# ---------------------------------------------------------------- which engine

def choose_engine(setting, facts):
    """docker or podman for this user. `setting` (container_engine) wins when that engine is
    there; without one: podman when this user can run it rootless, else docker, else podman
    (root runs it rootful). `facts`: what probe_engines() found."""
    if setting is not None:
        if setting not in ENGINES:
            raise ContainerError("container_engine must be docker or podman, got %r" % (setting,))
        if not facts.get(setting):
            raise ContainerError("container_engine is %s, but %s is not installed on this host" % (
                setting, setting), _install_hint(setting))
        return setting
    if facts.get("podman") and facts.get("podman_rootless"):
        return "podman"
    if facts.get("docker"):
        return "docker"
    if facts.get("podman"):
        return "podman"
    raise ContainerError("this host has no container engine (neither podman nor docker is on PATH)",
                         "install podman (runs rootless as you) or docker, or run the job without an image")


def _install_hint(engine):
    if engine == "podman":
        return "install podman and uidmap (apt-get install podman uidmap), or set container_engine: docker"
    return "install docker (apt-get install docker.io) and add yourself to group docker, " \
           "or set container_engine: podman"


def probe_engines(env=None, uid=None, user=None):
    """What this host offers: {"docker": path|None, "podman": path|None, "podman_rootless": bool,
    "init_path": the --init-path podman needs (None: its own catatonit, or no init at all),
    "podman_init": bool}. Looks at PATH and /etc/subuid; runs nothing."""
    env = os.environ if env is None else env
    path = env.get("PATH", os.defpath)
    uid = os.getuid() if uid is None else uid
    facts = {"docker": shutil.which("docker", path=path), "podman": shutil.which("podman", path=path),
             "uid": uid}
    facts["podman_rootless"] = bool(facts["podman"]) and uid != 0 and \
        bool(shutil.which("newuidmap", path=path + ":/usr/bin:/usr/sbin")) and \
        _has_subids(uid, user)
    if any(os.path.exists(p) for p in CATATONIT):
        facts["init_path"], facts["podman_init"] = None, True
    else:
        tini = next((p for p in TINI if os.path.exists(p)), None)
        facts["init_path"], facts["podman_init"] = tini, tini is not None
    return facts


def _has_subids(uid, user=None):
    """True when /etc/subuid and /etc/subgid give this user a range (rootless podman needs it)."""
    if user is None:
        try:
            import pwd
            user = pwd.getpwuid(uid).pw_name
        except (KeyError, ImportError):
            user = None
    for f in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(f) as fh:
                owners = {line.split(":", 1)[0] for line in fh if ":" in line}
        except OSError:
            return False
        if str(uid) not in owners and user not in owners:
            return False
    return True


# ---------------------------------------------------------------- names and the run argv

def container_name(user, home_root, job_id):
    """rtrain-USER-HHHHHH-JOB: the user and job, and a hash of the RTRAIN_HOME (a user may have
    several; container names are unique per engine, and a rootful docker is shared by all)."""
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "_", user or "user")
    return "rtrain-%s-%s-%s" % (safe, home_hash(home_root), job_id)


def home_hash(home_root):
    return hashlib.sha256(os.path.abspath(home_root).encode()).hexdigest()[:6]


def labels(user, home_root, job_id):
    return [("rtrain.user", user or ""), ("rtrain.home", os.path.abspath(home_root)),
            ("rtrain.job", str(job_id))]


def _check_path(path, what):
    # --mount is parsed as comma-separated fields (by podman without CSV quoting)
    if not os.path.isabs(path) or "," in path or "\n" in path:
        raise ContainerError("cannot mount %s %r into a container: it must be an absolute path "
                             "without commas" % (what, path))


def _mount(source, target, readonly):
    return "type=bind,source=%s,target=%s%s" % (source, target, ",readonly" if readonly else "")


def env_split(job_vars):
    """(argv words, the variables for the engine's environment). A job variable rides in the
    engine's environment and is named on the argv alone (-e NAME), so its value never shows in
    `ps`; the few the engine needs itself (ENGINE_OWN) go on the argv whole."""
    words, values = [], {}
    for name in sorted(job_vars):
        value = job_vars[name]
        if name in ENGINE_OWN:
            words += ["-e", "%s=%s" % (name, value)]
        else:
            words += ["-e", name]
            values[name] = value
    return words, values


def gpu_argv(engine, gpus):
    """docker: one --gpus naming the devices (quoted: the CLI splits the value on commas);
    podman: one CDI device per GPU."""
    if not gpus:
        return []
    if engine == "docker":
        return ["--gpus", '"device=%s"' % ",".join(gpus)]
    out = []
    for g in gpus:
        out += ["--device", "%s=%s" % (GPU_KIND, g)]
    return out


def run_argv(engine, s, job_id, work, command, env_words, gpus, uid, gid, user, home_root,
             grace=10, engine_bin=None, init_path=None, shell="/bin/sh"):
    """The full `ENGINE run ...` argv of a job. `s`: settings(); `env_words`: from env_split();
    `init_path`: podman's --init-path (see probe_engines)."""
    _check_path(work, "the work dir")
    argv = [engine_bin or engine, "run", "--rm", "--pull=%s" % s["pull"],
            "--name", container_name(user, home_root, job_id)]
    for k, v in labels(user, home_root, job_id):
        argv += ["--label", "%s=%s" % (k, v)]
    if s.get("init", True):
        argv.append("--init")
        if engine == "podman" and init_path:
            argv.append("--init-path=%s" % init_path)
    argv.append("--stop-timeout=%d" % max(1, int(round(grace))))
    if s.get("network"):
        argv.append("--network=%s" % s["network"])
    if s.get("ipc"):
        argv.append("--ipc=%s" % s["ipc"])
    elif s.get("shm_size"):
        argv.append("--shm-size=%s" % s["shm_size"])
    if engine == "podman" and uid != 0:
        argv.append("--userns=keep-id")  # rootless: the job runs as the user, files are theirs
    else:
        argv += ["--user", "%d:%d" % (uid, gid)]
    argv += ["--mount", _mount(work, work, False), "--workdir", work]
    for m in s.get("mounts") or ():
        _check_path(m["source"], "the path")
        _check_path(m["target"], "to the path")
        argv += ["--mount", _mount(m["source"], m["target"], m["readonly"])]
    argv += list(env_words)
    argv += gpu_argv(engine, gpus)
    argv += [s["image"], shell, "-c", command]
    return argv


def stop_argv(engine_bin, name, grace):
    """SIGTERM (to --init, which passes it on), SIGKILL after `grace` seconds."""
    return [engine_bin, "stop", "-t", str(max(0, int(round(grace)))), name]


def kill_argv(engine_bin, name):
    return [engine_bin, "kill", name]


def rm_argv(engine_bin, name):
    return [engine_bin, "rm", "-f", name]


def running_argv(engine_bin, name):
    return [engine_bin, "inspect", "--format", "{{.State.Running}}", name]


def list_argv(engine_bin, home_root, all_states=False):
    """The containers of one RTRAIN_HOME (running ones, or all with all_states), one name per
    line (the job id ends it; the engines' templates for one label differ)."""
    return [engine_bin, "ps"] + (["-a"] if all_states else []) + [
        "--filter", "label=rtrain.home=%s" % os.path.abspath(home_root), "--format", "{{.Names}}"]


def wait_argv(engine_bin, name):
    return [engine_bin, "wait", name]


def image_argv(engine_bin, image):
    """Whether an image is there: exit 0 and its id."""
    return [engine_bin, "image", "inspect", "--format", "{{.Id}}", image]
