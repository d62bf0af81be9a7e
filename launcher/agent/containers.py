"""Container jobs: the engine command line that runs a job in a container (docker or podman),
the checks to make before starting it, and the stop / is-it-running helpers for cancel and
reconcile. docs/containers.md says what a container job gets and why.

The argv builders are pure functions of their arguments (golden-tested); the functions that
run the engine or look at the host say so in their names (probe_*, engine_*). Standard library
only, Python 3.8 (this module ships inside the agent).

A container job, as the wrapper (runner.py) runs it:

    ENGINE run --rm --pull=missing --name rtrain-USER-HHHHHH-JOB --label rtrain.user=USER ...
        --init [--init-path=...] --stop-timeout=GRACE --network=host --shm-size=8g
        --user UID:GID | --userns=keep-id
        --mount type=bind,source=WORK,target=WORK --workdir WORK
        -e NAME ... (values in the engine's environment, never on its argv: other users see argv)
        [--gpus "device=UUID,UUID" | --device nvidia.com/gpu=UUID ...]
        IMAGE /bin/sh -c COMMAND

The engine runs attached (no -d): its stdout/stderr are the job's, in the job's log, and its
exit status is the job's (125: the engine could not run the container; 126/127: the command
could not be run in it). The work dir is mounted at the SAME path inside, so every path the job
prints, and every path in its environment, means the same on the host and in the container.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess

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
DEFAULTS = {"image": None, "engine": None, "network": "host", "ipc": None, "shm_size": "8g",
            "pull": "missing", "mounts": [], "init": True}


def settings(raw):
    """The container settings of a job (a dict, as stored with the job) checked and completed:
    image (required), engine (docker | podman | None: pick), network (host), ipc (None: the
    engine's), shm_size (8g), pull (missing | never | always), mounts ([{"source", "target",
    "readonly"}]), init (true)."""
    if not isinstance(raw, dict):
        raise ContainerError("a container job's settings must be a mapping, got %r" % (raw,))
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ContainerError("unknown container setting %s; valid: %s" % (
            ", ".join(unknown), ", ".join(sorted(DEFAULTS))))
    s = dict(DEFAULTS)
    s.update(raw)
    if not isinstance(s["image"], str) or not s["image"] or s["image"].startswith("-") or \
            any(c.isspace() for c in s["image"]):
        raise ContainerError("bad image name %r" % (s["image"],), "give an image such as python:3.12-slim")
    if s["engine"] not in (None,) + ENGINES:
        raise ContainerError("container_engine must be docker or podman, got %r" % (s["engine"],))
    if s["pull"] not in PULL_POLICIES:
        raise ContainerError("pull must be one of %s, got %r" % (", ".join(PULL_POLICIES), s["pull"]))
    for key in ("network", "ipc"):
        v = s[key]
        if v is not None and (not isinstance(v, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", v)):
            raise ContainerError("container %s must be a name such as host or none, got %r" % (key, v))
    if s["shm_size"] is not None and not re.match(r"^[0-9]+[bkmgBKMG]?$", str(s["shm_size"])):
        raise ContainerError("shm_size must be a size such as 8g, got %r" % (s["shm_size"],))
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


def list_argv(engine_bin, home_root):
    """The running containers of one RTRAIN_HOME, one name per line (the job id ends it; the
    engines' templates for one label differ)."""
    return [engine_bin, "ps", "--filter", "label=rtrain.home=%s" % os.path.abspath(home_root),
            "--format", "{{.Names}}"]


# ---------------------------------------------------------------- GPUs

def docker_gpu_problem(runtimes, hook_found):
    """None when docker can give GPUs to containers: the daemon knows the nvidia runtime, or
    the NVIDIA Container Toolkit's hook is installed (docker's --gpus uses it). `runtimes`: the
    runtime names `docker info` lists, or an error string when docker could not be asked."""
    if isinstance(runtimes, str):
        return ContainerError("cannot ask docker whether it can give GPUs to containers: %s" % runtimes,
                              "check that docker runs and that you may use it (group docker)")
    if "nvidia" in runtimes or hook_found:
        return None
    return ContainerError(
        "docker on this host cannot give GPUs to containers: the NVIDIA Container Toolkit is not installed",
        "%s, then `sudo nvidia-ctk runtime configure --runtime=docker` and restart docker"
        % INSTALL_TOOLKIT)


def podman_gpu_problem(gpus, names, dirs=CDI_DIRS):
    """None when every GPU (by UUID) is a CDI device podman can resolve; `names`: the device
    names of kind nvidia.com/gpu in the CDI specs (cdi_device_names)."""
    missing = [g for g in gpus if g not in names]
    if not missing:
        return None
    if not names:
        what = "there is no CDI spec for NVIDIA GPUs in %s" % " or ".join(dirs)
    else:
        what = "the CDI spec for NVIDIA GPUs does not name %s" % ", ".join(missing)
    return ContainerError(
        "podman cannot give GPUs to containers: %s" % what,
        "%s, then `sudo nvidia-ctk cdi generate --device-name-strategy=index "
        "--device-name-strategy=uuid --output=/etc/cdi/nvidia.yaml`" % INSTALL_TOOLKIT)


def cdi_device_names(dirs=CDI_DIRS, kind=GPU_KIND):
    """The device names of `kind` in the CDI specs (*.json, *.yaml) under `dirs`. YAML is not in
    the standard library; nvidia-ctk writes plain block YAML, in which `kind:` is a top-level
    key and `name:` is a device's (no other CDI field is called name)."""
    names = set()
    for d in dirs:
        try:
            files = sorted(os.listdir(d))
        except OSError:
            continue
        for f in files:
            path = os.path.join(d, f)
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError):
                continue
            if f.endswith(".json"):
                try:
                    spec = json.loads(text)
                except ValueError:
                    continue
                if isinstance(spec, dict) and spec.get("kind") == kind:
                    names.update(str(dev.get("name")) for dev in spec.get("devices") or ()
                                 if isinstance(dev, dict) and dev.get("name") is not None)
            elif f.endswith((".yaml", ".yml")):
                m = re.search(r"""(?m)^kind:\s*["']?([^"'\s#]+)""", text)
                if m and m.group(1) == kind:
                    names.update(re.findall(r"""(?m)^\s*(?:-\s+)?name:\s*["']?([^"'\s#]+)""", text))
    return names


