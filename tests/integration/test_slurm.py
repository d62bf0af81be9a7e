"""The agent's Slurm functions (launcher/agent/slurmjobs.py) against a real single-node Slurm 22.05
with 4 GPUs as GRES (tests/slurmcluster.py), driven the way the agent will drive them: on the
login node, as the test user, over the real sshd, from the shipped zipapp under python3 -S
(tests/slurm_driver.py). SLURM_CONF reaches the user's sessions through sshd's SetEnv; a counting
`squeue` first on their PATH tells how many times squeue ran."""
import json
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from launcher import agentpkg
from slurmcluster import SlurmCluster, missing_binaries
from support import ALICE, REPO, need

ENDED = ("succeeded", "failed", "cancelled", "lost", "preempted")
SSH_TRANSPORTS = ()  # conftest: these tests drive ssh themselves, not rtrain's transports


@pytest.fixture(scope="module")
def cluster():
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
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


class Login:
    """The cluster's login node as ALICE: ssh to an sshd whose sessions have SLURM_CONF."""

    def __init__(self, sshd, cluster):
        self.sshd = sshd
        self.dir = sshd.root / ("slurm-%s" % uuid.uuid4().hex[:8])
        shim = self.dir / "shim"
        shim.mkdir(parents=True)
        for d in (self.dir, shim):
            os.chmod(d, 0o755)
        self.calls = shim / "squeue.calls"
        self.calls.write_text("")
        os.chmod(self.calls, 0o666)
        real = shutil.which("squeue", path="/usr/bin:/usr/local/bin:/bin")
        (shim / "squeue").write_text('#!/bin/sh\necho "$*" >> %s\nexec %s "$@"\n' % (self.calls, real))
        os.chmod(shim / "squeue", 0o755)
        blob, digest = agentpkg.build()
        self.pyz = self.dir / ("agent-%s.pyz" % digest[:16])
        self.pyz.write_bytes(blob)
        self.driver = self.dir / "slurm_driver.py"
        shutil.copy(REPO / "tests" / "slurm_driver.py", self.driver)
        for f in (self.pyz, self.driver):
            os.chmod(f, 0o644)
        self.port, _, self.known_hosts = sshd.start("slurm-" + self.dir.name, set_env={
            "SLURM_CONF": str(cluster.conf),
            "PATH": "%s:%s:/usr/local/bin:/usr/bin:/bin" % (shim, sshd.bin_dir)})

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


@pytest.fixture(scope="module")
def login(sshd, cluster):
    return Login(sshd, cluster)


@pytest.fixture
def home(cluster):
    """A fresh RTRAIN_HOME of the test user; every job left by the test is cancelled after it."""
    yield "~/.rtrain-slurm-%s" % uuid.uuid4().hex[:8]
    cluster.cancel_all()


def job(i, command, **env):
    return {"id": i, "command": command, "env": env}


def overlap(views):
    """The most jobs that ran at one moment, from the wrapper's recorded start/end times."""
    events = []
    for v in views:
        events += [(v["started_at"], 1), (v["ended_at"], -1)]
    n = most = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        n += d
        most = max(most, n)
    return most


def test_two_gpus_from_slurm(login, home):
    sub, done, files = login.ok(
        home, ("make_jobs", {"ids": [1]}),
        ("submit", {"jobs": [job(1, 'echo "$CUDA_VISIBLE_DEVICES|$SLURM_JOB_GPUS|$RTRAIN_JOB_ID"')],
                    "options": {"gpus": 2}}),
        ("wait", {"ids": [1]}), ("files", {"ids": [1]}))[1:]
    v = done["views"]["1"]
    assert v["state"] == "succeeded" and v["exit_code"] == 0 and v["slurm_job_id"] == sub[0]
    assert v["node"] == "node1" and v["started_at"] <= v["ended_at"]
    cvd, slurm_gpus, rid = files["1"]["log"].strip().split("|")
    assert len(cvd.split(",")) == 2 and cvd == slurm_gpus and rid == "1"  # set by Slurm
    assert json.loads(files["1"]["exit.json"])["slurm_job_id"] == sub[0]


