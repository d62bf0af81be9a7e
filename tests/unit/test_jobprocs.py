"""Finding a job's processes again (agent/jobprocs.py): by its marker, its group and session,
never a stranger that was given a pid number the job once had."""
import os
import subprocess
import sys
import time

from launcher.agent import fsutil, jobprocs


def _spawn(env=None, session=True):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         env=dict(os.environ, **(env or {})), start_new_session=session)
    deadline = time.time() + 10
    while fsutil.proc_start_time(p.pid) is None and time.time() < deadline:
        time.sleep(0.01)
    return p


def test_the_marker_finds_a_process_that_left_group_and_session():
    tag = jobprocs.tag("/home/x/.rtrain", 7)
    job = _spawn({jobprocs.TAG_VAR: tag})
    other = _spawn({jobprocs.TAG_VAR: jobprocs.tag("/home/x/.rtrain", 8)})
    try:
        assert job.pid in jobprocs.find(tag, {})
        assert other.pid not in jobprocs.find(tag, {})
        # a process that started before the job's first one is none of its children
        later = int(fsutil.proc_start_time(job.pid)) + 1000
        assert job.pid not in jobprocs.find(tag, {"pgid_start": str(later)})
        assert "python" in jobprocs.describe({job.pid})
        assert jobprocs.end_all(tag, {}) and job.wait(5) is not None
    finally:
        for p in (job, other):
            p.kill()
            p.wait()


def test_a_group_or_session_id_given_to_a_new_process_is_not_the_jobs():
    """The job's leader is long gone and its pid number went to a stranger (here: a process
    whose start time is not the one recorded): its group and session are not the job's."""
    stranger = _spawn()
    try:
        wrong = {"pgid": stranger.pid, "pgid_start": "1", "sid": stranger.pid, "sid_start": "1"}
        assert stranger.pid not in jobprocs.find("nobody-1", wrong)
        start = fsutil.proc_start_time(stranger.pid)
        right = {"pgid": stranger.pid, "pgid_start": start}
        assert stranger.pid in jobprocs.find("nobody-1", right)
    finally:
        stranger.kill()
        stranger.wait()


def test_no_cgroup_is_made_at_the_root_of_the_hierarchy_or_where_it_is_not_ours(monkeypatch, tmp_path):
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/proc/self/cgroup":
            return real_open(str(tmp_path / "cgroup"), *a, **kw)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    (tmp_path / "cgroup").write_text("0::/\n")
    assert jobprocs.delegated_root() is None
    (tmp_path / "cgroup").write_text("0::/definitely/not/there\n")
    assert jobprocs.delegated_root() is None