def probe_docker_runtimes(engine_bin, env=None, timeout=20):
    """The runtime names dockerd knows (a list), or why they could not be read (a str)."""
    try:
        p = subprocess.run([engine_bin, "info", "--format", "{{json .Runtimes}}"], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if p.returncode != 0:
        err = p.stderr.decode("utf-8", "replace").strip().splitlines()
        return err[-1] if err else "docker info exited %d" % p.returncode
    try:
        return sorted(json.loads(p.stdout.decode() or "{}") or {})
    except ValueError:
        return []


def probe_gpu_problem(engine, engine_bin, gpus, env=None, cdi_dirs=CDI_DIRS):
    """Before a GPU container starts: None, or the ContainerError that says what to install
    (instead of docker's 'could not select device driver' or podman's 'unresolvable CDI
    devices'). Runs `docker info` for docker; reads the CDI specs for podman."""
    if not gpus:
        return None
    if engine == "docker":
        path = (env or os.environ).get("PATH", os.defpath)
        hook = shutil.which("nvidia-container-runtime-hook", path=path + ":/usr/bin:/usr/local/bin")
        return docker_gpu_problem(probe_docker_runtimes(engine_bin, env), hook is not None)
    return podman_gpu_problem(gpus, cdi_device_names(cdi_dirs), cdi_dirs)


# ---------------------------------------------------------------- running the engine

def engine_call(argv, env=None, timeout=30):
    """(exit code, stdout, stderr) of one engine command; exit code None when it could not run
    or ran past `timeout`."""
    try:
        p = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, "", str(e)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def engine_is_running(engine_bin, name, env=None):
    """True (running), False (no such container, or it has ended), None (the engine did not say)."""
    rc, out, err = engine_call(running_argv(engine_bin, name), env)
    if rc == 0:
        return out.strip() == "true"
    if rc is not None and "no such" in (err + out).lower():
        return False
    return None


def engine_stop(engine_bin, name, grace, env=None):
    """Stop a container: SIGTERM, SIGKILL after `grace` s, then remove it. True when it is gone."""
    engine_call(stop_argv(engine_bin, name, grace), env, timeout=grace + 30)
    engine_call(rm_argv(engine_bin, name), env, timeout=30)
    return engine_is_running(engine_bin, name, env) is False


def engine_list(engine_bin, home_root, env=None):
    """{job id: container name} of the running containers of one RTRAIN_HOME, or None when the
    engine did not answer (for reconcile: a job whose container is not listed is gone)."""
    rc, out, _ = engine_call(list_argv(engine_bin, home_root), env)
    if rc != 0:
        return None
    prefix = "-%s-" % home_hash(home_root)
    found = {}
    for name in out.split():
        job = name.rpartition("-")[2]
        if name.startswith("rtrain-") and prefix in name and job.isdigit():
            found[int(job)] = name
    return found


# ---------------------------------------------------------------- one job

def job_command(job, job_vars, work, home_root, base_env, facts=None, uid=None, gid=None, user=None):
    """For the wrapper: (argv, env of the engine process, engine binary, container name) of the
    container job `job` (its "container" settings, id, command, gpus, grace). `job_vars`: the
    variables the job gets (its own, RTRAIN_*, CUDA_*), not the daemon's whole environment;
    `base_env`: the engine's own environment. Raises ContainerError when the job cannot start
    (no engine, no GPU support...)."""
    s = settings(job["container"])
    facts = probe_engines(base_env) if facts is None else facts
    engine = choose_engine(s["engine"], facts)
    engine_bin = facts.get(engine) or engine
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    if user is None:
        try:
            import pwd
            user = pwd.getpwuid(uid).pw_name
        except (KeyError, ImportError):
            user = str(uid)
    words, values = env_split(job_vars)
    env = dict(base_env)
    env.update(values)
    problem = probe_gpu_problem(engine, engine_bin, job.get("gpus") or [], base_env)
    if problem is not None:
        raise problem
    argv = run_argv(engine, s, job["id"], work, job["command"], words, job.get("gpus") or [],
                    uid, gid, user, home_root, grace=job.get("grace", 10), engine_bin=engine_bin,
                    init_path=facts.get("init_path"))
    return argv, env, engine_bin, container_name(user, home_root, job["id"])