def test_six_jobs_of_two_gpus_run_two_at_a_time(login, home):
    ids = list(range(1, 7))
    res = login.ok(home, ("make_jobs", {"ids": ids}),
                   *[("submit", {"jobs": [job(i, "echo $CUDA_VISIBLE_DEVICES; sleep 3")],
                                 "options": {"gpus": 2}}) for i in ids],
                   ("wait", {"ids": ids, "timeout": 90}), ("files", {"ids": ids}))
    views, files = res[-2]["views"], res[-1]
    assert all(views[str(i)]["state"] == "succeeded" for i in ids), views
    ran = [views[str(i)] for i in ids]
    assert overlap(ran) == 2   # 4 GPUs: never 3 jobs of 2 at once, and not one at a time either
    gpus = {i: set(files[str(i)]["log"].split()[0].split(",")) for i in ids}
    for a in ids:
        assert len(gpus[a]) == 2
        for b in ids:
            va, vb = views[str(a)], views[str(b)]
            if a < b and va["started_at"] < vb["ended_at"] and vb["started_at"] < va["ended_at"]:
                assert not gpus[a] & gpus[b], (a, b, gpus)  # jobs that overlapped shared no GPU


def test_exit_codes_signals_and_the_log(login, home):
    ids = [1, 2, 3]
    cmds = {1: "printf 'out\\n'; printf 'err\\n' >&2; printf 'no newline'",
            2: "echo three; exit 3", 3: "echo before; kill -9 $$"}
    res = login.ok(home, ("make_jobs", {"ids": ids}),
                   *[("submit", {"jobs": [job(i, cmds[i])], "options": {}}) for i in ids],
                   ("wait", {"ids": ids}), ("files", {"ids": ids}))
    views, files = res[-2]["views"], res[-1]
    got = {i: (views[str(i)]["state"], views[str(i)]["exit_code"], views[str(i)]["signal"],
               views[str(i)]["reason"]) for i in ids}
    assert got == {1: ("succeeded", 0, None, None), 2: ("failed", 3, None, "exit 3"),
                   3: ("failed", 137, "SIGKILL", "killed by SIGKILL")}
    assert [files[str(i)]["log"] for i in ids] == ["out\nerr\nno newline", "three\n", "before\n"]
    assert json.loads(files["3"]["exit.json"])["signal"] == "SIGKILL"


def test_cancel_a_running_and_a_pending_job_and_gpus_per_node(login, home):
    ids = [1, 2, 3]
    res = login.ok(home, ("gpus", {}), ("make_jobs", {"ids": ids}),
                   *[("submit", {"jobs": [job(i, "echo up; sleep 600")], "options": {"gpus": 2}})
                     for i in ids],
                   ("wait", {"ids": [1, 2], "states": ["running"], "timeout": 30}),
                   ("status", {"ids": ids}), ("gpus", {}))
    idle, (running, busy) = res[0], res[-2:]
    assert [(n["node"], n["gpus_total"], n["gpus_free"]) for n in idle] == [("node1", 4, 4)]
    assert [(n["gpus_used"], n["gpus_free"]) for n in busy] == [(4, 0)]
    v = running["views"]
    assert v["1"]["state"] == v["2"]["state"] == "running"
    assert v["3"]["state"] == "queued" and v["3"]["reason"] in ("Resources", "Priority")
    cancel, done, files = login.ok(home, ("cancel", {"ids": [1, 3]}),
                                   ("wait", {"ids": [1, 3], "timeout": 30}),
                                   ("files", {"ids": [1, 2, 3]}))
    assert cancel == {"1": None, "3": None}
    d = done["views"]
    assert (d["1"]["state"], d["1"]["exit_code"], d["1"]["signal"]) == ("cancelled", 143, "SIGTERM")
    assert (d["3"]["state"], d["3"]["exit_code"], d["3"]["started_at"]) == ("cancelled", None, None)
    assert json.loads(files["1"]["exit.json"])["cancelled"] is True
    assert files["3"]["start.json"] is None and files["3"]["exit.json"] is None
    assert files["2"]["exit.json"] is None  # the other job runs on
    (still,) = login.ok(home, ("status", {"ids": [2]}))
    assert still["views"]["2"]["state"] == "running"
    cancel, done = login.ok(home, ("cancel", {"ids": [2]}), ("wait", {"ids": [2], "timeout": 30}))
    assert done["views"]["2"]["state"] == "cancelled"


