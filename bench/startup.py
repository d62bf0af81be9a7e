#!/usr/bin/env python3
"""Start-up cost: `rtrain --version` and `rtrain status` (empty history, local host) against a
bare `python -c pass`, in one run; then `rtrain status` with 10,000 jobs in the history.
Usage: python3 bench/startup.py [--runs 20] [--jobs 10000]"""
import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(argv, env, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def fill(home, n):
    """n finished jobs, as the agent's own schema stores them (through its db module)."""
    sys.path.insert(0, str(REPO))
    from launcher.agent import db, paths
    h = paths.Home(str(home)).ensure()
    con = db.connect(h.db)
    now = time.time()
    with db.Tx(con):
        for i in range(n):
            jid = db.insert_job(con, {"name": "train.py", "command": "python train.py --seed %d" % i,
                                      "gpus": 1, "priority": 0, "retries": 0})
            con.execute("UPDATE jobs SET state='succeeded', exit_code=0, started_at=?, ended_at=?,"
                        " submitted_at=? WHERE id=?", (now - 3600 + i * 0.1, now - 3000 + i * 0.1,
                                                        now - 3700 + i * 0.1, jid))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=10000)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtrain-startup-"))
    env = dict(os.environ, RTRAIN_HOME=str(tmp / "home"), PYTHONPATH=str(REPO),
               RTRAIN_LOCK_DIR=str(tmp / "locks"), PATH="/usr/bin:/bin:" + os.path.dirname(sys.executable))
    env.pop("RTRAIN_HOSTS", None)
    rt = [sys.executable, "-m", "launcher"]
    timed(rt + ["status"], env, 1)  # ships the agent once
    bare = timed([sys.executable, "-c", "pass"], env, a.runs)
    ver = timed(rt + ["--version"], env, a.runs)
    st = timed(rt + ["status"], env, a.runs)
    fill(tmp / "home", a.jobs)
    st10k = timed(rt + ["status"], env, max(3, a.runs // 4))
    st10k_json = timed(rt + ["status", "--json", "--all"], env, max(3, a.runs // 4))
    print("start-up benchmark (medians of %d runs), %s" % (a.runs, time.strftime("%Y-%m-%d")))
    print("  python -c pass                     %7.1f ms" % (bare * 1000))
    print("  rtrain --version                   %7.1f ms   (+%.1f ms over python, %.2fx)" % (
        ver * 1000, (ver - bare) * 1000, ver / bare))
    print("  rtrain status, empty history       %7.1f ms   (+%.1f ms over python, %.2fx)" % (
        st * 1000, (st - bare) * 1000, st / bare))
    print("  rtrain status, %d jobs          %7.1f ms" % (a.jobs, st10k * 1000))
    print("  rtrain status --json --all, %d  %7.1f ms" % (a.jobs, st10k_json * 1000))


if __name__ == "__main__":
    main()
