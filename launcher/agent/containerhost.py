"""What the host's container engines can do, asked of them: GPU support (the NVIDIA runtime for
docker, CDI specs for podman), running containers and images, stop and remove; and the summary
`rtrain hosts` shows. The engine command lines come from containers.py; docs/containers.md says
why each check is made. Standard library only, Python 3.8 (this module ships inside the agent).
"""
import json
import os
import re
import shutil
import subprocess

from .containers import (CDI_DIRS, GPU_KIND, INSTALL_TOOLKIT, ContainerError, choose_engine,
                         home_hash, image_argv, list_argv, probe_engines, rm_argv, running_argv,
                         stop_argv)

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
    names of kind nvidia.com/gpu in the CDI specs (cdi_device_names). gpus None: before the
    GPUs are known (before the lease), None when the specs name any GPU at all."""
    missing = [g for g in gpus if g not in names] if gpus is not None else ([] if names else ["any"])
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
    rc, out, err = engine_call([engine_bin, "info", "--format", "{{json .Runtimes}}"], env, timeout)
    if rc != 0:
        lines = (err or "").strip().splitlines()
        return lines[-1] if lines else "docker info exited %s" % rc
    try:
        return sorted(json.loads(out or "{}") or {})
    except ValueError:
        return []


def probe_gpu_problem(engine, engine_bin, gpus, env=None, cdi_dirs=CDI_DIRS):
    """Before a GPU container starts: None, or the ContainerError that says what to install
    (instead of docker's 'could not select device driver' or podman's 'unresolvable CDI
    devices'). Runs `docker info` for docker; reads the CDI specs for podman. gpus None: the
    check before the lease, when the GPUs are not chosen yet."""
    if gpus is not None and not gpus:
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


def engine_list(engine_bin, home_root, env=None, all_states=False):
    """{job id: container name} of the (running, or all) containers of one RTRAIN_HOME, or None
    when the engine did not answer (for reconcile: a job whose container is not listed is gone)."""
    rc, out, _ = engine_call(list_argv(engine_bin, home_root, all_states), env)
    if rc != 0:
        return None
    prefix = "-%s-" % home_hash(home_root)
    found = {}
    for name in out.split():
        job = name.rpartition("-")[2]
        if name.startswith("rtrain-") and prefix in name and job.isdigit():
            found[int(job)] = name
    return found


def image_id(engine_bin, image, env=None):
    """The image's id when the engine has it; "" when it has not; None when it did not answer."""
    rc, out, err = engine_call(image_argv(engine_bin, image), env)
    if rc == 0:
        return out.strip() or None
    if rc is not None and ("no such" in (err + out).lower() or "not known" in (err + out).lower() or
                           "image not known" in err.lower()):
        return ""
    return None


# ---------------------------------------------------------------- `rtrain hosts`

def summary(setting=None, gpus=(), env=None):
    """What `rtrain hosts` says of this host's engines (doctor.py formats it):
    {"docker", "podman": {"path", "version", "error"} | None, "podman_rootless": bool,
     "engine": the one jobs get | None, "problem": [message, hint] | None,
     "gpus": None (no GPUs) | {"ok": bool, "detail", "hint"}}. `gpus`: the host's GPU UUIDs."""
    facts = probe_engines(env)
    out = {"podman_rootless": bool(facts.get("podman_rootless")), "engine": None, "problem": None,
           "gpus": None}
    for engine, argv in (("docker", ["version", "--format", "{{.Server.Version}}"]),
                         ("podman", ["info", "--format", "{{.Version.Version}}"])):
        if not facts.get(engine):
            out[engine] = None
            continue
        rc, text, err = engine_call([facts[engine]] + argv, env, timeout=20)
        lines = (err or "").strip().splitlines()
        out[engine] = {"path": facts[engine], "version": text.strip() if rc == 0 else None,
                       "error": None if rc == 0 else (lines[-1] if lines else "exit %s" % rc)}
    try:
        out["engine"] = choose_engine(setting, facts)
    except ContainerError as e:
        out["problem"] = [e.message, e.hint]
        return out
    if gpus:
        problem = probe_gpu_problem(out["engine"], facts[out["engine"]], list(gpus), env)
        out["gpus"] = {"ok": problem is None, "detail": problem.message if problem else (
            "docker gives GPUs to containers (NVIDIA runtime)" if out["engine"] == "docker" else
            "podman's CDI specs name all %d GPU(s)" % len(gpus)), "hint": problem.hint if problem else ""}
    return out
