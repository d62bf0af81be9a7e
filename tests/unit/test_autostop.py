"""agent/autostop.py: the settings, what keeps a host up, the decision over time, and the
warning written to a real terminal."""
import os

import pytest

from launcher.agent import autostop

CFG = autostop.check({"idle": "10m", "command": "sudo poweroff", "warn": "2m"})


def test_settings_and_durations():
    assert CFG["idle"] == 600 and CFG["warn"] == 120 and CFG["gpu_util_busy"] == 5 and CFG["sessions"] is True
    assert [autostop.seconds(x) for x in (5, "45s", "30m", "2h", "1d", "1.5h")] == [5, 45, 1800, 7200, 86400, 5400]
    assert autostop.check(None) is None
    for bad in ({"idle": "soon", "command": "x"}, {"idle": 60}, {"idle": 60, "command": " "},
                {"idle": 60, "command": "x", "gpu_util_busy": 101}, {"idle": 60, "command": "x", "when": 1},
                {"idle": 60, "command": "x", "sessions": "yes"}, ["idle"]):
        with pytest.raises(autostop.AutostopError):
            autostop.check(bad)
    assert autostop.check({"idle": 60, "command": "x", "warn": 600})["warn"] == 60  # never before idle


def test_what_keeps_the_host_up():
    gpu = {"index": "0", "utilization": 0, "processes": []}
    assert autostop.busy_reasons(CFG, [], [gpu], None, {}, 0, []) == []
    jobs = [{"id": 3, "state": "running"}, {"id": 4, "state": "queued"}]
    why = autostop.busy_reasons(CFG, jobs, [dict(gpu, utilization=87), dict(gpu, index="1", processes=[
        {"pid": 9, "name": "jupyter"}])], "driver gone", {"rtrain-gpu-x": 1}, 2, [("/dev/pts/3", 0, 5.0)])
    assert why[:2] == ["job 3 running", "job 4 queued"]
    text = "; ".join(why)
    for words in ("1 GPU lease(s) held", "2 rtrain daemon(s) waiting", "cannot read the GPUs",
                  "GPU 0 at 87%", "GPU 1 used by pid 9 jupyter", "terminal session(s) in use (/dev/pts/3"):
        assert words in text
    assert autostop.busy_reasons(dict(CFG, sessions=False), [], [gpu], None, {}, 0, [("/dev/pts/3", 0, 1)]) == []
    assert autostop.busy_reasons(CFG, [], [dict(gpu, utilization=5)], None, {}, 0, []) == []  # at the threshold


def test_it_fires_once_after_a_whole_idle_window_and_warns_before():
    st, t = {}, 1000.0
    st, act = autostop.step(CFG, st, [], t)
    assert act is None and autostop.fires_in(CFG, st, t) == 600
    st, act = autostop.step(CFG, st, ["job 3 running"], t + 300)   # busy: the window starts again
    assert act is None and autostop.fires_in(CFG, st, t + 300) is None and st["why_not"] == ["job 3 running"]
    st, act = autostop.step(CFG, st, [], t + 400)
    assert act is None and autostop.fires_in(CFG, st, t + 400) == 600
    st, act = autostop.step(CFG, st, [], t + 400 + 480)               # 2 min before: warn, once
    assert act == "warn"
    st, act = autostop.step(CFG, st, [], t + 400 + 500)
    assert act is None
    st, act = autostop.step(CFG, st, [], t + 400 + 600)
    assert act == "fire"
    st, act = autostop.step(CFG, st, [], t + 400 + 610)               # still here: not again at once
    assert act is None
    st, act = autostop.step(CFG, st, [], t + 400 + 1200)
    assert act is None and st["idle_since"] == t + 400 + 1200
    st, act = autostop.step(CFG, st, [], t + 400 + 1800)             # looked too late to warn in time:
    assert act == "warn"                                              # warned first all the same,
    st, act = autostop.step(CFG, st, [], t + 400 + 1801)
    assert act == "fire"                                              # fired at the next look


def test_terminals_and_the_warning_reach_a_real_pty():
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        mine = [t for t in autostop.terminals() if t[0] == name]
        assert mine and mine[0][1] == os.getuid()
        assert name not in [t[0] for t in autostop.terminals(window=-1)]  # no input within no time
        done = autostop.warn("rtrain autostop: stopping in 2 min", mine)
        assert done == [name]
        got = os.read(master, 4096).decode()
        assert "rtrain autostop: stopping in 2 min" in got
    finally:
        os.close(master)
        os.close(slave)


def test_fire_runs_the_users_command_with_its_output_logged(tmp_path):
    out = tmp_path / "log"
    with open(out, "wb") as log:
        assert autostop.fire("echo stopping; exit 3", log.fileno()) == 3
    assert out.read_text() == "stopping\n"
