"""rtrain on a Slurm cluster, end to end through the real `rtrain` CLI: a host with `scheduler:
slurm` whose login node is reached over the real sshd as the test user, on the real single-node
Slurm 22.05 with 4 GPUs as GRES (tests/slurmlogin.py). Slurm, not rtrain's daemon, runs the
jobs: submit hands them to sbatch, status asks squeue once for all, logs -f streams the log the
compute node writes, cancel is scancel. Waits are polls with generous limits, never timings."""
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from slurmlogin import Login, started_cluster, stop_cluster
from support import ALICE, one_error, path_without

ACTIVE = ("queued", "running")
SSH_TRANSPORTS = ("openssh",)  # conftest: the transports have tests of their own; Slurm's path is one

# stands in for the cluster's apptainer: says how it was called, then runs the job's command
FAKE_APPTAINER = r"""#!/bin/bash
printf '%s\n' "$@" > "$RTRAIN_JOB_ID.apptainer-argv"
[ "$1" = exec ] && shift
[ "$1" = --nv ] && shift
[ "$1" = --bind ] && shift 2
[ "$1" = --pwd ] && { cd "$2" || exit 125; shift 2; }
shift  # the image
exec "$@"
"""


@pytest.fixture(scope="module")
def cluster():
    c = started_cluster()
    yield c
    stop_cluster(c)


@pytest.fixture(scope="module")
def login(sshd, cluster):
    lg = Login(sshd, cluster)
    lg.add_program("apptainer", FAKE_APPTAINER)
    return lg


class Cli:
    """The laptop: a project folder and a hosts.yaml naming the cluster's login node."""

    def __init__(self, sshd, login, root, **settings):
        self.sshd, self.login = sshd, login
        self.home = "~/.rtrain-slurm-%s" % uuid.uuid4().hex[:8]
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.hosts = sshd.hosts_yaml(root / "hosts.yaml", {"cluster": (ALICE, login.port, dict(
            home=self.home, scheduler="slurm", **settings))})
        self.src = root / "src"
        self.src.mkdir(exist_ok=True)
        self.env = sshd.env(known_hosts=login.known_hosts)

    def run(self, *args, check=True, timeout=120, text=True):
        p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(self.hosts)] +
                           [str(a) for a in args], cwd=str(self.src), env=self.env,
                           capture_output=True, text=text, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
        return p

    def submit(self, *argv):
        return self.run("submit", "-q", *argv).stdout.strip()

    def job(self, job):
        return json.loads(self.run("status", "--json", job).stdout)

    def wait(self, job, states=None, timeout=90):
        deadline = time.time() + timeout
        while True:
            j = self.job(job)
            if (j["state"] in states) if states else (j["state"] not in ACTIVE):
                return j
            assert time.time() < deadline, "job %s stayed %s" % (job, j)
            time.sleep(0.3)


@pytest.fixture
def cli(sshd, login, cluster, tmp_path):
    yield Cli(sshd, login, tmp_path / "laptop")
    cluster.cancel_all()


def overlap(jobs):
    """The most jobs that ran at one moment, from their recorded start and end times."""
    events = sorted([(j["started_at"], 1) for j in jobs] + [(j["ended_at"], -1) for j in jobs],
                    key=lambda e: (e[0], e[1]))
    n = most = 0
    for _, d in events:
        n += d
        most = max(most, n)
    return most


def test_a_gpu_job_from_submit_to_pull(cli):
    (cli.src / "train.py").write_text(
        "import os\nprint('cvd', os.environ['CUDA_VISIBLE_DEVICES'], os.environ['SLURM_JOB_ID'],\n"
        "      os.environ['RTRAIN_JOB_ID'], os.environ['GREETING'])\n"
        "os.makedirs('out', exist_ok=True)\nopen('out/result.txt', 'w').write('done')\n")
    job = cli.submit("--gpus", "2", "--env", "GREETING=hi $USER", "--", "python3", "train.py")
    j = cli.wait(job)
    assert j["state"] == "succeeded" and j["exit_code"] == 0, j
    assert len(j["gpus"]) == 2 and all(g.startswith("node1:") for g in j["gpus"]), j
    assert j["slurm"]["node"] == "node1" and j["slurm"]["job_id"].isdigit()
    assert j["started_at"] <= j["ended_at"] and j["gpu_hours"] > 0
    # CUDA_VISIBLE_DEVICES is Slurm's; the job's variables expand on the compute node
    indexes = ",".join(g.split(":")[1] for g in j["gpus"])
    assert cli.run("logs", job).stdout == "cvd %s %s %s hi %s\n" % (
        indexes, j["slurm"]["job_id"], job, ALICE)
    detail = cli.run("status", job).stdout
    assert "slurm" in detail and "job %s" % j["slurm"]["job_id"] in detail and "node1" in detail
    cli.run("pull", job, "out")
    assert (cli.src / "rtrain-out" / job / "out" / "result.txt").read_text() == "done"


