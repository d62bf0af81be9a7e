#!/usr/bin/env python3
"""Log latency: `rtrain logs -f` side by side with `ssh host tail -f`, in one run, on one job.

A job on a real sshd on 127.0.0.1 (started here, as in tests/integration) prints a line every
10 ms that carries time.time() at the moment it was written. Both readers run at once on the same
log: `rtrain logs JOB -f` and `ssh -p PORT ... user@127.0.0.1 tail -f LOG`. Each reader's stdout
is read line by line here and every line is stamped on arrival; latency = arrival - written.
Both ends are on this machine, so there is one clock. Needs root (it starts sshd and creates
the test users, like the integration tests).

Usage: sudo python3 bench/log_latency.py [--seconds 20] [--interval 0.01] [--alternate TURNS]
       [--paramiko]
By default the readers run at the same time, as asked; on a machine with few cores they then
queue for CPUs behind each other at every line, which penalises the slower one. --alternate
runs them one at a time in turns (same job, same log, same run). --paramiko adds `tail -f`
over a bare paramiko channel: what the SSH library costs, apart from rtrain.
Goal (issue 4): rtrain p50 within 1.5x of ssh tail -f, and under 150 ms on loopback.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

TICK = r'''
import os, sys, time
go, seconds, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
w = sys.stdout.buffer
w.write(b"ready\n"); w.flush()
while not os.path.exists(go):
    time.sleep(0.01)
n = int(seconds / interval)
t0 = time.time()
for i in range(n):
    # keep to the schedule: line i is written at t0 + i * interval
    delay = t0 + i * interval - time.time()
    if delay > 0:
        time.sleep(delay)
    w.write(b"%.6f %06d\n" % (time.time(), i)); w.flush()
w.write(b"done\n"); w.flush()
'''


# the SSH library rtrain uses, alone: exec `tail -f` over paramiko and print what comes, with
# the same channel file rtrain reads (shows what the transport costs, apart from rtrain)
PARAMIKO_TAIL = r'''
import sys, paramiko
port, key, kh, user, log = sys.argv[1:6]
c = paramiko.SSHClient()
c.load_host_keys(kh)
c.connect("127.0.0.1", port=int(port), username=user, key_filename=key, allow_agent=False,
          look_for_keys=False)
chan = c.get_transport().open_session()
chan.exec_command("tail -c +1 -f " + log)
f = chan.makefile("rb", 65536)
out = sys.stdout.buffer
for line in iter(f.readline, b""):
    out.write(line)
    out.flush()
'''


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


class Reader:
    """A reader process whose stdout lines are stamped on arrival (by stamp_all)."""

    def __init__(self, name, argv, env=None, cwd=None):
        self.name = name
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  cwd=cwd, stdin=subprocess.DEVNULL, bufsize=0)
        os.set_blocking(self.p.stdout.fileno(), False)
        self.lat = {}
        self.ready = threading.Event()
        self.done = threading.Event()
        self._buf = b""

    def feed(self, data, now):
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line == b"ready":
                self.ready.set()
            elif line == b"done":
                self.done.set()
            else:
                parts = line.split()
                if len(parts) == 2:
                    try:
                        written = float(parts[0])
                        self.lat[int(parts[1])] = (written, now - written)
                    except ValueError:
                        pass

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


def stamp_all(readers):
    """One thread, one select over every reader's stdout: each chunk is stamped the moment it
    can be read, and no reader waits for another's thread (one thread per reader would make
    them queue for the GIL when the same line arrives on both at once)."""
    import selectors
    sel = selectors.DefaultSelector()
    for r in readers:
        sel.register(r.p.stdout, selectors.EVENT_READ, r)
    open_ = len(readers)
    while open_:
        for key, _ in sel.select():
            now = time.time()
            r = key.data
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                r.feed(data, now)
            if not data or r.done.is_set():
                sel.unregister(key.fileobj)
                r.done.set()
                open_ -= 1


# a user of the bench's own, so that test runs on the same machine (whose teardown kills every
# process of the test users) leave its job alone
USER = "rtrain-logbench"


def _ensure_user(sshd):
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", USER], check=True, capture_output=True)
    keys = Path(sshd.root) / "authkeys" / USER
    keys.write_text(sshd.user_key.with_suffix(".pub").read_text())
    os.chmod(keys, 0o644)


def _cleanup(log):
    """The job has ended by itself; stop the host's per-user scheduler daemon (by the pid in
    daemon.lock under the job's RTRAIN_HOME) and remove that home."""
    if not log:
        return
    home = Path(log).parents[2]
    try:
        os.kill(int(json.loads((home / "daemon.lock").read_text())["pid"]), 15)
    except (OSError, ValueError):
        pass
    shutil.rmtree(home, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of lines not counted")
    ap.add_argument("--alternate", type=int, default=0, metavar="TURNS",
                    help="run the readers one at a time, TURNS turns each, instead of all at once")
    ap.add_argument("--paramiko", action="store_true",
                    help="also time `tail -f` over a bare paramiko channel (the transport alone)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("log_latency.py starts sshd for a test user: run it as root")
    from conftest import Sshd
    import fakesmi
    root = tempfile.mkdtemp(prefix="rtrain-bench-logs-")
    sshd = Sshd(root)
    _ensure_user(sshd)
    readers = []
    log = None
    try:
        fakesmi.install(sshd.bin_dir)
        fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json", gpus=1)
        os.chmod(sshd.bin_dir / "nvidia-smi-state.json", 0o644)
        hosts = sshd.hosts_yaml(Path(root) / "hosts.yaml", {"tower": (USER, sshd.port)})
        src = Path(root) / "src"
        src.mkdir()
        (src / "tick.py").write_text(TICK)
        flags = Path(root) / "flags"
        flags.mkdir(mode=0o755)
        os.chmod(flags, 0o755)
        go = flags / "go"
        env = sshd.env()
        rt = [sys.executable, "-m", "launcher", "--hosts", str(hosts)]

        def run(*a):
            return subprocess.run(rt + [str(x) for x in a], cwd=str(src), env=env, capture_output=True,
                                  text=True, check=True).stdout

        job = run("submit", "-q", "--", "python3", "tick.py", go, args.seconds, args.interval).strip()
        deadline = time.time() + 60
        while time.time() < deadline:
            st = json.loads(run("status", "--json", job))
            if st.get("log") and os.path.exists(st["log"]) and st["state"] == "running":
                log = st["log"]
                break
            time.sleep(0.1)
        if log is None:
            sys.exit("the job did not start: %s" % st)
        ssh = ["ssh", "-p", str(sshd.port), "-i", str(sshd.user_key), "-o", "IdentitiesOnly=yes",
               "-o", "BatchMode=yes", "-o", "UserKnownHostsFile=%s" % sshd.known_hosts,
               "-F", "/dev/null", USER + "@127.0.0.1", "tail", "-c", "+1", "-f", log]
        argvs = {"rtrain logs -f": (rt + ["logs", job, "-f"], env, str(src)),
                 "ssh tail -f": (ssh, None, None)}
        if args.paramiko:
            argvs["paramiko tail -f"] = ([sys.executable, "-c", PARAMIKO_TAIL, str(sshd.port),
                                          str(sshd.user_key), str(sshd.known_hosts), USER, log], None, None)
        n = int(args.seconds / args.interval)
        counted = {}  # reader name -> latencies of the lines it is judged on
        if not args.alternate:
            readers = [Reader(name, *spec) for name, spec in argvs.items()]
            threading.Thread(target=stamp_all, args=(readers,), daemon=True).start()
            for r in readers:
                if not r.ready.wait(60):
                    sys.exit("%s never showed the job's first line: %s" % (
                        r.name, r.p.stderr.read1(4096) if r.p.poll() is not None else "(still running)"))
            go.touch()
            for r in readers:
                r.done.wait(args.seconds + 120)
            skip = int(args.warmup / args.interval)
            for r in readers:
                counted[r.name] = [lat for k, (_, lat) in r.lat.items() if skip <= k < n]
            mode = "all readers at once"
        else:
            # one reader at a time, in turns, on the same job: no reader waits for a CPU that
            # another one holds (this machine may have few cores)
            go.touch()
            phase = args.seconds / (len(argvs) * args.alternate)
            for name in argvs:
                counted[name] = []
            for _ in range(args.alternate):
                for name, spec in argvs.items():
                    r = Reader(name, *spec)
                    readers = [r]
                    t = threading.Thread(target=stamp_all, args=(readers,), daemon=True)
                    t.start()
                    t0 = time.time()
                    time.sleep(phase)
                    r.stop()
                    t.join(30)
                    counted[name] += [lat for (w, lat) in r.lat.values()
                                      if t0 + args.warmup <= w <= t0 + phase]
            readers = []
            mode = "one reader at a time, %d turns each" % args.alternate
        print("log latency, write -> local print, a line every %g ms for %gs on 127.0.0.1 (%s), "
              "%s, %d CPUs" % (args.interval * 1000, args.seconds, mode, time.strftime("%Y-%m-%d"),
                               os.cpu_count()))
        print("%-18s %7s %9s %9s %9s %9s %9s" % ("", "lines", "p50", "p90", "p99", "max", "mean"))
        for name, xs in counted.items():
            if not xs:
                print("%-18s no lines" % name)
                continue
            print("%-18s %7d %9s %9s %9s %9s %9s" % (
                name, len(xs), *("%.2f ms" % (1000 * v) for v in (
                    statistics.median(xs), pct(xs, 90), pct(xs, 99), max(xs), statistics.mean(xs)))))
        if not args.alternate:
            for r in readers:
                missing = n - len([k for k in r.lat if 0 <= k < n])
                if missing:
                    print("%s missed %d line(s)" % (r.name, missing))
        a, b = counted.get("rtrain logs -f"), counted.get("ssh tail -f")
        if a and b:
            pa, pb = statistics.median(a), statistics.median(b)
            print("ratio rtrain/ssh: p50 %.2fx, p99 %.2fx   (goal: p50 <= 1.5x and < 150 ms: %s)" % (
                pa / pb, pct(a, 99) / pct(b, 99), "met" if pa <= 1.5 * pb and pa < 0.150 else "NOT met"))
    finally:
        for r in readers:
            r.stop()
        sshd.stop()
        _cleanup(log)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
