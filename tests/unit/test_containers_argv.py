"""The engine command lines of container jobs (launcher/agent/containers.py), pinned by golden
tests, and the checks that run before a container starts: engine choice, GPU support."""
import json
import os

import pytest

from launcher.agent import containerhost as H
from launcher.agent import containers as C

HOME = "/home/ann/.rtrain"
WORK = "/home/ann/.rtrain/jobs/12/work"
HH = C.home_hash(HOME)
UUIDS = ["GPU-5f3a91c2-1b2c-4d5e-8f90-0a1b2c3d4e5f", "GPU-6f3a91c2-1b3d-4d5f-8faf-0a1b2d4e5f60"]


def _argv(engine, gpus=(), uid=1000, **over):
    s = C.settings(dict({"image": "nvcr.io/nvidia/pytorch:24.01-py3"}, **over))
    words, _ = C.env_split({"RTRAIN_JOB_ID": "12", "CUDA_VISIBLE_DEVICES": ",".join(gpus),
                            "WANDB_API_KEY": "s3cret", "HOME": "/tmp/h"})
    return C.run_argv(engine, s, 12, WORK, "python train.py --lr 3e-4", words, list(gpus),
                      uid, 1000, "ann", HOME, grace=10, engine_bin="/usr/bin/" + engine,
                      init_path="/usr/bin/tini-static")


def test_docker_gpu_job_golden():
    assert _argv("docker", UUIDS) == [
        "/usr/bin/docker", "run", "--rm", "--pull=missing", "--name", "rtrain-ann-%s-12" % HH,
        "--label", "rtrain.user=ann", "--label", "rtrain.home=" + HOME, "--label", "rtrain.job=12",
        "--init", "--stop-timeout=10", "--network=host", "--shm-size=8g",
        "--user", "1000:1000",
        "--mount", "type=bind,source=%s,target=%s" % (WORK, WORK), "--workdir", WORK,
        "-e", "CUDA_VISIBLE_DEVICES", "-e", "HOME=/tmp/h", "-e", "RTRAIN_JOB_ID", "-e", "WANDB_API_KEY",
        "--gpus", '"device=%s"' % ",".join(UUIDS),
        "nvcr.io/nvidia/pytorch:24.01-py3", "/bin/sh", "-c", "python train.py --lr 3e-4"]


def test_podman_rootless_gpu_job_golden():
    assert _argv("podman", UUIDS, mounts=["/data/imagenet:/data:ro"], network="none", pull="never",
                 ipc="host") == [
        "/usr/bin/podman", "run", "--rm", "--pull=never", "--name", "rtrain-ann-%s-12" % HH,
        "--label", "rtrain.user=ann", "--label", "rtrain.home=" + HOME, "--label", "rtrain.job=12",
        "--init", "--init-path=/usr/bin/tini-static", "--stop-timeout=10", "--network=none", "--ipc=host",
        "--userns=keep-id",
        "--mount", "type=bind,source=%s,target=%s" % (WORK, WORK), "--workdir", WORK,
        "--mount", "type=bind,source=/data/imagenet,target=/data,readonly",
        "-e", "CUDA_VISIBLE_DEVICES", "-e", "HOME=/tmp/h", "-e", "RTRAIN_JOB_ID", "-e", "WANDB_API_KEY",
        "--device", "nvidia.com/gpu=" + UUIDS[0], "--device", "nvidia.com/gpu=" + UUIDS[1],
        "nvcr.io/nvidia/pytorch:24.01-py3", "/bin/sh", "-c", "python train.py --lr 3e-4"]


def test_cpu_job_has_no_gpu_flags_and_root_podman_runs_as_root():
    argv = _argv("podman", (), uid=0, init=False, shm_size=None)
    assert "--gpus" not in argv and "--device" not in argv
    assert "--userns=keep-id" not in argv and argv[argv.index("--user") + 1] == "0:1000"
    assert "--init" not in argv and not any(a.startswith(("--ipc", "--shm")) for a in argv)


def test_secrets_never_on_the_argv():
    words, values = C.env_split({"WANDB_API_KEY": "s3cret", "PATH": "/opt/bin:/usr/bin", "A": "x=y"})
    assert words == ["-e", "A", "-e", "PATH=/opt/bin:/usr/bin", "-e", "WANDB_API_KEY"]
    assert values == {"A": "x=y", "WANDB_API_KEY": "s3cret"}
    assert not any("s3cret" in w for w in _argv("docker"))


def test_name_and_labels_say_user_home_and_job():
    assert C.container_name("ann", HOME, 7) == "rtrain-ann-%s-7" % HH
    assert C.container_name("d.o'e x", HOME, 7).startswith("rtrain-d.o_e_x-")
    assert C.container_name("ann", HOME + "2", 7) != C.container_name("ann", HOME, 7)
    assert C.list_argv("docker", HOME) == ["docker", "ps", "--filter", "label=rtrain.home=" + HOME,
                                           "--format", "{{.Names}}"]


def test_stop_kill_rm_running_argv():
    assert C.stop_argv("docker", "n", 10) == ["docker", "stop", "-t", "10", "n"]
    assert C.kill_argv("podman", "n") == ["podman", "kill", "n"]
    assert C.rm_argv("docker", "n") == ["docker", "rm", "-f", "n"]
    assert C.running_argv("podman", "n") == ["podman", "inspect", "--format", "{{.State.Running}}", "n"]


