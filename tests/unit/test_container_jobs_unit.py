"""Container jobs without an engine: the Dockerfile's key (what COPY/ADD take), rtrain.yaml's
image:/build:/container:, the submit's "container", the job's argv (its variables in a sourced
file, its data/outputs/mounts bound at their paths), the leases kept until the container is
gone, and `rtrain hosts`' lines."""
import json
import os
import stat

import pytest

from launcher import containercheck, jobspec, project
from launcher.agent import containers as C
from launcher.agent import imagebuild as I
from launcher.agent import jobcontainer, paths
from launcher.errors import ConfigError, RtrainError

DOCKERFILE = """\
# syntax=docker/dockerfile:1
FROM python:3.12-slim AS base
# dependencies first
COPY requirements.txt /opt/
RUN pip install \\
    # a comment inside
    -r /opt/requirements.txt
COPY --chown=1000:1000 src/*.py ./app/
COPY --from=base /x /y
ADD https://example.com/x.tar.gz /tmp/
ADD ["conf dir/a.cfg", "/etc/a.cfg"]
copy ./lib/ /lib/
"""
ENTRIES = [{"path": p, "hash": "h-" + p} for p in (
    "requirements.txt", "src/a.py", "src/sub/b.py", "train.py", "lib/x/y.c", "conf dir/a.cfg", "Dockerfile")]


def test_dockerfile_instructions_and_sources():
    words = [w for w, _ in I.instructions(DOCKERFILE)]
    assert words == ["FROM", "COPY", "RUN", "COPY", "COPY", "ADD", "ADD", "COPY"]
    assert I.instructions(DOCKERFILE)[2] == ("RUN", "pip install  -r /opt/requirements.txt")
    assert I.sources(DOCKERFILE) == (["requirements.txt", "src/*.py", "conf dir/a.cfg", "lib"],
                                     ["https://example.com/x.tar.gz"], False)
    assert I.sources("FROM x\nCOPY . /app\n")[2] is True
    assert I.sources("FROM x\nARG V\nCOPY $V /app\n")[2] is True
    assert I.sources("FROM x\nCOPY <<EOF /x\nhi\nEOF\n")[2] is True
    assert I.sources("# escape=`\nFROM x\nCOPY a `\n  /b\n") == (["a"], [], False)
    assert I.needs_network("FROM x\nCOPY a /a\n") is False
    assert I.needs_network(DOCKERFILE) is True and I.needs_network("FROM x\nADD http://h/f /f\n") is True


def test_image_key_changes_with_what_the_dockerfile_copies_only():
    key, how = I.key_of("docker", "p", "Dockerfile", DOCKERFILE, ENTRIES)
    assert len(key) == 32 and how == "the Dockerfile and 4 file(s) its COPY/ADD lines name"

    def changed(path, **kw):
        ents = [dict(e, hash="new") if e["path"] == path else e for e in ENTRIES]
        return I.key_of(kw.get("engine", "docker"), "p", "Dockerfile", kw.get("text", DOCKERFILE), ents)[0]

    assert changed("train.py") == key and changed("src/sub/b.py") == key  # not copied
    for p in ("requirements.txt", "src/a.py", "lib/x/y.c", "conf dir/a.cfg"):
        assert changed(p) != key, p
    assert changed("train.py", engine="podman") != key
    assert changed("train.py", text=DOCKERFILE + "ENV X=1\n") != key
    whole, how = I.key_of("docker", "p", "Dockerfile", "FROM x\nCOPY . /app\n", ENTRIES)
    assert how == "the whole context (7 files)"
    assert I.key_of("docker", "p", "Dockerfile", "FROM x\nCOPY . /app\n",
                    [dict(e, hash="n") if e["path"] == "train.py" else e for e in ENTRIES])[0] != whole


def test_image_tag_is_a_valid_repository_name():
    assert I.tag("Demo_Proj", "ab" * 16) == "rtrain/demo-proj:" + "ab" * 16
    assert I.tag("..x..", "k") == "rtrain/x:k" and I.tag("___", "k") == "rtrain/project:k"
    assert I.build_argv("docker", "/d", "/w/Dockerfile", "rtrain/p:k", "/w", "none", [("a", "b")]) == [
        "/d", "build", "-f", "/w/Dockerfile", "-t", "rtrain/p:k", "--network=none", "--force-rm",
        "--label", "a=b", "/w"]


