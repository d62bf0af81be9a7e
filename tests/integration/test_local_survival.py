"""Jobs outlive the daemon; a 'reboot' loses running jobs and keeps queued ones; two users
never share a GPU; every job runs on its own snapshot."""
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor


from test_local_jobs import _alive


def _wait_state(world, job, state, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if world.status(job)["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError("job %s never reached %s" % (job, state))


def test_kill_9_of_the_daemon_leaves_jobs_running(world):
    (world.cwd / "job.sh").write_text("sleep 1.5\necho finished\nexit 7\n")
    jobs = [world.submit("sh", "job.sh") for _ in range(2)]
    for j in jobs:
        _wait_state(world, j, "running")
    pid = world.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    assert not _alive(pid)
    for j in jobs:
        done = world.wait(j)
        assert done["state"] == "failed" and done["exit_code"] == 7
        assert world.run("logs", j).stdout == "finished\n"


def test_reboot_loses_running_jobs_and_keeps_queued_ones(world):
    running = world.submit("sleep", "300", gpus=4)
    _wait_state(world, running, "running")
    queued = world.submit("echo", "after-reboot", gpus=2)
    retried = None
    assert world.status(queued)["state"] == "queued"
    # a reboot: every process of the user's rtrain world dies at once
    world.cleanup()
    time.sleep(0.2)
    # the next command starts a daemon, which reconciles
    j = world.wait(running)
    assert j["state"] == "lost"
    q = world.wait(queued)
    assert q["state"] == "succeeded" and world.run("logs", queued).stdout == "after-reboot\n"
    assert retried is None


def test_lost_job_with_retries_is_requeued(world):
    job = world.submit("sh", "-c", "if [ -e ../../marker ]; then echo second; else touch ../../marker; sleep 300; fi",
                       extra=("--retries", "1"))
    _wait_state(world, job, "running")
    world.cleanup()
    j = world.wait(job)
    assert j["state"] == "succeeded" and j["attempts"] == 2
    assert "second" in world.run("logs", job).stdout


def test_two_users_never_share_a_gpu(world_factory, tmp_path):
    """Two RTRAIN_HOMEs (two users) submit 20 one-GPU jobs each at once to 4 GPUs."""
    alice, bob = world_factory("alice"), world_factory("bob")
    record = tmp_path / "record"
    record.mkdir()
    script = ("import os, time, sys\n"
              "t0 = time.time(); time.sleep(0.15); t1 = time.time()\n"
              "open(sys.argv[1] + '/' + os.environ['RTRAIN_JOB_ID'] + '-' + sys.argv[2], 'w').write("
              "'%s %r %r' % (os.environ['CUDA_VISIBLE_DEVICES'], t0, t1))\n")
    for w in (alice, bob):
        (w.cwd / "rec.py").write_text(script)

    def go(args):
        w, i = args
        return w, w.submit("python3", "rec.py", str(record), w.name, gpus=1)

    with ThreadPoolExecutor(8) as ex:
        submitted = list(ex.map(go, [(w, i) for i in range(20) for w in (alice, bob)]))
    for w, job in submitted:
        assert w.wait(job, timeout=90)["state"] == "succeeded"
    spans = {}
    for f in record.iterdir():
        gpu, t0, t1 = f.read_text().split()
        assert "," not in gpu and gpu.startswith("GPU-")
        spans.setdefault(gpu, []).append((float(t0), float(t1), f.name))
    assert sum(len(v) for v in spans.values()) == 40
    assert 2 <= len(spans) <= 4  # short jobs may leave a GPU unused; never more than the host has
    for gpu, s in spans.items():
        s.sort()
        for (_, a1, an), (b0, _, bn) in zip(s, s[1:]):
            assert a1 <= b0, "GPU %s held by %s and %s at once" % (gpu, an, bn)


def test_editing_the_tree_after_submit_does_not_change_the_job(world):
    (world.cwd / "data.txt").write_text("v1\n")
    job = world.submit("sh", "-c", "sleep 1; cat data.txt", gpus=0)
    (world.cwd / "data.txt").write_text("v2 edited after submit\n")
    j = world.wait(job)
    assert j["state"] == "succeeded"
    assert world.run("logs", job).stdout == "v1\n"


def test_a_job_rewriting_its_files_cannot_touch_another_job_or_the_store(world):
    (world.cwd / "model.py").write_text("weights = 1\n")
    writer = world.submit("sh", "-c", "chmod u+w model.py; echo 'weights = 666' > model.py; "
                                      "python3 -c \"open('model.py','r+').write('HACK')\"")
    assert world.wait(writer)["state"] == "succeeded"
    reader = world.submit("cat", "model.py")
    assert world.wait(reader)["state"] == "succeeded"
    assert world.run("logs", reader).stdout == "weights = 1\n"
    import hashlib
    from launcher.agent.store import Store
    from support import blob_bytes, store_blobs
    st = Store(str(world.home / "store"))  # blobs are loose files or in packs
    blobs = store_blobs(world.home / "store")
    assert blobs
    for h in blobs:
        assert hashlib.sha256(blob_bytes(st, h)).hexdigest() == h


def test_gpus_verb_shows_holder(world):
    job = world.submit("sleep", "30", gpus=1)
    _wait_state(world, job, "running")
    rows = json.loads(world.run("gpus", "--json").stdout)
    assert len(rows) == 4
    held = [r for r in rows if r.get("job") is not None]
    assert len(held) == 1 and held[0]["state"] == "busy" and held[0]["job"] == int(job)
    assert sum(1 for r in rows if r["state"] == "free") == 3
    world.run("cancel", job)
