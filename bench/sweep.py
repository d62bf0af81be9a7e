#!/usr/bin/env python3
"""Sweep benchmark: N points on the `local` host (a 1-GPU simulated host, a blocker holding the
GPU so every point stays queued), in one `rtrain submit --array N`, side by side with what a
user would do instead: N separate `rtrain submit` calls in a shell loop. Measured for both:
  submit   wall time to queue all N jobs
  status   wall time of `rtrain status` with the N jobs queued (a group is one line; N
           separate jobs are N lines), median of 5
and, for the sweep, `rtrain status GROUP` (all N lines) and the daemon's first pass over them.
Usage: python3 bench/sweep.py [-n 1000] [--separate N]  (--separate: time only N separate
submits and scale the total up to n, for a quick run; the others are queued untimed, four at a
time, so that `status` lists n jobs all the same)
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


class Local:
    def __init__(self, tmp):
        import fakesmi
        bin_dir = tmp / "bin"
        bin_dir.mkdir(parents=True)
        state = fakesmi.install(bin_dir)
        fakesmi.write_state(state, gpus=1)
        self.home = tmp / "home"
        self.env = dict(os.environ, RTRAIN_HOME=str(self.home), RTRAIN_LOCK_DIR=str(tmp / "locks"),
                        PATH="%s:%s" % (bin_dir, os.environ["PATH"]), FAKE_NVIDIA_SMI_STATE=str(state),
                        PYTHONPATH=str(REPO), RTRAIN_DAEMON_IDLE_S="60")
        self.env.pop("RTRAIN_HOSTS", None)
        self.src = tmp / "src"
        self.src.mkdir()
        (self.src / "train.py").write_text("import os\nprint(os.environ.get('RTRAIN_ARRAY_INDEX'))\n")

    def run(self, *a):
        return subprocess.run([sys.executable, "-m", "launcher"] + list(a), cwd=str(self.src), env=self.env,
                              capture_output=True, text=True, check=True)

    def timed(self, *a):
        t = time.perf_counter()
        p = self.run(*a)
        return time.perf_counter() - t, p

    def status_s(self, *a, runs=5):
        return statistics.median(self.timed("status", *a)[0] for _ in range(runs))

    def settled(self, n, timeout=600):
        """Seconds until the daemon has looked at every queued job (each says why it waits)."""
        import sqlite3
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            con = sqlite3.connect(str(self.home / "jobs.sqlite"))
            left = con.execute("SELECT COUNT(*) FROM jobs WHERE state='queued' AND message=''").fetchone()[0]
            con.close()
            if left == 0:
                return time.perf_counter() - t0
            time.sleep(0.05)
        return None

    def stop(self):
        subprocess.run([sys.executable, "-m", "launcher", "status"], cwd=str(self.src), env=self.env,
                       capture_output=True)
        try:
            pid = int(json.loads((self.home / "daemon.lock").read_text() or "{}").get("pid") or 0)
            os.kill(pid, 9)
        except (OSError, ValueError):
            pass


def bench_sweep(n, tmp):
    w = Local(tmp)
    try:
        w.run("submit", "-q", "--gpus", "1", "--", "sleep", "1000")  # holds the one GPU
        submit, p = w.timed("submit", "-q", "--yes", "--gpus", "1", "--array", str(n), "--", "python3", "train.py")
        group = p.stdout.strip()
        settle = w.settled(n)
        return {"submit": submit, "status": w.status_s(), "status_group": w.status_s(group, runs=3),
                "settle": settle}
    finally:
        w.stop()


def bench_separate(n, sample, tmp):
    w = Local(tmp)
    try:
        w.run("submit", "-q", "--gpus", "1", "--", "sleep", "1000")
        times = [w.timed("submit", "-q", "--gpus", "1", "--", "python3", "train.py")[0] for _ in range(sample)]
        if sample < n:  # the rest only so that `status` lists n jobs: four at a time, untimed
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(4) as ex:
                list(ex.map(lambda _: w.run("submit", "-q", "--gpus", "1", "--", "python3", "train.py"),
                            range(n - sample)))
        w.settled(n)
        status = w.status_s()
        return {"submit": sum(times) * n / float(sample), "per_submit": statistics.median(times),
                "status": status, "sample": sample}
    finally:
        w.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--separate", type=int, default=None, metavar="N",
                    help="time N separate submits and scale up to n (default: all n)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rtrain-bench-sweep-"))
    try:
        s = bench_sweep(args.n, tmp / "sweep")
        sep = bench_separate(args.n, args.separate or args.n, tmp / "separate")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("sweep benchmark, %d points on the local host, %s" % (args.n, time.strftime("%Y-%m-%d")))
    print("%-40s %12s %12s %8s" % ("", "one sweep", "separate", "ratio"))
    for name, a, b in (("queue %d jobs (wall)" % args.n, s["submit"], sep["submit"]),
                       ("rtrain status, %d jobs queued" % args.n, s["status"], sep["status"])):
        print("%-40s %10.2f s %10.2f s %7.3fx" % (name, a, b, a / b))
    print("separate submits: median %.0f ms each (%s)" % (
        sep["per_submit"] * 1000, "all %d timed" % args.n if sep["sample"] == args.n else
        "%d timed, total scaled to %d" % (sep["sample"], args.n)))
    print("rtrain status GROUP (all %d lines): %.2f s" % (args.n, s["status_group"]))
    if s["settle"] is not None:
        print("daemon: every point looked at (work dir built, waiting for the GPU) %.2f s after the submit" %
              s["settle"])


if __name__ == "__main__":
    main()