@pytest.mark.parametrize("raw, needle", [
    ({"build": {"dockerfile": "/abs"}}, "build must be"),
    ({"build": {"dockerfile": "../up"}}, "build must be"),
    ({"build": {"dockerfile": "D", "x": 1}}, "build must be"),
    ({"build": {"dockerfile": "D"}, "image": "x"}, "not both"),
    ({"image": "x", "build_network": "a b"}, "build_network"),
    ({"image": "x", "init": "yes"}, "init must be"),
])
def test_bad_build_settings(raw, needle):
    with pytest.raises(C.ContainerError) as e:
        C.settings(raw)
    assert needle in e.value.message


def write(tmp_path, text):
    (tmp_path / "rtrain.yaml").write_text(text)
    return str(tmp_path)


def test_project_image_build_container_and_per_host(tmp_path):
    p = project.load(write(tmp_path, "image: python:3.12-slim\ncontainer: {network: none, shm_size: 16g}\n"
                                     "hosts:\n  lab:\n    build: docker/Dockerfile\n  old:\n    venv: /v\n"))
    assert p.image == "python:3.12-slim" and p.container == (("network", "none"), ("shm_size", "16g"))
    lab = p.for_host("lab")
    assert (lab.image, lab.build) == (None, "docker/Dockerfile")
    old = p.for_host("old")
    assert (old.image, old.build, old.venv) == (None, None, "/v")
    cli = p.with_image("nvcr.io/x:1")
    assert (cli.image, cli.build) == ("nvcr.io/x:1", None)


@pytest.mark.parametrize("text, needle", [
    ("image: 'a b'\n", "bad image name"),
    ("image: [x]\n", "'image' must be"),
    ("container: {gpus: 1}\n", "'container' must be a mapping of network"),
    ("image: x\ncontainer: {pull: sometimes}\n", "pull must be one of"),
    ("build: ../Dockerfile\n", "not a path inside the project"),
    ("image: x\nbuild: Dockerfile\n", "image and build cannot go together"),
    ("image: x\nsetup: pip install y\n", "image and setup cannot go together"),
    ("build: Dockerfile\nshell: login\n", "build and shell cannot go together"),
])
def test_project_container_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        project.load(write(tmp_path, text))
    assert needle in e.value.message and "rtrain.yaml" in e.value.message


def test_submit_request_container(tmp_path):
    p = project.load(write(tmp_path, "build: docker/Dockerfile\ncontainer: {pull: never}\n"))
    code = [{"path": "docker/Dockerfile", "type": "file", "hash": "h"}, {"path": "requirements.txt", "hash": "r"}]
    assert jobspec.container(p, code, "podman") == {
        "pull": "never", "engine": "podman", "image": None,
        "build": {"dockerfile": "docker/Dockerfile", "project": p.project}}
    with pytest.raises(RtrainError, match="not in the snapshot"):
        jobspec.container(p, code[1:])
    assert jobspec.container(project.Project(), code) is None
    host = project.Project(setup="pip install -r requirements.txt", python="python3.11", outputs=("out",))
    assert jobspec.request(host.with_image("x"), code, in_container=True)["env"] == {}
    assert jobspec.request(host, code)["env"]["python"] == "python3.11"
    assert host.with_image("x").host_env_keys() == ["setup", "python"]


def _fake_engine(d, name="docker"):
    """An engine that writes its argv to calls.txt; `inspect` says there is no such container."""
    log = d / "calls.txt"
    path = d / name
    path.write_text("#!/bin/sh\necho \"$@\" >> %s\ncase \"$1\" in inspect) echo 'Error: No such container' >&2; "
                    "exit 1;; esac\nexit 0\n" % log)
    path.chmod(0o755)
    return str(path), log