def test_an_array_with_a_throttle(login, home):
    ids = [11, 12, 13, 14]
    res = login.ok(home, ("make_jobs", {"ids": ids}),
                   ("submit", {"jobs": [job(i, "echo task $RTRAIN_JOB_ID $SLURM_ARRAY_TASK_ID "
                                              "$PWD $SWEEP_LR; sleep 3", SWEEP_LR=str(i / 100))
                                        for i in ids],
                               "options": {"gpus": 1, "array_limit": 2}}),
                   ("wait", {"ids": ids, "timeout": 90}), ("files", {"ids": ids}))
    sids, views, files = res[1], res[2]["views"], res[3]
    base = sids[0].split("_")[0]
    assert sids == ["%s_%d" % (base, t) for t in range(4)]
    assert all(views[str(i)]["state"] == "succeeded" for i in ids), views
    assert [views[str(i)]["slurm_job_id"] for i in ids] == sids
    logs = [files[str(i)]["log"].split() for i in ids]
    assert [x[:3] + x[4:] for x in logs] == [["task", str(i), str(t), str(i / 100)]
                                              for t, i in enumerate(ids)]
    assert [x[3].endswith("/jobs/%d/work" % i) for x, i in zip(logs, ids)] == [True] * 4
    assert overlap([views[str(i)] for i in ids]) == 2  # %2, with 4 GPUs free


def test_an_afterok_chain_with_a_failure(login, home):
    ids = [1, 2, 3, 4, 5, 6]
    first = login.ok(home, ("make_jobs", {"ids": ids}),
                     ("submit", {"jobs": [job(1, "sleep 1; exit 1")], "options": {}}),
                     ("submit", {"jobs": [job(5, "sleep 1")], "options": {}}))
    a, e = first[1][0], first[2][0]
    b = login.ok(home, ("submit", {"jobs": [job(2, "echo b")], "options": {"after_ok": [a]}}))[0][0]
    login.ok(home, ("submit", {"jobs": [job(3, "echo c")], "options": {"after_ok": [b]}}),
             ("submit", {"jobs": [job(4, "echo any")], "options": {"after_any": [a]}}),
             ("submit", {"jobs": [job(6, "echo after e")], "options": {"after_ok": [e]}}))
    done, files = login.ok(home, ("wait", {"ids": ids, "timeout": 60}), ("files", {"ids": ids}))
    v = done["views"]
    got = {i: (v[str(i)]["state"], v[str(i)]["reason"]) for i in ids}
    assert got == {1: ("failed", "exit 1"), 2: ("cancelled", "DependencyNeverSatisfied"),
                   3: ("cancelled", "DependencyNeverSatisfied"), 4: ("succeeded", None),
                   5: ("succeeded", None), 6: ("succeeded", None)}
    assert files["2"]["log"] == "" and files["3"]["log"] == ""
    assert files["4"]["log"] == "any\n" and files["6"]["log"] == "after e\n"


def test_sbatch_refusals_come_back_in_one_line(login, home):
    res = login.run(home, ("make_jobs", {"ids": [1, 2]}),
                    ("submit", {"jobs": [job(1, "true")], "options": {"partition": "nope"}}),
                    ("submit", {"jobs": [job(2, "true")], "options": {"gpus": 8}}),
                    ("files", {"ids": [1], "names": ["slurm.json"]}))
    assert res[1]["error"] == {"code": "sbatch_refused", "message":
                               "Invalid partition name specified (invalid partition specified: nope)"}
    assert res[2]["error"] == {"code": "sbatch_refused",
                               "message": "Requested node configuration is not available"}
    assert res[3]["ok"]["1"]["slurm.json"] is None


def test_status_of_200_jobs_is_one_squeue_call(login, home):
    held = list(range(1, 191))
    ran = list(range(191, 201))
    ids = held + ran
    login.ok(home, ("make_jobs", {"ids": ids}),
             ("submit", {"jobs": [job(i, "true") for i in held],
                         "options": {"sbatch_args": ["--hold"]}}),
             *[("submit", {"jobs": [job(i, "echo %d" % i)], "options": {}}) for i in ran],
             ("wait", {"ids": ran, "timeout": 60}))
    for mode in ("auto", "json", "text"):
        before = login.squeue_calls()
        (st,) = login.ok(home, ("status", {"ids": ids, "mode": mode}))
        assert login.squeue_calls() - before == 1, mode
        v = st["views"]
        assert len(v) == 200
        assert all((v[str(i)]["state"], v[str(i)]["reason"]) == ("queued", "JobHeldUser")
                   for i in held), mode
        assert all(v[str(i)]["state"] == "succeeded" for i in ran), mode
        assert len({v[str(i)]["slurm_job_id"] for i in ids}) == 200
    assert "--json" in login.calls.read_text().splitlines()[-3]  # auto chose JSON here
    before = login.squeue_calls()
    cancel, done = login.ok(home, ("cancel", {"ids": held}),
                            ("wait", {"ids": held, "timeout": 60}))
    assert set(cancel.values()) == {None}
    assert all(done["views"][str(i)]["state"] == "cancelled" for i in held)
    assert login.squeue_calls() - before == done["polls"]  # one squeue per status of 190 jobs
