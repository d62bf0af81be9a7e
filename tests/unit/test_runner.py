"""The job wrapper (runner.py), run for real in a forked child as the daemon runs it: its exit
record must survive a full disk, and a job cancelled before it started has no exit code."""
import json
import os
import subprocess
import time

import pytest

from support import fill_disk, need
from launcher.agent import db, fsutil, jobstate, paths, runner


def _home(root):
    return paths.Home(str(root)).ensure()


def _job(home, command, job_id=1):
    os.makedirs(home.job(job_id).work)
    return {"id": job_id, "command": command, "env": {}, "grace": 2, "gpus": [], "lock_dir": None}


def _run_wrapper(home, job):
    """Fork and run the wrapper as the daemon does; (wrapper's exit status, when it ended)."""
    pid = os.fork()
    if pid == 0:
        try:
            runner.run_wrapper(home, job, [], lambda: None)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted at the end."""
    d = tmp_path / "disk"
    d.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    need(p.returncode == 0, "cannot mount a tmpfs to fill (%s)" % p.stderr.strip())
    yield d
    for _ in range(100):
        if subprocess.run(["umount", str(d)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(d, leave=0):
    """Fill the file system holding d, leaving exactly `leave` bytes free."""
    fill_disk(d, leave)
    st = os.statvfs(str(d))
    assert st.f_bavail * st.f_frsize == leave


def test_exit_is_recorded_when_the_disk_is_full_before_pid_json(small_disk):
    """Room for one page only: the wrapper's reserved exit record takes it, so pid.json can't be
    written. The wrapper must go on (the job runs), and record the exit code in its reserve."""
    home = _home(small_disk / "home")
    job = _job(home, "exit 3")
    _fill(small_disk, leave=4096)  # one page: runner.EXIT_ROOM
    _run_wrapper(home, job)
    ex = fsutil.read_json(home.job(1).exit)
    assert ex is not None, "exit code lost: %s" % os.listdir(home.job(1).dir)
    assert ex["exit_code"] == 3 and ex["cancelled"] is False
    assert not os.path.exists(os.path.join(home.job(1).dir, "exit.pending"))


def test_the_wrapper_outlives_its_job_even_when_pid_json_cannot_be_written(small_disk, tmp_path):
    """A full disk from the start: pid.json fails, yet the wrapper waits for its job (which holds
    the GPU leases through it) instead of leaving at once."""
    home = _home(small_disk / "home")
    done = tmp_path / "job-done"  # on another file system: the job can write it
    job = _job(home, "sleep 0.5; : > %s; exit 3" % done)
    _fill(small_disk)
    _run_wrapper(home, job)
    assert done.exists(), "the wrapper ended before its job did"


def test_a_job_cancelled_before_it_started_has_no_exit_code(tmp_path):
    home = _home(tmp_path / "home")
    con = db.connect(home.db)
    job_id = db.insert_job(con, {"name": "t", "command": "true", "gpus": 0, "priority": 0,
                                 "retries": 2})
    job = _job(home, "echo should-not-run", job_id)
    con.execute("UPDATE jobs SET state='running', attempts=1, started_at=?, boot_id=? WHERE id=?",
                (time.time(), fsutil.boot_id(), job_id))
    open(home.job(job_id).cancel, "w").close()
    _run_wrapper(home, job)
    ex = fsutil.read_json(home.job(job_id).exit)
    assert ex["exit_code"] is None and ex["signal"] is None and ex["cancelled"] is True
    with open(home.job(job_id).log) as f:
        log = f.read()
    assert log == "rtrain: cancelled before it started\n"
    jobstate.finalize_exited(con, home)
    row = db.get(con, job_id)
    assert row["state"] == "cancelled" and row["exit_code"] is None and row["attempts"] == 1


def test_exit_record_is_plain_json_with_trailing_spaces(tmp_path):
    home = _home(tmp_path / "home")
    job = _job(home, "exit 5")
    _run_wrapper(home, job)
    with open(home.job(1).exit, "rb") as f:
        raw = f.read()
    assert json.loads(raw.decode())["exit_code"] == 5  # what readers do (fsutil.read_json)