def test_six_jobs_of_two_gpus_run_two_at_a_time(cli):
    jobs = [cli.submit("--gpus", "2", "--", "sleep 3") for _ in range(6)]
    done = [cli.wait(j) for j in jobs]
    assert all(j["state"] == "succeeded" for j in done), done
    assert overlap(done) == 2  # 4 GPUs: never 3 jobs of 2 at once, and not one at a time either
    for a in done:
        for b in done:
            if a["id"] < b["id"] and a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]:
                assert not set(a["gpus"]) & set(b["gpus"]), (a, b)  # jobs at once share no GPU


def test_exit_codes_and_a_signal(cli):
    for cmd, code in (("echo ok", 0), ("echo three; exit 3", 3), ("echo before; kill -9 $$", 137)):
        p = cli.run("submit", "-q", "-f", "--", cmd, check=False)
        assert p.returncode == code, (cmd, p.stdout, p.stderr)
        job, log = p.stdout.split("\n", 1)
        assert log == cmd.split(";")[0][5:] + "\n"
        j = cli.job(job)
        assert (j["state"], j["exit_code"]) == ("succeeded" if code == 0 else "failed", code)
        assert j["signal"] == ("SIGKILL" if code == 137 else None)


def test_cancel_a_running_and_a_pending_job(cli):
    running = cli.submit("--gpus", "4", "--", "echo up; sleep 600")
    pending = cli.submit("--gpus", "4", "--", "sleep 600")
    cli.wait(running, states=("running",))
    deadline = time.time() + 30
    while True:  # (a job Slurm has not looked at yet waits for no reason: "Pending")
        j = cli.job(pending)
        if j["message"] != "Pending" or time.time() > deadline:
            break
        time.sleep(0.3)
    assert j["state"] == "queued" and j["message"] in ("Pending: Resources", "Pending: Priority"), j
    assert j["slurm"]["state"] == "PENDING" and j["slurm"]["reason"] in ("Resources", "Priority")
    assert "Pending: " in cli.run("status", pending).stdout
    out = cli.run("cancel", pending, running).stdout  # (the other way, the pending one would start)
    assert "cancelled job %s" % running in out and "cancelled job %s" % pending in out
    r, p = cli.wait(running), cli.wait(pending)
    assert (r["state"], r["exit_code"], r["signal"]) == ("cancelled", 143, "SIGTERM")
    assert (p["state"], p["exit_code"], p["started_at"]) == ("cancelled", None, None)
    log = cli.run("logs", running).stdout  # and slurmstepd's own word on it
    assert log.startswith("up\n") and "CANCELLED" in log, log


def test_logs_follow_from_start_to_end_is_byte_exact(cli):
    (cli.src / "emit.py").write_bytes(
        b"import sys, time\nout = sys.stdout.buffer\n"
        b"for i in range(30):\n    out.write(b'line %d \\r\\xff\\xfe ' % i + b'x' * (i * 300) + b'\\n')\n"
        b"    out.flush()\n    time.sleep(0.1)\nout.write(b'no newline')\nsys.exit(4)\n")
    want = b"".join(b"line %d \r\xff\xfe " % i + b"x" * (i * 300) + b"\n" for i in range(30)) + b"no newline"
    job = cli.submit("--", "python3", "emit.py")
    p = cli.run("logs", job, "-f", check=False, text=False)
    assert p.returncode == 4, p.stderr
    assert p.stdout == want
    assert cli.run("logs", job, text=False).stdout == want


def test_a_bad_partition_gives_slurms_reason_in_one_line(sshd, login, tmp_path):
    cli = Cli(sshd, login, tmp_path / "bad", partition="nope")
    p = cli.run("submit", "--", "true", check=False)
    one_error(p, "Slurm refused it: Invalid partition name specified (invalid partition specified: nope)")
    (j,) = json.loads(cli.run("status", "--json", "--all").stdout)
    assert j["state"] == "failed" and "Invalid partition name specified" in j["message"]


