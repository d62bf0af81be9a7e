"""The scheduler daemon survives its own death at any step and one bad job (scheduler.py)."""
import json
import os
import subprocess
import sys
import time

from launcher.agent import db, fsutil, paths, scheduler


def _home(tmp_path):
    return paths.Home(str(tmp_path / "home")).ensure()


def _job(con, home, state="queued", started_ago=None, gpus=0):
    job_id = db.insert_job(con, {"name": "t", "command": "true", "gpus": gpus, "priority": 0,
                                 "retries": 0})
    os.makedirs(home.work(job_id))
    if state == "running":
        con.execute("UPDATE jobs SET state='running', attempts=1, started_at=?, boot_id=? WHERE id=?",
                    (time.time() - started_ago, fsutil.boot_id(), job_id))
    return job_id


def test_a_running_job_whose_wrapper_pid_was_never_recorded_is_adopted(tmp_path):
    """The daemon died between marking the job running and writing its wrapper's pid: the
    wrapper's pid.json tells the next daemon who runs it, and the job goes on."""
    home = _home(tmp_path)
    con = db.connect(home.db)
    job_id = _job(con, home, "running", started_ago=60)
    wrapper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fsutil.write_json_atomic(home.pid_file(job_id), {
            "wrapper_pid": wrapper.pid, "wrapper_start": fsutil.proc_start_time(wrapper.pid),
            "pgid": wrapper.pid, "pgid_start": fsutil.proc_start_time(wrapper.pid),
            "boot_id": fsutil.boot_id()})
        scheduler.reconcile(con, home)
        row = db.get(con, job_id)
        assert row["state"] == "running" and row["wrapper_pid"] == wrapper.pid
        assert wrapper.poll() is None  # not killed as "lost"
    finally:
        wrapper.kill()
        wrapper.wait()


def test_a_job_whose_wrapper_never_started_is_queued_again(tmp_path):
    home = _home(tmp_path)
    con = db.connect(home.db)
    young = _job(con, home, "running", started_ago=1)
    old = _job(con, home, "running", started_ago=scheduler.NEVER_STARTED_AFTER_S + 5)
    scheduler.reconcile(con, home)
    assert db.get(con, young)["state"] == "running"  # its wrapper may be starting right now
    row = db.get(con, old)
    assert row["state"] == "queued" and row["attempts"] == 0 and row["started_at"] is None


def test_one_job_that_cannot_be_started_does_not_stop_the_queue(tmp_path, monkeypatch):
    home = _home(tmp_path)
    con = db.connect(home.db)
    bad = _job(con, home)
    good = _job(con, home)
    d = scheduler.Daemon(home, ["agent"])
    started = []
    d.start = lambda row, uuids, fds: started.append(row["id"]) or con.execute(
        "UPDATE jobs SET state='running' WHERE id=?", (row["id"],))
    real = d._prepared

    def prepared(row):
        if row["id"] == bad:
            raise OSError(5, "Input/output error")
        return real(row)

    monkeypatch.setattr(d, "_prepared", prepared)
    d.schedule()
    assert started == [good]
    assert db.get(con, bad)["state"] == "queued"
    assert "could not start it yet (OSError" in db.get(con, bad)["message"]
    d.schedule()
    d.schedule()
    row = db.get(con, bad)
    assert row["state"] == "failed" and row["message"].startswith("rtrain could not start it: OSError")
    with open(home.log(bad)) as f:
        assert "rtrain: could not start the job: OSError" in f.read()


def test_sigterm_ends_the_daemon_between_passes(tmp_path):
    home = _home(tmp_path)
    env = dict(os.environ, RTRAIN_HOME=home.root, RTRAIN_DAEMON_IDLE_S="60")
    p = subprocess.Popen([sys.executable, "-m", "launcher.agent", "daemon"], stdin=subprocess.PIPE,
                         env=env, cwd=str(tmp_path))
    p.stdin.write(json.dumps({"protocol": 1, "home": home.root}).encode() + b"\n")
    p.stdin.close()
    deadline = time.time() + 30
    while not scheduler.running(home) and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.running(home)
    p.terminate()
    assert p.wait(timeout=30) == 0
    assert not scheduler.running(home)