def test_job_argv_variables_file_and_link_mounts(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_engine(bin_dir)
    home = paths.Home(str(tmp_path / "home")).ensure()
    jp = home.job(5)
    os.makedirs(jp.work)
    data_root = os.path.join(home.root, "builds", "data", "k" * 32)
    os.makedirs(data_root)
    (tmp_path / "ext").mkdir()
    with open(os.path.join(jp.dir, "project.json"), "w") as f:
        json.dump({"name": "demo", "data": ["data"], "outputs": ["out"], "data_key": "k" * 32,
                   "mounts": [["ext", str(tmp_path / "ext")]]}, f)
    job = {"id": 5, "command": "python3 train.py", "grace": 10, "gpus": [],
           "env": {"PATH": "/opt/x/bin:$PATH", "TOKEN": "s3cret 'x'", "odd-name": "v"},
           "container": {"image": "img:1", "engine": "docker"}}
    fixed = [("RTRAIN_JOB_ID", "5"), ("CUDA_VISIBLE_DEVICES", "")]
    argv, env, (engine_bin, name, _) = jobcontainer.command(home, job, fixed, base_env={"PATH": str(bin_dir)})
    env_file = os.path.join(jp.dir, "container-env.sh")
    assert engine_bin == str(bin_dir / "docker") and name.endswith("-5")
    assert argv[-4:] == ["img:1", "/bin/sh", "-c", ". %s\npython3 train.py" % env_file]
    mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "--mount"]
    outputs = os.path.join(home.root, "projects", "demo", "outputs", "out")
    assert mounts == ["type=bind,source=%s,target=%s" % (jp.work, jp.work),
                      "type=bind,source=%s,target=%s,readonly" % (data_root, data_root),
                      "type=bind,source=%s,target=%s" % (outputs, outputs),
                      "type=bind,source=%s,target=%s" % (tmp_path / "ext", tmp_path / "ext"),
                      "type=bind,source=%s,target=%s,readonly" % (env_file, env_file)]
    text = open(env_file).read()
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    assert text == ("export PATH=/opt/x/bin:\"${PATH}\"\nexport TOKEN='s3cret '\"'\"'x'\"'\"''\n"
                    "export RTRAIN_JOB_ID=5\nexport CUDA_VISIBLE_DEVICES=''\n")
    assert not any("s3cret" in a for a in argv)  # values never on an argv: other users see it
    assert argv[argv.index("-e", argv.index("--workdir")):argv.index("img:1")] == [
        "-e", "CUDA_VISIBLE_DEVICES", "-e", "RTRAIN_JOB_ID", "-e", "odd-name"]
    assert env["odd-name"] == "v" and env["RTRAIN_JOB_ID"] == "5" and "TOKEN" not in env


def test_the_container_is_gone_before_the_leases_go(tmp_path):
    engine, calls = _fake_engine(tmp_path)
    c = (engine, "rtrain-ann-abc-5", {"PATH": "/usr/bin:/bin"})
    assert jobcontainer.gone(c, 0, False) is True and not calls.exists()  # run --rm: gone already
    for rc, cancelled in ((0, True), (-9, False), (125, False)):
        calls.unlink(missing_ok=True)
        assert jobcontainer.gone(c, rc, cancelled) is True
        assert calls.read_text().splitlines() == ["rm -f rtrain-ann-abc-5",
                                                  "inspect --format {{.State.Running}} rtrain-ann-abc-5"]


def test_hosts_lines():
    summary = {"docker": {"path": "/usr/bin/docker", "version": "20.10.24", "error": None},
               "podman": {"path": "/usr/bin/podman", "version": "4.3.1", "error": None},
               "podman_rootless": True, "engine": "podman", "problem": None,
               "gpus": {"ok": False, "detail": "podman cannot give GPUs", "hint": "nvidia-ctk cdi generate"}}
    lines = containercheck.checks(summary)
    assert lines[0] == {"name": "containers", "ok": True,
                        "detail": "podman 4.3.1 rootless (used), docker 20.10.24", "fix": ""}
    assert lines[1]["ok"] is None and "nvidia-ctk" in lines[1]["fix"]  # a warning: no engine was asked for
    assert containercheck.checks(summary, engine_set=True)[1]["ok"] is False
    none = {"docker": None, "podman": None, "podman_rootless": False, "engine": None, "gpus": None,
            "problem": ["this host has no container engine", "install podman"]}
    assert containercheck.checks(none) == [{"name": "containers", "ok": None,
                                            "detail": "this host has no container engine",
                                            "fix": "install podman; host jobs run"}]
    assert containercheck.checks(None) == []


def test_hosts_yaml_container_engine(tmp_path):
    from launcher import config
    f = tmp_path / "hosts.yaml"
    f.write_text("hosts:\n  tower:\n    ssh: me@tower\n    container_engine: podman\n")
    assert config.load(str(f)).get("tower").container_engine == "podman"
    f.write_text("hosts:\n  tower:\n    ssh: me@tower\n    container_engine: lxc\n")
    with pytest.raises(ConfigError, match="hosts.yaml:4: host 'tower': 'container_engine' must be docker or podman"):
        config.load(str(f))
