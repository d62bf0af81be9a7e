"""End to end on the built-in `local` host, through the real `rtrain` CLI and a real daemon."""
import json
import os
import time

from support import path_without


def test_submit_status_logs_and_exit_code(world):
    (world.cwd / "train.py").write_text("import os\nprint('hello', os.environ['RTRAIN_JOB_ID'])\n")
    job = world.submit("python3", "train.py")
    assert job.isdigit(), job
    j = world.wait(job)
    assert j["state"] == "succeeded" and j["exit_code"] == 0 and j["host"] == "local"
    for key in ("id", "host", "name", "state", "gpus", "exit_code", "submitted_at", "started_at", "ended_at"):
        assert key in j
    assert j["name"] == "train.py" and j["gpus"] == []
    assert j["submitted_at"] <= j["started_at"] <= j["ended_at"]
    assert world.run("logs", job).stdout == "hello %s\n" % job
    listed = json.loads(world.run("status", "--json").stdout)
    assert [x["id"] for x in listed] == [job]
    table = world.run("status").stdout
    assert "train.py" in table and "succeeded" in table


def test_follow_exits_with_the_job_exit_code(world):
    p = world.run("submit", "--follow", "--", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert p.returncode == 3
    assert "out\nerr\n" in p.stdout


def test_command_not_found_fails_with_127_and_says_why(world):
    job = world.submit("no-such-command-xyz", "--flag")
    j = world.wait(job)
    assert j["state"] == "failed" and j["exit_code"] == 127
    assert "no-such-command-xyz" in world.run("logs", job).stdout
    assert "not found" in world.run("logs", job).stdout


def test_killed_by_signal_is_recorded(world):
    job = world.submit("sh", "-c", "kill -KILL $$")
    j = world.wait(job)
    assert j["state"] == "failed" and j["exit_code"] == 137 and j["signal"] == "SIGKILL"


def test_job_environment_and_gpu_assignment(world):
    job = world.submit("sh", "-c", "env | grep -E '^(CUDA|PYTHONUNBUFFERED|RTRAIN_JOB_ID|MY_TOKEN)' | sort",
                       gpus=2, extra=("--env", "MY_TOKEN=t0k3n=x"))
    j = world.wait(job)
    assert j["state"] == "succeeded", world.run("logs", job).stdout
    env = dict(line.split("=", 1) for line in world.run("logs", job).stdout.split())
    assert env["CUDA_VISIBLE_DEVICES"].split(",") == j["gpus"]
    assert all(g.startswith("GPU-") for g in j["gpus"]) and len(set(j["gpus"])) == 2
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["PYTHONUNBUFFERED"] == "1" and env["RTRAIN_JOB_ID"] == job
    assert env["MY_TOKEN"] == "t0k3n=x"  # --env reaches the job (from its env.json, not the db)


def test_more_gpus_than_the_host_has_is_refused(world):
    p = world.run("submit", "--gpus", "5", "--", "true", check=False)
    assert p.returncode != 0
    assert "5 GPUs" in p.stderr and "has 4" in p.stderr and "Traceback" not in p.stderr
    assert world.status() == []


def test_no_nvidia_smi_means_zero_gpus(world):
    env = world.env(PATH=path_without({"nvidia-smi"}, world.root))
    p = world.run("submit", "--gpus", "1", "--", "true", check=False, env=env)
    assert p.returncode != 0 and "nvidia-smi was not found" in p.stderr
    p = world.run("submit", "-q", "--gpus", "0", "--", "echo", "cpu", env=env)
    job = p.stdout.strip()
    deadline = time.time() + 20
    while time.time() < deadline:
        j = json.loads(world.run("status", "--json", job, env=env).stdout)
        if j["state"] == "succeeded":
            break
        time.sleep(0.1)
    assert j["state"] == "succeeded"


def test_foreign_process_on_gpu0_is_avoided(world_factory):
    import fakesmi
    w = world_factory()
    state = json.loads(w.state_path.read_text())
    gpu0 = state["gpus"][0]["uuid"]
    fakesmi.write_state(w.state_path, gpus=4, apps=[{"gpu_uuid": gpu0, "pid": 4242,
                                                      "process_name": "python other_user.py",
                                                      "used_memory": 20000}])
    jobs = [w.submit("sleep", "0.3", gpus=1) for _ in range(6)]
    used = set()
    for job in jobs:
        j = w.wait(job)
        assert j["state"] == "succeeded"
        used.update(j["gpus"])
    assert gpu0 not in used and len(used) >= 1


def test_cancel_running_job_ends_its_whole_process_group(world):
    (world.cwd / "spawn.sh").write_text("sleep 300 &\necho $! > child.pid\nsleep 300\n")
    job = world.submit("sh", "spawn.sh")
    deadline = time.time() + 10
    while world.status(job)["state"] != "running" and time.time() < deadline:
        time.sleep(0.05)
    pidfile = world.home / "jobs" / job / "work" / "child.pid"
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    p = world.run("cancel", job)
    assert "cancelled" in p.stdout
    j = world.wait(job)
    assert j["state"] == "cancelled"
    time.sleep(0.2)
    assert not _alive(child), "the job's background child survived cancel"


def test_cancel_sigkills_after_grace_when_sigterm_is_ignored(world):
    job = world.submit("sh", "-c", "trap '' TERM; sleep 300", extra=("--env", "X=1"))
    deadline = time.time() + 10
    while world.status(job)["state"] != "running" and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    world.run("cancel", job)
    j = world.wait(job, timeout=30)
    assert j["state"] == "cancelled"


def test_cancel_queued_job(world):
    blockers = [world.submit("sleep", "30", gpus=4)]
    queued = world.submit("echo", "never", gpus=1)
    assert world.status(queued)["state"] == "queued"
    deadline = time.time() + 20  # the daemon says why it waits
    while not world.status(queued)["message"] and time.time() < deadline:
        time.sleep(0.1)
    assert world.status(queued)["message"] == "waiting for 1 GPU: 0 of 4 free"
    assert "waiting for 1 GPU" in world.run("status", queued).stdout
    world.run("cancel", queued)
    j = world.status(queued)
    assert j["state"] == "cancelled" and j["started_at"] is None
    world.run("cancel", blockers[0])


def test_priority_runs_first(world):
    blocker = world.submit("sleep", "1.5", gpus=4)
    low = world.submit("true", gpus=4)
    high = world.submit("true", gpus=4, extra=("--priority", "5"))
    jl, jh = world.wait(low), world.wait(high)
    assert jh["started_at"] < jl["started_at"]
    world.wait(blocker)


def test_retries_requeue_a_failed_job(world):
    job = world.submit("sh", "-c", "echo try; exit 4", extra=("--retries", "2"))
    j = world.wait(job)
    assert j["state"] == "failed" and j["exit_code"] == 4 and j["attempts"] == 3
    assert world.run("logs", job).stdout.count("try\n") == 3


def test_unknown_job_is_one_clear_line(world):
    p = world.run("logs", "999", check=False)
    assert p.returncode == 1 and "no job 999" in p.stderr and "Traceback" not in p.stderr
    p = world.run("status", "abc", check=False)
    assert p.returncode == 1 and "not a job id" in p.stderr


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_bad_hosts_file_and_unknown_host_are_one_clear_line(world):
    (world.cwd / "hosts.yaml").write_text("hosts:\n  tower:\n    ssh: [broken\n")
    p = world.run("status", check=False)
    assert p.returncode == 1 and "hosts.yaml:" in p.stderr and "YAML syntax error" in p.stderr
    assert "Traceback" not in p.stderr
    (world.cwd / "hosts.yaml").unlink()
    p = world.run("submit", "--host", "nowhere", "--", "true", check=False)
    assert p.returncode == 1 and "no such host 'nowhere'" in p.stderr and "Traceback" not in p.stderr


def test_pull_and_hosts_doctor(world, tmp_path):
    job = world.submit("sh", "-c", "mkdir -p out; printf 'w' > out/weights.bin")
    assert world.wait(job)["state"] == "succeeded"
    world.run("pull", job)
    assert (world.cwd / "rtrain-out" / job / "out" / "weights.bin").read_bytes() == b"w"
    p = world.run("hosts")
    assert "local: ready" in p.stdout and "4 GPU(s)" in p.stdout


CHECKPOINTER = """import os, signal, sys, time
marker = sys.argv[1]
def on_term(signum, frame):
    time.sleep(1)  # a checkpoint being written
    with open(marker + ".tmp", "w") as f:
        f.write("saved")
    os.rename(marker + ".tmp", marker)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(marker + ".ready", "w").close()
time.sleep(300)
"""


def test_cancel_grace_covers_the_whole_process_group(world):
    """The job's first process dies at once on SIGTERM; its child saves a checkpoint first: the
    grace period is the child's too."""
    (world.cwd / "ckpt.py").write_text(CHECKPOINTER)
    marker = world.root / "checkpoint"
    job = world.submit("sh", "-c", "python3 ckpt.py %s & wait" % marker)
    deadline = time.time() + 30
    while not (world.root / "checkpoint.ready").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (world.root / "checkpoint.ready").exists(), world.run("logs", job).stdout
    world.run("cancel", job)
    j = world.wait(job, timeout=60)
    assert j["state"] == "cancelled"
    assert marker.exists() and marker.read_text() == "saved", "the child was killed mid-checkpoint"


def test_a_job_that_fills_the_disk_still_gets_its_exit_code_recorded(world):
    """Job dirs on a 1 MiB tmpfs (the database stays on the big disk, so the daemon can still
    record what the wrapper wrote): the job fills it, then exits 3."""
    import os
    import subprocess
    from support import need
    disk = world.root / "small-disk"
    disk.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(disk)],
                       capture_output=True, text=True)
    need(p.returncode == 0, "cannot mount a tmpfs to fill (%s)" % p.stderr.strip())
    try:
        world.home.mkdir(mode=0o700)
        for name in ("jobs", "tmp"):  # a submit assembles its job in tmp/, then renames it
            (disk / name).mkdir(mode=0o700)
            os.symlink(str(disk / name), str(world.home / name))
        job = world.submit("sh", "-c", "head -c 4000000 /dev/zero > fill; exit 3")
        j = world.wait(job, timeout=60)
        assert j["state"] == "failed" and j["exit_code"] == 3, j
    finally:
        world.cleanup()
        for _ in range(100):
            if subprocess.run(["umount", str(disk)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_an_unsafe_lock_dir_holds_gpu_jobs_and_says_why(world_factory, tmp_path):
    """A lock dir others could delete leases from (world-writable, not sticky) is refused:
    GPU jobs wait and say why, CPU jobs still run, and `rtrain hosts` names the problem."""
    w = world_factory()
    unsafe = tmp_path / "open-locks"
    unsafe.mkdir()
    os.chmod(str(unsafe), 0o777)
    env = w.env(RTRAIN_LOCK_DIR=str(unsafe))
    gpu = w.run("submit", "-q", "--gpus", "1", "--", "true", env=env).stdout.strip()
    cpu = w.run("submit", "-q", "--", "true", env=env).stdout.strip()
    deadline = time.time() + 30
    while time.time() < deadline:
        jobs = {j["id"]: j for j in json.loads(w.run("status", "--json", "--all", env=env).stdout)}
        if jobs[cpu]["state"] == "succeeded" and jobs[gpu]["message"]:
            break
        time.sleep(0.1)
    assert jobs[cpu]["state"] == "succeeded"
    assert jobs[gpu]["state"] == "queued"
    assert "world-writable but not sticky" in jobs[gpu]["message"], jobs[gpu]
    doc = w.run("hosts", env=env, check=False)
    assert doc.returncode == 1 and "FAIL leases" in doc.stdout and "not sticky" in doc.stdout
    os.chmod(str(unsafe), 0o1777)  # fixed: it runs
    assert w.wait(gpu, timeout=30)["state"] == "succeeded"