@pytest.mark.parametrize("raw, needle", [
    ({}, "bad image"), ({"image": "-v"}, "bad image"), ({"image": "a b"}, "bad image"),
    ({"image": "x", "engine": "lxc"}, "docker or podman"), ({"image": "x", "pull": "sometimes"}, "pull"),
    ({"image": "x", "network": "host; rm"}, "network"), ({"image": "x", "gpu": 1}, "unknown container setting gpu"),
    ({"image": "x", "mounts": [{"target": "/x"}]}, "a mount"), ({"image": "x", "shm_size": "8 GB"}, "shm_size"),
])
def test_bad_settings_say_what(raw, needle):
    with pytest.raises(C.ContainerError) as e:
        C.settings(raw)
    assert needle in e.value.message


def test_paths_with_commas_are_refused():
    with pytest.raises(C.ContainerError, match="without commas"):
        _argv("docker", mounts=["/data/a,b:/data"])
    with pytest.raises(C.ContainerError, match="absolute"):
        _argv("docker", mounts=["data:/data"])


@pytest.mark.parametrize("setting, facts, want", [
    (None, {"docker": "/d", "podman": "/p", "podman_rootless": True}, "podman"),
    (None, {"docker": "/d", "podman": "/p", "podman_rootless": False}, "docker"),
    (None, {"docker": None, "podman": "/p", "podman_rootless": False}, "podman"),
    ("docker", {"docker": "/d", "podman": "/p", "podman_rootless": True}, "docker"),
    ("podman", {"docker": "/d", "podman": "/p", "podman_rootless": False}, "podman"),
])
def test_engine_choice(setting, facts, want):
    assert C.choose_engine(setting, facts) == want


def test_engine_missing_says_what_to_install():
    with pytest.raises(C.ContainerError) as e:
        C.choose_engine(None, {"docker": None, "podman": None})
    assert "no container engine" in e.value.message and "install podman" in e.value.hint
    with pytest.raises(C.ContainerError) as e:
        C.choose_engine("podman", {"docker": "/d", "podman": None})
    assert "podman is not installed" in e.value.message and "uidmap" in e.value.hint


def test_probe_engines_reads_path_and_subids(tmp_path):
    for name in ("podman", "newuidmap"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        os.chmod(tmp_path / name, 0o755)
    facts = C.probe_engines({"PATH": str(tmp_path)}, uid=0)
    assert facts["podman"] == str(tmp_path / "podman") and facts["docker"] is None
    assert facts["podman_rootless"] is False  # root runs podman rootful


def test_docker_without_the_toolkit_names_what_to_install():
    assert H.docker_gpu_problem(["io.containerd.runc.v2", "nvidia", "runc"], False) is None
    assert H.docker_gpu_problem(["runc"], True) is None
    e = H.docker_gpu_problem(["io.containerd.runc.v2", "runc"], False)
    assert "NVIDIA Container Toolkit is not installed" in e.message
    assert "nvidia-container-toolkit" in e.hint and "nvidia-ctk runtime configure" in e.hint
    assert "could not select" not in e.lines()
    e = H.docker_gpu_problem("Cannot connect to the Docker daemon", False)
    assert "cannot ask docker" in e.message


def _nvidia_ctk_yaml(names):
    """A CDI spec as `nvidia-ctk cdi generate` writes it (shape of its YAML output)."""
    devs = "".join('- containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia%d\n  name: "%s"\n' % (i, n)
                   for i, n in enumerate(names))
    return ("---\ncdiVersion: 0.5.0\ncontainerEdits:\n  deviceNodes:\n  - path: /dev/nvidiactl\n"
            "  hooks:\n  - args:\n    - nvidia-ctk\n    hookName: createContainer\n    path: /usr/bin/nvidia-ctk\n"
            "devices:\n%skind: nvidia.com/gpu\n" % devs)


def test_cdi_device_names_from_yaml_and_json(tmp_path):
    (tmp_path / "nvidia.yaml").write_text(_nvidia_ctk_yaml(["0", UUIDS[0], "all"]))
    (tmp_path / "other.json").write_text(json.dumps({"cdiVersion": "0.5.0", "kind": "vendor.com/fpga",
                                                     "devices": [{"name": UUIDS[1]}]}))
    (tmp_path / "fake.json").write_text(json.dumps({"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
                                                    "devices": [{"name": "GPU-x", "containerEdits": {}}]}))
    (tmp_path / "broken.json").write_text("{")
    names = H.cdi_device_names([str(tmp_path), str(tmp_path / "missing")])
    assert names == {"0", UUIDS[0], "all", "GPU-x"}
    assert H.podman_gpu_problem([UUIDS[0]], names) is None
    e = H.podman_gpu_problem(UUIDS, names)
    assert "does not name %s" % UUIDS[1] in e.message and "nvidia-ctk cdi generate" in e.hint
    e = H.podman_gpu_problem(UUIDS, set(), ("/etc/cdi", "/var/run/cdi"))
    assert "no CDI spec" in e.message and "/etc/cdi" in e.message


def test_agent_modules_are_stdlib_only():
    from launcher.agent import imagebuild, jobcontainer
    for mod in (C, H, imagebuild, jobcontainer):
        src = open(mod.__file__).read()
        for banned in ("import yaml", "import docker", "from launcher"):
            assert banned not in src
