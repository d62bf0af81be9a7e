"""Fixtures shared by every test: an isolated rtrain world per test (RTRAIN_HOME, the shared
GPU lock directory, a simulated nvidia-smi first on PATH) and a way to run the real CLI."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import REPO, SHARED, daemon_pid, in_ci, need, stop_agent  # noqa: E402,F401


class World:
    """One user's rtrain on this machine: their home, the shared lock dir, the fake GPUs."""

    def __init__(self, root, lock_dir, bin_dir, state_path, name="u1"):
        self.root = Path(root)
        self.home = self.root / ("home-" + name)
        self.lock_dir = lock_dir
        self.bin_dir = bin_dir
        self.state_path = state_path
        self.cwd = self.root / ("src-" + name)
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.name = name

    def env(self, **extra):
        env = dict(os.environ)
        env.pop("RTRAIN_HOSTS", None)
        env.update({
            "RTRAIN_HOME": str(self.home),
            "RTRAIN_LOCK_DIR": str(self.lock_dir),
            "RTRAIN_DAEMON_IDLE_S": "30",
            "PATH": "%s:%s" % (self.bin_dir, os.environ.get("PATH", "")),
            "PYTHONPATH": str(REPO),
            "FAKE_NVIDIA_SMI_STATE": str(self.state_path),
            "HOME": os.environ.get("HOME", "/root"),
            # the client's hash cache and manifest records (bases.py): this world's own
            "XDG_CACHE_HOME": str(self.root / ("cache-" + self.name)),
        })
        env.update(extra)
        return env

    def run(self, *args, check=True, timeout=60, input=None, cwd=None, env=None):
        p = subprocess.run([sys.executable, "-m", "launcher"] + [str(a) for a in args],
                           cwd=str(cwd or self.cwd), env=env or self.env(), capture_output=True,
                           text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError("rtrain %s failed (%d):\nstdout: %s\nstderr: %s" % (
                " ".join(map(str, args)), p.returncode, p.stdout, p.stderr))
        return p

    def submit(self, *cmd, gpus=0, extra=()):
        p = self.run("submit", "-q", "--gpus", gpus, *extra, "--", *cmd)
        return p.stdout.strip()

    def status(self, job=None):
        args = ["status", "--json", "--all"] + ([job] if job else [])
        return json.loads(self.run(*args).stdout)

    def wait(self, job, states=("succeeded", "failed", "cancelled", "lost"), timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.status(job)
            if j["state"] in states:
                return j
            time.sleep(0.1)
        raise AssertionError("job %s still %s after %ss" % (job, j["state"], timeout))

    def daemon_pid(self):
        return daemon_pid(self.home)

    def cleanup(self):
        """Stop the daemon and every job process this world started."""
        stop_agent(self.home)


@pytest.fixture
def world_factory(tmp_path):
    import fakesmi
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lock_dir = tmp_path / "locks"
    state = fakesmi.install(bin_dir)
    worlds = []

    def make(name="u1", gpus=4, **kw):
        if kw or gpus != 4:
            fakesmi.write_state(state, gpus=gpus, **kw)
        w = World(tmp_path, lock_dir, bin_dir, state, name)
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.cleanup()


@pytest.fixture
def world(world_factory):
    return world_factory()
