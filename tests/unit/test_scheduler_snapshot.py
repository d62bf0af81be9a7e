"""The daemon keeps nvidia-smi off the hand-off path: the compute processes of our own running
jobs (by session id) are ours, so the GPU a job of ours just left is free in the snapshot the
daemon already holds; anyone else's process still makes a GPU busy."""
import subprocess
import sys

import pytest

import fakesmi
from launcher.agent import daemon, fsutil, gpus, inventory, paths, scheduler
from launcher.agent.settings import Settings


@pytest.fixture
def smi(tmp_path, monkeypatch):
    state = fakesmi.install(tmp_path / "bin")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_STATE", str(state))
    settings = Settings(lock_dir=str(tmp_path / "locks"), nvidia_smi=str(tmp_path / "bin" / "nvidia-smi"))
    return state, settings


def units_of(settings, sessions=()):
    """What the daemon sees: processes in one of `sessions` (our jobs' wrappers) are ours."""
    return gpus.read(settings, is_own=lambda pid: fsutil.session_id(pid) in sessions)


def _sleeper(new_session):
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=new_session)


def test_processes_of_our_jobs_sessions_are_ours(smi):
    state, cfg = smi
    job = _sleeper(new_session=True)      # a job: its wrapper made a session (sid == pid)
    other = _sleeper(new_session=False)   # someone else's process, outside our sessions
    try:
        st = fakesmi.write_state(state, gpus=2, apps=[
            {"gpu_uuid": fakesmi.gpu_uuid(0), "pid": job.pid, "process_name": "python train.py",
             "used_memory": 30000, "live": True},
            {"gpu_uuid": fakesmi.gpu_uuid(1), "pid": other.pid, "process_name": "python other.py",
             "used_memory": 30000, "live": True}])
        units = units_of(cfg, sessions={job.pid})
        by = {u["uuid"]: u for u in units}
        assert by[st["gpus"][0]["uuid"]]["state"] == "free"     # ours: the lease guards it
        assert by[st["gpus"][1]["uuid"]]["state"] == "busy"
        assert "foreign" in by[st["gpus"][1]["uuid"]]["reason"]
        # without the session, the same process is foreign, and its memory makes GPU 0 busy
        units = units_of(cfg, sessions=set())
        assert [u["state"] for u in units] == ["busy", "busy"]
    finally:
        for p in (job, other):
            p.kill()
            p.wait()


def test_live_apps_vanish_with_their_process(smi):
    state, cfg = smi
    p = _sleeper(new_session=True)
    fakesmi.write_state(state, gpus=1, apps=[
        {"gpu_uuid": fakesmi.gpu_uuid(0), "pid": p.pid, "used_memory": 30000, "live": True}])
    assert units_of(cfg)[0]["state"] == "busy"
    p.kill()
    p.wait()
    assert units_of(cfg)[0]["state"] == "free"


def test_gpu_count_cache_is_keyed_by_nvidia_smi_and_expires(tmp_path, smi):
    _, cfg = smi
    home = paths.Home(str(tmp_path / "home")).ensure()
    k = cfg.gpu_count_key()
    assert k["resolved"] == cfg.nvidia_smi
    assert inventory.cached_count(home, k) is None
    inventory.save(home, k, 4)
    assert inventory.cached_count(home, k) == 4
    assert inventory.cached_count(home, k, max_age=0) is None
    other = cfg._replace(visible=("0",))
    assert inventory.cached_count(home, other.gpu_count_key()) is None
    gone = cfg._replace(nvidia_smi=str(tmp_path / "nope" / "nvidia-smi"))
    assert gone.gpu_count_key()["resolved"] is None
    inventory.forget(home)
    assert inventory.cached_count(home, k) is None


def test_daemon_asks_nvidia_smi_again_only_when_its_snapshot_cannot_be_trusted(tmp_path, monkeypatch):
    from launcher.agent import leases
    home = paths.Home(str(tmp_path / "home")).ensure()
    lock_dir = str(tmp_path / "locks")
    d = daemon.Daemon(home, ["agent"])
    calls = []
    units = [{"uuid": "GPU-a", "state": "free"}, {"uuid": "GPU-b", "state": "busy"}]
    monkeypatch.setattr(scheduler.gpus, "read", lambda settings, is_own=None: (
        calls.append(settings) or [dict(u) for u in units]))
    clock = [100.0]
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: clock[0])
    cfg = Settings(lock_dir=lock_dir)
    a = leases.try_acquire(lock_dir, "GPU-a")   # our job on A: free in the snapshot
    b = leases.try_acquire(lock_dir, "GPU-b")   # someone else's job on B: busy in it
    d._units(cfg, lock_dir)
    d._units(cfg, lock_dir)
    assert len(calls) == 1
    a.release()                                  # our job ended: its GPU is free, no new query
    d._units(cfg, lock_dir)
    assert len(calls) == 1
    b.release()                                  # theirs ended: B was busy, so ask again
    d._units(cfg, lock_dir)
    assert len(calls) == 2
    clock[0] += scheduler.SNAPSHOT_MAX_AGE_S     # too old: ask again
    d._units(cfg, lock_dir)
    assert len(calls) == 3
    d._units(cfg._replace(visible=("0",)), lock_dir)  # other settings: ask again
    assert len(calls) == 4