def test_status_of_200_jobs_is_one_squeue_call(cli, login):
    req = {"manifest": {"entries": []}, "command": "true", "gpus": 0, "slurm": {"sbatch_args": ["--hold"]}}
    login.ok(cli.home, ("agent", {"verb": "submit", "req": req, "times": 190}),
             ("agent", {"verb": "submit", "req": dict(req, command="echo hi", slurm={}), "times": 10}))
    deadline = time.time() + 60
    while True:
        before = login.squeue_calls()
        jobs = json.loads(cli.run("status", "--json").stdout)
        assert login.squeue_calls() - before == 1  # one squeue for all 200
        states = [j["state"] for j in jobs]
        if states.count("succeeded") == 10 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(jobs) == 200 and states.count("queued") == 190 and states.count("succeeded") == 10
    assert {j["message"] for j in jobs if j["state"] == "queued"} == {"Pending: JobHeldUser"}
    before = login.squeue_calls()
    table = cli.run("status").stdout
    assert login.squeue_calls() - before == 1 and table.count("queued") == 190


def test_rtrain_hosts_checks_the_cluster_and_gpus_shows_gres(cli, sshd, cluster, tmp_path, monkeypatch):
    p = cli.run("hosts")
    out = p.stdout
    assert "cluster: ready" in out, out
    assert "1 node(s), 4 GPU(s), 4 free; partitions gpu, short" in out
    assert "compute node node1 sees" in out and " 22.05" in out
    gp = json.loads(cli.run("gpus", "--json").stdout)
    assert [(g["host"], g["node"], g["gpus_total"], g["gpus_used"], g["gpus_free"]) for g in gp] == \
        [("cluster", "node1", 4, 0, 4)]
    busy = cli.submit("--gpus", "3", "--", "sleep 600")
    cli.wait(busy, states=("running",))
    table = cli.run("gpus").stdout
    assert "node1" in table and " 3 " in table.splitlines()[1], table
    # a login node without Slurm's commands on PATH
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")  # what the test user may run
    bare = Login(sshd, cluster, path=path_without(
        ("sbatch", "squeue", "scancel", "sinfo", "scontrol"), sshd.root))  # (readable by the user)
    nocli = Cli(sshd, bare, tmp_path / "noslurm")
    p = nocli.run("hosts", check=False)
    assert p.returncode == 1 and "cluster: not ready" in p.stdout
    assert "sbatch, scancel, scontrol, sinfo, squeue not found on PATH" in p.stdout, p.stdout


def test_retries_ask_slurm_to_requeue(cli, cluster):
    job = cli.submit("--retries", "1", "--", "echo run $SLURM_RESTART_COUNT; sleep 4")
    j = cli.wait(job, states=("running",))
    sid = j["slurm"]["job_id"]
    assert "Requeue=1" in cluster.run("scontrol", "show", "job", sid).stdout
    cluster.run("scontrol", "requeue", sid)  # as a preemption or a node failure would
    j = cli.wait(job, states=("queued",), timeout=30)
    assert j["message"].startswith("requeued by Slurm"), j
    j = cli.wait(job, timeout=120)
    assert j["state"] == "succeeded" and j["attempts"] == 2, j
    assert cli.run("logs", job).stdout.endswith("run 1\n")


def test_a_container_job_runs_through_the_clusters_apptainer(sshd, login, cluster, tmp_path):
    cli = Cli(sshd, login, tmp_path / "ctr", container_engine="apptainer")
    job = cli.submit("--image", "docker://python:3.12-slim", "--gpus", "1", "--env", "GREETING=hello",
                     "--", "echo in $PWD; echo $GREETING")
    j = cli.wait(job)
    work = j["work_dir"]
    assert j["state"] == "succeeded", (j, cli.run("logs", job).stdout)
    assert cli.run("logs", job).stdout == "in %s\nhello\n" % work
    with open(os.path.join(work, "%s.apptainer-argv" % job)) as f:
        argv = f.read().splitlines()
    home = work[:-len("/jobs/%s/work" % job)]
    assert argv == ["exec", "--nv", "--bind", "%s:%s" % (home, home), "--pwd", work,
                    "docker://python:3.12-slim", "/bin/sh", "-c", "echo in $PWD; echo $GREETING"]
    cluster.cancel_all()


