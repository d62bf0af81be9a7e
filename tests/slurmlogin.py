"""A Slurm cluster's login node for the integration tests: the real single-node Slurm
(slurmcluster.py) started for a test module, and an sshd whose sessions have SLURM_CONF, with a
counting `squeue` first on their PATH (it tells how many times squeue ran) and room for more
stand-ins (a fake apptainer). `Login.run` drives the agent's Slurm functions and verbs in one
ssh session as the test user, from the shipped zipapp (tests/slurm_driver.py)."""
import json
import os
import shutil
import subprocess
import tempfile
import uuid

from launcher import agentpkg
from slurmcluster import SlurmCluster, missing_binaries
from support import ALICE, REPO, need


def started_cluster():
    """A started cluster, or a skip (a failure in CI) saying why not. Call stop() after."""
    missing = missing_binaries()
    need(not missing, "Slurm is not installed (missing %s: apt-get install slurmctld slurmd "
                      "slurm-client munge)" % ", ".join(missing))
    need(os.geteuid() == 0, "starting munged and slurmd needs root")
    root = tempfile.mkdtemp(prefix="rtrain-slurm-")
    c = SlurmCluster(root)
    try:
        c.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        c.stop()
        need(False, "cannot start a Slurm cluster: %s" % e)
    return c


def stop_cluster(c):
    c.stop()
    shutil.rmtree(str(c.root), ignore_errors=True)


class Login:
    """The cluster's login node as ALICE: ssh to an sshd whose sessions have SLURM_CONF."""

    def __init__(self, sshd, cluster, path=None):
        self.sshd = sshd
        self.dir = sshd.root / ("slurm-%s" % uuid.uuid4().hex[:8])
        self.shim = shim = self.dir / "shim"
        shim.mkdir(parents=True)
        for d in (self.dir, shim):
            os.chmod(d, 0o755)
        self.calls = shim / "squeue.calls"
        self.calls.write_text("")
        os.chmod(self.calls, 0o666)
        real = shutil.which("squeue", path="/usr/bin:/usr/local/bin:/bin")
        self.add_program("squeue", '#!/bin/sh\necho "$*" >> %s\nexec %s "$@"\n' % (self.calls, real))
        blob, digest = agentpkg.build()
        self.pyz = self.dir / ("agent-%s.pyz" % digest[:16])
        self.pyz.write_bytes(blob)
        self.driver = self.dir / "slurm_driver.py"
        shutil.copy(REPO / "tests" / "slurm_driver.py", self.driver)
        for f in (self.pyz, self.driver):
            os.chmod(f, 0o644)
        self.port, _, self.known_hosts = sshd.start("slurm-" + self.dir.name, set_env={
            "SLURM_CONF": str(cluster.conf),
            "PATH": path or "%s:%s:/usr/local/bin:/usr/bin:/bin" % (shim, sshd.bin_dir)})

    def add_program(self, name, script):
        (self.shim / name).write_text(script)
        os.chmod(self.shim / name, 0o755)

    def squeue_calls(self):
        return len(self.calls.read_text().splitlines())

    def run(self, home, *calls, timeout=120):
        """Run the driver's calls in one ssh session; the results ({"ok"} or {"error"})."""
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.sshd.user_key), "-o", "IdentitiesOnly=yes",
                "-o", "UserKnownHostsFile=%s" % self.known_hosts, "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-p", str(self.port), "%s@127.0.0.1" % ALICE,
                "python3 -S %s %s rtrain_agent" % (self.driver, self.pyz)]
        env = dict(os.environ, SSH_AUTH_SOCK="")
        p = subprocess.run(argv, input=json.dumps({"home": home, "calls": [list(c) for c in calls]}),
                           capture_output=True, text=True, timeout=timeout, env=env)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.strip().splitlines()[-1])["results"]

    def ok(self, home, *calls, timeout=120):
        res = self.run(home, *calls, timeout=timeout)
        for c, r in zip(calls, res):
            assert "ok" in r, (c, r)
        return [r["ok"] for r in res]
