"""docker/'s try-it tower, built from the local base image, two of them on loopback ports, and
the real rtrain CLI driving them over SSH: submit, queue on the simulated GPUs, logs -f,
cancel, pull."""
import json
import subprocess
import sys
import time

import pytest

from support import REPO



@pytest.fixture
def rt(towers, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    hosts = towers.hosts_yaml(tmp_path / "hosts.yaml", default="tower1")
    env = towers.env(tmp_path / "local-home")

    def run(*args, check=True, timeout=90):
        p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(hosts)] + [str(a) for a in args],
                           cwd=str(src), env=env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
        return p

    run.src = src
    return run


def _status(rt, job):
    return json.loads(rt("status", "--json", job).stdout)


def _until(rt, jobs, pred, timeout=30):
    """{job: its status} once pred(that) holds (one `status` call per look, every host)."""
    deadline = time.time() + timeout
    while True:
        listed = {j["id"]: j for j in json.loads(rt("status", "--json", "--all").stdout)}
        got = {j: listed.get(j) or _status(rt, j) for j in jobs}
        if pred(got) or time.time() > deadline:
            return got
        time.sleep(0.2)


def test_the_image_has_what_a_tower_needs(towers):
    c = towers.containers["tower1"]
    rc, out = c.exec_run(["sh", "-c", "python3 -V && rsync --version | head -1 && nvidia-smi -L"], user="dev")
    assert rc == 0, out
    text = out.decode()
    assert "Python 3." in text and "rsync" in text
    gpus = json.loads((REPO / "docker" / "gpus.json").read_text())["gpus"]
    for g in gpus:
        assert g["uuid"] in text  # the simulated nvidia-smi reads docker/gpus.json
    rc, out = c.exec_run(["sh", "-c", "ls -l /etc/ssh/authkeys/dev; id -u"], user="root")
    assert rc == 0 and out.decode().split()[-1] == "0"


def test_submit_queue_cancel_logs_pull_on_two_towers(towers, rt):
    src = rt.src
    (src / "train.py").write_text(
        "import os, sys, time\n"
        "print('job', os.environ['RTRAIN_JOB_ID'], 'on', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
        "deadline = time.time() + 60\n"
        "while not os.path.exists('/tmp/release') and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/result.txt', 'w').write('done %s\\n' % os.environ['RTRAIN_JOB_ID'])\n"
        "print('finished', flush=True)\n"
        "sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)\n")
    tower1 = towers.containers["tower1"]
    tower1.exec_run(["rm", "-f", "/tmp/release"])

    gp = json.loads(rt("gpus", "--json").stdout)
    assert sorted((g["host"], g["state"]) for g in gp) == [
        ("tower1", "free")] * 4 + [("tower2", "busy"), ("tower2", "free")]

    # six one-GPU jobs on four GPUs: four run, two wait
    jobs = [rt("submit", "-q", "--gpus", "1", "--", "python3", "train.py").stdout.strip() for _ in range(5)]
    jobs.append(rt("submit", "-q", "--gpus", "1", "--", "python3", "train.py", "3").stdout.strip())
    assert all(j.isdigit() for j in jobs), jobs
    got = _until(rt, jobs, lambda s: sum(j["state"] == "running" for j in s.values()) == 4 and
                 sum(j["state"] == "queued" for j in s.values()) == 2)
    states = [got[j]["state"] for j in jobs]
    assert states.count("running") == 4 and states.count("queued") == 2, got
    running = [j for j in jobs if got[j]["state"] == "running"]
    held = [g for j in running for g in got[j]["gpus"]]
    assert len(held) == 4 and len(set(held)) == 4
    waiting = [j for j in jobs if got[j]["state"] == "queued"]
    assert any("GPU" in got[j]["message"] for j in waiting), [got[j]["message"] for j in waiting]

    # cancel a running job: its GPU goes to the first one waiting
    victim = running[0]
    rt("cancel", victim)
    got = _until(rt, jobs, lambda s: s[victim]["state"] == "cancelled" and
                 sum(j["state"] == "running" for j in s.values()) == 4)
    assert got[victim]["state"] == "cancelled"
    assert sum(j["state"] == "running" for j in got.values()) == 4, got

    # logs -f on the last job, still queued: waits, streams, exits with the job's exit code
    follower = subprocess.Popen(
        [sys.executable, "-m", "launcher", "--hosts", str(src.parent / "hosts.yaml"), "logs", jobs[-1], "-f"],
        cwd=str(src), env=towers.env(src.parent / "local-home"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    assert _status(rt, jobs[-1])["state"] == "queued"
    time.sleep(1)
    tower1.exec_run(["touch", "/tmp/release"])
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 3, (out, err)
    assert out.startswith("job %s on GPU-" % jobs[-1]) and out.endswith("finished\n"), out

    got = _until(rt, jobs, lambda s: all(j["state"] not in ("queued", "running") for j in s.values()))
    assert [got[j]["state"] for j in jobs] == (
        ["cancelled" if j == victim else "succeeded" for j in jobs[:-1]] + ["failed"]), got

    # pull what a job wrote
    done = next(j for j in jobs if j != victim)
    rt("pull", done)
    assert (src / "rtrain-out" / done / "outputs" / "result.txt").read_text() == "done %s\n" % done

    # the second tower: its busy GPU is left alone
    towers.containers["tower2"].exec_run(["touch", "/tmp/release"])
    j2 = rt("submit", "-q", "--host", "tower2", "--gpus", "1", "--", "python3", "train.py").stdout.strip()
    assert j2.startswith("tower2:"), j2
    s2 = _until(rt, [j2], lambda s: s[j2]["state"] == "succeeded")[j2]
    gpus2 = json.loads((REPO / "docker" / "gpus-2.json").read_text())["gpus"]
    assert s2["state"] == "succeeded" and s2["gpus"] == [gpus2[0]["uuid"]], s2
    assert "tower1: ready" in rt("hosts").stdout