def test_the_project_file_environment_is_built_on_the_login_node(cli, sshd):
    """rtrain.yaml's setup builds a venv on the login node before sbatch (once per key), its data
    is shared read-only, its outputs kept: the compute node uses them through the shared home."""
    from wheels import make_wheel
    wheels = sshd.root / ("wheels-%s" % uuid.uuid4().hex[:8])  # readable by the test user
    make_wheel(str(wheels), "tinypkg", "1.0", "VALUE = 'one'\n")
    os.chmod(wheels, 0o755)
    (cli.src / "requirements.txt").write_text("tinypkg==1.0\n")
    (cli.src / "data").mkdir()
    (cli.src / "data" / "in.txt").write_text("input\n")
    (cli.src / "rtrain.yaml").write_text(
        'run: python -c "import tinypkg, sys; print(tinypkg.VALUE, sys.prefix != sys.base_prefix, '
        'open(\'data/in.txt\').read().strip()); open(\'out/n\', \'a\').write(\'x\')"\n'
        "setup: pip install --no-index --find-links %s -r requirements.txt\n"
        "data: [data]\noutputs: [out]\n" % wheels)
    p = cli.run("submit")
    job = p.stdout.split()[1]
    assert "rtrain: building its environment" in p.stderr  # said while the login node builds it
    j = cli.wait(job)
    log = cli.run("logs", job).stdout
    assert j["state"] == "succeeded", log
    assert "\nrtrain: building environment" in log and log.endswith("one True input\n"), log
    again = cli.submit()
    assert cli.wait(again)["state"] == "succeeded"
    assert "is built already" in cli.run("logs", again).stdout
    cli.run("pull", again, "out")
    assert (cli.src / "rtrain-out" / again / "out" / "n").read_text() == "xx"  # shared by both jobs
    # a setup that fails: the submit says so in one line, and the job has failed
    (cli.src / "rtrain.yaml").write_text("run: echo never\nsetup: echo broken; exit 7\n")
    p = cli.run("submit", check=False)
    # (after the lines that said what was being built)
    p.stderr = "".join(x for x in p.stderr.splitlines(True) if not x.startswith("rtrain: building"))
    one_error(p, "job 3 cannot build its environment (venv with pip): the setup failed (exit code 7) (broken)")
    assert json.loads(cli.run("status", "--json").stdout)[0]["state"] == "failed"


def test_an_array_is_one_slurm_array_job_with_its_throttle(cli, cluster):
    group = cli.submit("--array", "0-3%2", "--gpus", "1", "--",
                       "echo task $RTRAIN_ARRAY_INDEX $SLURM_ARRAY_TASK_ID; sleep 3")
    assert group.startswith("g")
    deadline = time.time() + 90
    while True:
        jobs = json.loads(cli.run("status", "--json", group).stdout)["jobs"]
        if all(j["state"] not in ACTIVE for j in jobs) or time.time() > deadline:
            break
        time.sleep(0.5)
    jobs.sort(key=lambda j: int(j["id"]))
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, jobs
    sids = [j["slurm"]["job_id"] for j in (cli.job(j["id"]) for j in jobs)]
    base = sids[0].split("_")[0]
    assert sids == ["%s_%d" % (base, t) for t in range(4)]  # one Slurm array job, task i = job i
    assert "ArrayTaskThrottle=2" in cluster.run("scontrol", "show", "job", base).stdout
    assert [cli.run("logs", j["id"]).stdout for j in jobs] == ["task %d %d\n" % (t, t) for t in range(4)]
    assert overlap(jobs) == 2  # %2, with 4 GPUs free


def test_an_afterok_chain_with_a_failure(cli, cluster):
    a = cli.submit("--", "sleep 2; exit 1")
    b = cli.submit("--after", a, "--", "echo b")
    c = cli.submit("--after", b, "--", "echo c")
    d = cli.submit("--after-any", a, "--", "echo any")
    sid_a = cli.job(a)["slurm"]["job_id"]
    assert "Dependency=afterok:%s" % sid_a in cluster.run(
        "scontrol", "show", "job", cli.job(b)["slurm"]["job_id"]).stdout
    got = {x: cli.wait(x) for x in (a, b, c, d)}
    assert [(got[x]["state"], got[x]["message"]) for x in (a, b, c, d)] == [
        ("failed", "exit 1"), ("cancelled", "DependencyNeverSatisfied"),
        ("cancelled", "DependencyNeverSatisfied"), ("succeeded", "")]
    assert cli.run("logs", d).stdout == "any\n" and cli.run("logs", b).stdout == ""
    # after a job that failed already: refused at once, in one line
    p = cli.run("submit", "--after", a, "--", "true", check=False)
    one_error(p, "--after %s: job %s failed already" % (a, a))


def test_cancel_a_group_is_one_scancel(cli, login):
    group = cli.submit("--array", "3%1", "--", "echo up; sleep 600")
    first = json.loads(cli.run("status", "--json", group).stdout)["jobs"]
    cli.wait(min(first, key=lambda j: int(j["id"]))["id"], states=("running",))
    out = cli.run("cancel", group).stdout
    assert group in out, out
    jobs = [cli.wait(j["id"]) for j in first]
    assert [j["state"] for j in jobs] == ["cancelled"] * 3
    assert sorted(j["started_at"] is None for j in jobs) == [False, True, True]  # 1 ran, 2 waited
