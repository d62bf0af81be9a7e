"""docker/ (the try-it tower) holds together: the Dockerfile's COPY sources are in its build
context, the GPU files are states the simulated nvidia-smi and the agent read as meant, the
compose file and the README's hosts entries are valid. (The image itself is built and driven
in tests/integration/containers/test_tower.py.)"""
import fnmatch
import os
import re
import subprocess

import yaml

from launcher import config
from launcher.agent import gpus
from support import REPO

D = REPO / "docker"


def test_dockerfile_base_is_an_official_python_slim_image_and_overridable():
    text = (D / "Dockerfile").read_text()
    m = re.search(r"^ARG BASE=(\S+)$", text, re.M)
    assert m and re.match(r"^python:3\.\d+-slim", m.group(1)), m
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)


def _ignored(path, patterns):
    """.dockerignore semantics for the plain patterns used here: the last match wins."""
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        if fnmatch.fnmatch(path, p.lstrip("!")):
            ignored = not neg
    return ignored


def test_copy_sources_are_in_the_build_context_and_nothing_else_is():
    text = (D / "Dockerfile").read_text()
    sources = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]
    assert "tests/fakes/nvidia-smi" in sources  # one simulated nvidia-smi, shared with the tests
    patterns = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines()
                if x.strip() and not x.startswith("#")]
    for src in sources:
        assert (REPO / src).is_file(), src
        assert not _ignored(src, patterns), src
    assert _ignored("launcher/cli.py", patterns) and _ignored(".git/config", patterns)


def _snapshot(state_file):
    env = dict(os.environ, FAKE_NVIDIA_SMI_STATE=str(state_file))
    fake = str(REPO / "tests" / "fakes" / "nvidia-smi")

    def run(argv):
        p = subprocess.run(["python3", fake] + list(argv[1:]), env=env, capture_output=True,
                           text=True, timeout=30)
        return p.returncode, p.stdout, p.stderr
    return gpus.classify(gpus.query("nvidia-smi", run=run))


def test_gpu_files_read_as_meant():
    one = _snapshot(D / "gpus.json")
    assert [u["state"] for u in one] == ["free"] * 4
    two = _snapshot(D / "gpus-2.json")
    assert [u["state"] for u in two] == ["free", "busy"]
    assert not {u["uuid"] for u in one} & {u["uuid"] for u in two}


def test_compose_runs_two_towers_from_this_dockerfile():
    c = yaml.safe_load((D / "compose.yaml").read_text())
    towers = c["services"]
    assert sorted(towers) == ["tower1", "tower2"]
    for t in towers.values():
        assert t["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert all(p.startswith("127.0.0.1:") for p in t["ports"])  # not on the LAN
        for v in t.get("volumes", []):
            assert (D / v.split(":")[0]).is_file(), v
    assert len({t["ports"][0] for t in towers.values()}) == 2


def test_readme_hosts_entries_are_valid(tmp_path):
    text = (D / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for i, b in enumerate(blocks):
        f = tmp_path / ("hosts%d.yaml" % i)
        f.write_text(b)
        cfg = config.parse(str(f))
        assert {h.ssh for h in cfg.hosts.values() if h.kind == "ssh"} <= {"dev@127.0.0.1:2221", "dev@127.0.0.1:2222"}
    ports = set(re.findall(r"127\.0\.0\.1:(\d+):22", (D / "compose.yaml").read_text()))
    assert ports == {"2221", "2222"}
