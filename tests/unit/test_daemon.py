"""The scheduler daemon survives its own death at any step and one bad job (daemon.py,
scheduler.py, jobstate.py)."""
import json
import os
import subprocess
import sys
import time

from launcher.agent import daemon, db, fsutil, jobstate, paths


def _home(tmp_path):
    return paths.Home(str(tmp_path / "home")).ensure()


def _job(con, home, state="queued", started_ago=None, gpus=0):
    job_id = db.insert_job(con, {"name": "t", "command": "true", "gpus": gpus, "priority": 0,
                                 "retries": 0})
    os.makedirs(home.job(job_id).work)
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
        fsutil.write_json_atomic(home.job(job_id).pids, {
            "wrapper_pid": wrapper.pid, "wrapper_start": fsutil.proc_start_time(wrapper.pid),
            "pgid": wrapper.pid, "pgid_start": fsutil.proc_start_time(wrapper.pid),
            "boot_id": fsutil.boot_id()})
        jobstate.reconcile(con, home)
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
    old = _job(con, home, "running", started_ago=jobstate.NEVER_STARTED_AFTER_S + 5)
    jobstate.reconcile(con, home)
    assert db.get(con, young)["state"] == "running"  # its wrapper may be starting right now
    row = db.get(con, old)
    assert row["state"] == "queued" and row["attempts"] == 0 and row["started_at"] is None


def test_one_job_that_cannot_be_started_does_not_stop_the_queue(tmp_path, monkeypatch):
    home = _home(tmp_path)
    con = db.connect(home.db)
    bad = _job(con, home)
    good = _job(con, home)
    d = daemon.Daemon(home, ["agent"])
    started = []
    d.start = lambda row, uuids, fds, lock_dir=None: started.append(row["id"]) or con.execute(
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
    with open(home.job(bad).log) as f:
        assert "rtrain: could not start the job: OSError" in f.read()


def test_sigterm_ends_the_daemon_between_passes(tmp_path):
    home = _home(tmp_path)
    env = dict(os.environ, RTRAIN_HOME=home.root, RTRAIN_DAEMON_IDLE_S="60")
    p = subprocess.Popen([sys.executable, "-m", "launcher.agent", "daemon"], stdin=subprocess.PIPE,
                         env=env, cwd=str(tmp_path))
    p.stdin.write(json.dumps({"protocol": 1, "home": home.root}).encode() + b"\n")
    p.stdin.close()
    deadline = time.time() + 30
    while not daemon.running(home) and time.time() < deadline:
        time.sleep(0.05)
    assert daemon.running(home)
    p.terminate()
    assert p.wait(timeout=30) == 0
    assert not daemon.running(home)


def test_a_daemon_of_another_agent_build_makes_way(tmp_path, monkeypatch):
    """After an rtrain upgrade the running daemon is the old agent's: a poke from the new one asks
    it to finish its pass and go, and starts its own (docs/design.md "Settings per job")."""
    from launcher import agentpkg
    home = _home(tmp_path)
    blob, _ = agentpkg.build()
    builds = []
    for name in ("agent-old.pyz", "agent-new.pyz"):
        p = tmp_path / name
        p.write_bytes(blob)
        builds.append([sys.executable, str(p)])
    monkeypatch.setenv("RTRAIN_DAEMON_IDLE_S", "60")

    def wait_for(argv):
        deadline = time.time() + 30
        while time.time() < deadline:
            info = daemon.daemon_info(home) or {}
            if daemon.running(home) and info.get("argv") == argv:
                return info["pid"]
            time.sleep(0.05)
        raise AssertionError("no daemon of %s (last: %r)" % (argv, daemon.daemon_info(home)))

    try:
        daemon.poke(home, builds[0])
        old = wait_for(builds[0])
        assert daemon.poke(home, builds[0]) is True  # the same build: woken, not replaced
        assert daemon.poke(home, builds[1]) is False
        new = wait_for(builds[1])
        assert new != old
        deadline = time.time() + 10
        while fsutil.alive(old) and time.time() < deadline:
            time.sleep(0.05)
        assert not fsutil.alive(old)
    finally:
        pid = daemon.daemon_pid(home)
        if pid:
            os.kill(pid, 15)
