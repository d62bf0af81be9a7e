"""Container jobs on Slurm, the cluster's own way (docs/containers.md, "On Slurm"): the batch
wrapper runs, instead of `bash -c COMMAND`,

    pyxis (enroot):         srun --ntasks=1 --container-image=IMAGE
                                 --container-mounts=SRC:DST[:ro],... --container-workdir=WORK
                                 /bin/sh -c COMMAND
    apptainer, singularity: apptainer exec [--nv] --bind SRC:DST[:ro],... --pwd WORK IMAGE
                                 /bin/sh -c COMMAND

chosen by the host's `container_engine` in hosts.yaml. The job's folder is on the shared file
system and mounted at the SAME path (all of RTRAIN_HOME: its work dir, and the data trees,
outputs and environments its links point to), and so is every `mounts:` host path of its
project; its variables reach the container as the engines pass the environment on (pyxis
through srun, apptainer by default); its GPUs are Slurm's (apptainer's --nv brings the driver
in). The container's own settings are the job's "container" ({"image", "mounts"}: containers.py's
format; the settings of docker and podman, network and the like, do not apply). Pure functions,
golden-tested (tests/unit/test_slurm_backend.py). Standard library only, Python >= 3.8.
"""
import os

from . import containers
from .protocol import AgentError

ENGINES = ("pyxis", "apptainer", "singularity")


def engine_of(container, settings):
    """The host's container_engine (hosts.yaml), else the job's own if it is one of ENGINES."""
    engine = settings.get("container_engine") or container.get("engine")
    if engine not in ENGINES:
        raise AgentError("no_container_engine", "a container job on Slurm needs the cluster's "
                         "container tool, and this host names none%s" % (
                             " (%s is for towers)" % engine if engine else ""),
                         "set container_engine: pyxis, apptainer or singularity for this host in "
                         "hosts.yaml")
    return engine


def binds(home_root, project_mounts, extra):
    """[(source, target, readonly)]: RTRAIN_HOME, the project's host paths, the job's own."""
    out = [(home_root, home_root, False)]
    for _rel, target in project_mounts:
        path = os.path.expanduser(target)
        out.append((path, path, False))
    out += [(m["source"], m["target"], m["readonly"]) for m in extra]
    for src, dst, _ in out:
        for p in (src, dst):
            if not os.path.isabs(p) or any(c in p for c in ",:\n"):
                raise AgentError("bad_request", "cannot mount %r into a container on Slurm: it must be "
                                 "an absolute path without commas or colons" % p)
    return out


def argv(engine, image, inner, work, mounts, gpus):
    """The argv the batch wrapper runs for a container job (see the module's doc)."""
    if not isinstance(image, str) or not image or image.startswith("-") or \
            any(c.isspace() for c in image):
        raise AgentError("bad_request", "bad image name %r" % (image,),
                         "give an image such as docker://python:3.12-slim (apptainer), "
                         "python:3.12-slim (pyxis), or a path to an image file")
    spec = ",".join("%s:%s%s" % (s, t, ":ro" if ro else "") for s, t, ro in mounts)
    if engine == "pyxis":
        return ["srun", "--ntasks=1", "--container-image=%s" % image,
                "--container-mounts=%s" % spec, "--container-workdir=%s" % work] + list(inner)
    return [engine, "exec"] + (["--nv"] if gpus else []) + ["--bind", spec, "--pwd", work, image] + \
        list(inner)


def command(container, settings, work, home_root, project_mounts, gpus, job_command):
    """The argv of a container job from its "container" and the host's Slurm settings."""
    engine = engine_of(container, settings)
    if container.get("build"):
        raise AgentError("bad_request", "build: (an image built from a Dockerfile) is for towers",
                         "on a Slurm host give image: (%s pulls it)" % engine)
    try:
        s = containers.settings(dict(container, engine=None))
    except containers.ContainerError as e:
        raise AgentError("bad_request", e.message, e.hint)
    return argv(engine, s["image"], ["/bin/sh", "-c", job_command], work,
                binds(home_root, project_mounts, s["mounts"]), gpus)
