"""The monitor on a real host (the `local` host; a real sshd for the terminal warning): autostop
fires after its idle window, and never while a job is queued or running, a GPU is busy or a
process outside rtrain holds one; stalled jobs are marked, told and cancelled; webhooks reach a
real HTTP server on 127.0.0.1, retried after a 500, and a dead one never holds the queue up."""
import json
import os
import subprocess
import time

import pytest

import fakesmi
from support import ALICE
from webhook import Webhook

FAST = {"RTRAIN_MONITOR_INTERVAL_S": "0.2"}


def hosts(world, **local):
    lines = ["hosts:", "  local:"]
    for k, v in local.items():
        lines.append("    %s: %s" % (k, json.dumps(v)))
    (world.cwd / "hosts.yaml").write_text("\n".join(lines) + "\n")


def run(world, *args, **kw):
    return world.run(*args, env=world.env(**FAST), **kw)


def wait_until(what, cond, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("no %s after %ss" % (what, timeout))


def autostop_says(world):
    return run(world, "autostop", "local").stdout


@pytest.fixture
def hook():
    h = Webhook()
    yield h
    h.close()


def test_autostop_waits_for_jobs_busy_gpus_and_foreign_processes_then_fires(world):
    marker = world.root / "stopped"
    hosts(world, autostop={"idle": "2s", "warn": "1s", "sessions": False, "command": "date +%%s.%%N >> %s" % marker})
    job = run(world, "submit", "-q", "--", "sleep", "4").stdout.strip()
    wait_until("the running job in autostop's view", lambda: "job %s running" % job in autostop_says(world))
    j = world.wait(job)
    first = float(wait_until("the stop command", lambda: marker.exists() and (marker.read_text().split() or [""])[0]))
    assert first >= j["ended_at"] + 2  # a whole idle window after the job ended
    marker.unlink()
    # a busy GPU, then a process outside rtrain on an idle one: never while they last
    for phase in ({"gpu2": {"utilization.gpu": 60}},
                  {"apps": [{"gpu_uuid": fakesmi.gpu_uuid(1), "pid": os.getpid(), "process_name": "jupyter",
                             "used_memory": 900}]}):
        fakesmi.write_state(world.state_path, gpus=4, **phase)
        want = "GPU 2 at 60%" if "gpu2" in phase else "GPU 1 used by pid %d" % os.getpid()
        wait_until("autostop to see it", lambda want=want: want in autostop_says(world))
        time.sleep(3)
        assert not marker.exists()
    fakesmi.write_state(world.state_path, gpus=4)
    wait_until("the stop command after the GPUs went idle", marker.exists)
    log = (world.home / "monitor.log").read_text()
    assert "autostop: idle for 2s, running: date" in log and "ended with 0" in log


def test_autostop_never_fires_while_a_job_waits_for_gpus(world):
    from launcher.agent import leases
    marker = world.root / "stopped"
    hosts(world, autostop={"idle": "1s", "sessions": False, "command": "touch %s" % marker})
    held = [leases.try_acquire(str(world.lock_dir), fakesmi.gpu_uuid(i)) for i in range(4)]
    try:
        job = run(world, "submit", "-q", "--gpus", "1", "--", "true").stdout.strip()
        out = wait_until("the queued job in autostop's view", lambda: (
            lambda o: o if "job %s queued" % job in o else None)(autostop_says(world)))
        assert "4 GPU lease(s) held" in out
        time.sleep(3)
        assert not marker.exists() and world.status(job)["state"] == "queued"
    finally:
        for lease in held:
            lease.release()
    world.wait(job)
    wait_until("the stop command", marker.exists)


def test_autostop_can_be_changed_and_cancelled_from_the_laptop(world):
    marker = world.root / "stopped"
    hosts(world, autostop={"idle": "1h", "sessions": False, "command": "touch %s" % marker})
    assert "after 60 min idle" in autostop_says(world)
    out = run(world, "autostop", "local", "--idle", "1s").stdout
    assert "after 1 s idle" in out
    wait_until("the stop command", marker.exists)
    marker.unlink()
    assert "off" in run(world, "autostop", "local", "--cancel").stdout
    run(world, "hosts")  # hosts.yaml unchanged: the cancel from the laptop stands
    time.sleep(2)
    assert not marker.exists()
    p = run(world, "autostop", "local", "--idle", "soon", check=False)
    assert p.returncode == 1 and "--idle must be a duration" in p.stderr


def test_a_stalled_job_is_marked_told_and_cancelled(world, hook):
    hosts(world, stall_after="1s", on_stall="cancel", notify={"url": hook.url, "on": ["stalled", "cancelled"]})
    job = run(world, "submit", "-q", "--gpus", "1", "--", "sleep", "60").stdout.strip()
    ev = hook.wait_for(1)[0]
    assert ev["state"] == "stalled" and ev["message"].startswith("GPU idle") and ev["job"] == int(job)
    j = world.wait(job)
    assert j["state"] == "cancelled"
    assert [e["state"] for e in hook.wait_for(2)] == ["stalled", "cancelled"]


def test_a_busy_gpu_is_not_stalled(world):
    hosts(world, stall_after="1s")
    fakesmi.write_state(world.state_path, gpus=1, gpu0={"utilization.gpu": 90})
    job = run(world, "submit", "-q", "--gpus", "1", "--", "sleep", "3").stdout.strip()
    time.sleep(2.5)
    assert not world.status(job)["message"]
    fakesmi.write_state(world.state_path, gpus=1)
    world.wait(job)


def test_webhooks_reach_a_real_server_after_a_500(world):
    h = Webhook(statuses=[500])
    try:
        hosts(world, notify={"url": h.url, "format": "json"})
        (world.cwd / "t.py").write_text("print('epoch 1')\nraise SystemExit(3)\n")
        job = run(world, "submit", "-q", "--", "python3", "t.py").stdout.strip()
        (ev,) = h.wait_for(1)
        assert [p["status"] for p in h.posts] == [500, 200]
        assert ev["job"] == int(job) and ev["state"] == "failed" and ev["exit_code"] == 3
        assert ev["log_tail"] == "epoch 1" and ev["host"] == "local" and ev["name"] == "t.py"
        assert "failed (HTTP 500)" in (world.home / "notify.log").read_text()
    finally:
        h.close()


def test_an_unreachable_webhook_does_not_hold_the_queue_up(world):
    from support import closed_port
    hosts(world, notify={"url": "http://127.0.0.1:%d/hook" % closed_port()})
    jobs = [run(world, "submit", "-q", "--", "sh", "-c", "exit 1").stdout.strip() for _ in range(3)]
    for j in jobs:
        assert world.wait(j, timeout=30)["state"] == "failed"
    log = wait_until("the sender's note", lambda: (world.home / "notify.log").exists() and
                     (world.home / "notify.log").read_text())
    assert log.count("failed (") == 1  # said once, not once per event
    assert len(os.listdir(world.home / "notify")) == 3  # still queued, being retried


def test_the_warning_reaches_a_logged_in_terminal(sshd, tmp_path):
    """Autostop on a tower over ssh: a terminal session of the user (ssh -tt) gets the warning."""
    src = tmp_path / "src"
    src.mkdir()
    marker = "/tmp/rtrain-autostop-%s" % tmp_path.name
    hosts_file = sshd.hosts_yaml(src / "hosts.yaml", {"tower": (ALICE, sshd.port, {
        "autostop": json.dumps({"idle": "4s", "warn": "3s", "sessions": False, "command": "touch %s" % marker})})})
    term = subprocess.Popen(["ssh", "-tt", "-F", "/dev/null", "-i", str(sshd.user_key), "-p", str(sshd.port),
                             "-o", "UserKnownHostsFile=%s" % sshd.known_hosts, "-o", "BatchMode=yes",
                             "%s@127.0.0.1" % ALICE, "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        env = sshd.env(**FAST)
        p = subprocess.run([os.sys.executable, "-m", "launcher", "--hosts", str(hosts_file), "hosts"],
                           cwd=str(src), env=env, capture_output=True, text=True, timeout=60)
        assert "autostop" in p.stdout, p.stdout + p.stderr
        import select
        got = b""
        deadline = time.time() + 30
        while b"rtrain autostop" not in got and time.time() < deadline:
            r, _, _ = select.select([term.stdout], [], [], 0.5)
            if r:
                got += os.read(term.stdout.fileno(), 4096)
        assert b"rtrain autostop: this host has been idle" in got, got
        wait_until("the stop command", lambda: os.path.exists(marker))
    finally:
        term.kill()
        term.wait()
        if os.path.exists(marker):
            os.unlink(marker)
