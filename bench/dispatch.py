#!/usr/bin/env python3
"""Dispatch benchmark: rtrain's local queue side by side with task-spooler (tsp), in one run.

N trivial jobs are queued behind a blocker on one slot (rtrain: a 1-GPU simulated host and
--gpus 1; tsp: -S 1), so they run one after another. Each job appends a nanosecond timestamp
when it starts. Measured for both:
  submit      wall time of one `submit` command (what a user waits for)
  start gap   time between consecutive job starts, minus the job's own run time: the cost of
              noticing that a job ended and starting the next one
  drain       wall time for all N jobs once the blocker is gone, per job
Usage: python3 bench/dispatch.py [-n 200]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

JOB = "echo $(date +%s%N) >> {stamps}"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def gaps(stamp_file):
    ts = [int(x) / 1e9 for x in Path(stamp_file).read_text().split()]
    return [b - a for a, b in zip(ts, ts[1:])], ts


def bench_rtrain(n, tmp):
    import fakesmi
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    state = fakesmi.install(bin_dir)
    fakesmi.write_state(state, gpus=1)
    env = dict(os.environ, RTRAIN_HOME=str(tmp / "home"), RTRAIN_LOCK_DIR=str(tmp / "locks"),
               PATH="%s:%s" % (bin_dir, os.environ["PATH"]), FAKE_NVIDIA_SMI_STATE=str(state),
               PYTHONPATH=str(REPO), RTRAIN_DAEMON_IDLE_S="30")
    env.pop("RTRAIN_HOSTS", None)
    src = tmp / "src"
    src.mkdir()
    stamps = tmp / "rtrain-stamps"
    stamps.touch()
    rt = [sys.executable, "-m", "launcher"]

    def run(*a):
        return subprocess.run(rt + list(a), cwd=src, env=env, capture_output=True, text=True, check=True)

    blocker = run("submit", "-q", "--gpus", "1", "--", "sleep", "1000").stdout.strip()
    submit_s = []
    ids = []
    for _ in range(n):
        t = time.perf_counter()
        ids.append(run("submit", "-q", "--gpus", "1", "--", JOB.format(stamps=stamps)).stdout.strip())
        submit_s.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    run("cancel", blocker)
    # watch the stamps, not `rtrain status`: a CLI call every few ms would steal the CPU the
    # queue drains with (tsp's side below waits the same way)
    while len(stamps.read_text().split()) < n:
        time.sleep(0.01)
    drain = time.perf_counter() - t0
    while True:
        jobs = json.loads(run("status", "--json", "--all").stdout)
        if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs):
            break
        time.sleep(0.2)
    g, _ = gaps(stamps)
    by_id = {j["id"]: j for j in jobs}
    # end of one job (its wrapper saw it exit) -> the daemon marks the next one started
    handoff = [by_id[b]["started_at"] - by_id[a]["ended_at"] for a, b in zip(ids, ids[1:])]
    subprocess.run(rt + ["status"], cwd=src, env=env, capture_output=True)
    pid = int(json.loads((tmp / "home" / "daemon.lock").read_text() or "{}").get("pid") or 0)
    if pid:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return {"submit": submit_s, "gap": g, "drain_per_job": drain / n, "handoff": handoff}


def bench_tsp(n, tmp):
    tsp = shutil.which("tsp") or shutil.which("ts")
    if not tsp:
        return None
    env = dict(os.environ, TS_SOCKET=str(tmp / "tsp.socket"), TS_MAXFINISHED=str(n + 10),
               TMPDIR=str(tmp))
    subprocess.run([tsp, "-S", "1"], env=env, check=True, capture_output=True)
    stamps = tmp / "tsp-stamps"
    stamps.touch()
    blocker = subprocess.run([tsp, "sleep", "1000"], env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
    submit_s = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([tsp, "sh", "-c", JOB.format(stamps=stamps)], env=env, check=True,
                       capture_output=True)
        submit_s.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    subprocess.run([tsp, "-k", blocker], env=env, capture_output=True)
    subprocess.run([tsp, "-w"], env=env, capture_output=True)  # waits for the last job
    while len(stamps.read_text().split()) < n:
        time.sleep(0.01)
    drain = time.perf_counter() - t0
    subprocess.run([tsp, "-K"], env=env, capture_output=True)
    g, _ = gaps(stamps)
    return {"submit": submit_s, "gap": g, "drain_per_job": drain / n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtrain-bench-"))
    try:
        (tmp / "r").mkdir()
        (tmp / "t").mkdir()
        r = bench_rtrain(args.n, tmp / "r")
        t = bench_tsp(args.n, tmp / "t")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    def ms(x):
        return "%.1f ms" % (x * 1000)
    print("dispatch benchmark, %d trivial jobs on one slot, %s" % (args.n, time.strftime("%Y-%m-%d")))
    print("%-34s %14s %14s %8s" % ("", "rtrain", "tsp", "ratio"))
    rows = [("submit, median", statistics.median(r["submit"]), t and statistics.median(t["submit"])),
            ("start-to-start gap, median", statistics.median(r["gap"]), t and statistics.median(t["gap"])),
            ("start-to-start gap, p95", pct(r["gap"], 95), t and pct(t["gap"], 95)),
            ("drain, per job", r["drain_per_job"], t and t["drain_per_job"])]
    for name, a, b in rows:
        print("%-34s %14s %14s %8s" % (name, ms(a), ms(b) if b else "n/a",
                                       ("%.1fx" % (a / b)) if b else "-"))
    print("rtrain end-of-job -> next start (agent clock): median %s, p95 %s, max %s" % (
        ms(statistics.median(r["handoff"])), ms(pct(r["handoff"], 95)), ms(max(r["handoff"]))))
    if t is None:
        print("tsp not found: apt-get install task-spooler")


if __name__ == "__main__":
    main()
