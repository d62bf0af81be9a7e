#!/usr/bin/env python3
"""Round trips on a slow link: rtrain's commands through a loopback proxy that holds every chunk
D ms in each direction (these machines have no netem), for D = 0 and D = 50 ms, side by side with
OpenSSH's `ssh host true`, new and over a shared (ControlMaster) connection, in one run against a
real sshd on 127.0.0.1 (started here, as in tests/integration; needs root and openssh-server).

For each command, the median of --runs wall times at D = 0 and at D, and the round trips it
costs: (t(D) - t(0)) / 2D. Goals (issue 8), with rtrain's shared
connection warm: status, logs, gpus, cancel within 1.2x the round trips of `ssh host true` over
a master (about 2); submit of an unchanged tree <= 3, with one changed file <= 4; and cold (no
shared connection) within 1 round trip of a new `ssh host true`.
Usage: sudo python3 bench/wan.py [--delay-ms 50] [--runs 5]"""
import argparse
import collections
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))
USER = "rtrain-bench"  # the integration tests' teardown kills their own users' processes


class DelayProxy:
    """127.0.0.1:port -> target; each chunk is forwarded `delay` seconds after it arrived, in
    order, in both directions (a link with that one-way latency and no bandwidth limit)."""

    def __init__(self, target_port):
        self.target = target_port
        self.delay = 0.0
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((c, s), (s, c)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                q = collections.deque()
                cv = threading.Condition()
                threading.Thread(target=self._read, args=(a, q, cv), daemon=True).start()
                threading.Thread(target=self._send, args=(b, q, cv), daemon=True).start()

    def _read(self, a, q, cv):
        while True:
            try:
                data = a.recv(65536)
            except OSError:
                data = b""
            with cv:
                q.append((time.monotonic() + self.delay, data))
                cv.notify()
            if not data:
                return

    def _send(self, b, q, cv):
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, data = q.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    b.shutdown(socket.SHUT_WR)
                    return
                b.sendall(data)
            except OSError:
                return


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/wan.py starts sshd for a user of its own: run it as root")
    import conftest
    import fakesmi
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", USER], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="rtrain-wan-"))
    os.chmod(str(work), 0o755)
    (work / "sshd").mkdir()
    sshd = conftest.Sshd(work / "sshd")
    fakesmi.install(sshd.bin_dir, gpus=2)
    shutil.copyfile(str(sshd.root / "authkeys" / "root"), str(sshd.root / "authkeys" / USER))
    delays = (0.0, a.delay_ms / 1000.0)
    # one proxy, one host entry and one shared connection per delay: runs alternate between
    # them, so that a machine whose load drifts skews both alike, and each TCP connection keeps
    # one delay throughout
    proxies = {}
    for d in delays:
        proxies[d] = DelayProxy(sshd.port)
        proxies[d].delay = d
    key = " ".join(sshd.host_key.with_suffix(".pub").read_text().split()[:2])
    kh = work / "known_hosts"
    kh.write_text("".join("[127.0.0.1]:%d %s\n" % (p.port, key) for p in proxies.values()))
    ctl = work / "cm"
    env = sshd.env(known_hosts=kh, RTRAIN_SSH_CONTROL_DIR=str(ctl), RTRAIN_HOME=str(work / "local"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    home = ".rtrain-wan-%d" % os.getpid()
    name = {d: "d%d" % round(d * 1000) for d in delays}
    hosts = work / "hosts.yaml"
    hosts.write_text("hosts:\n" + "".join(
        "  %s:\n    ssh: %s@127.0.0.1:%d\n    identity_file: %s\n    home: ~/%s\n    lock_dir: %s\n" % (
            name[d], USER, proxies[d].port, sshd.user_key, home, sshd.lock_dir) for d in delays))
    src = work / "src"
    src.mkdir()
    for i in range(10):
        (src / ("f%d.py" % i)).write_text("print(%d)\n" % i)
    rt = [sys.executable, "-m", "launcher", "--hosts", str(hosts)]
    target = "%s@127.0.0.1" % USER
    mpath = {d: str(work / ("ssh-master-%s" % name[d])) for d in delays}

    def ssh(d, *opts):
        return ["ssh", "-F", "/dev/null", "-p", str(proxies[d].port), "-i", str(sshd.user_key), "-o",
                "UserKnownHostsFile=%s" % kh, "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes"] + list(opts)

    def run(*args):
        return subprocess.run(rt + list(args), env=env, cwd=str(src), capture_output=True, text=True,
                              check=True).stdout

    edits = [0]

    def edit(d):
        edits[0] += 1
        (src / "f0.py").write_text("print(0)  # edit %d\n" % edits[0])

    def disconnect(d):
        run("hosts", "--disconnect", name[d])

    results = {d: {} for d in delays}

    def measure(label, argv, before=None):
        """argv(d, i) -> the command for delay d, run i; runs alternate between the delays."""
        times = {d: [] for d in delays}
        for i in range(a.runs):
            for d in delays:
                if before:
                    before(d)
                times[d].append(_t(argv(d, i), env, src))
        for d in delays:
            results[d][label] = statistics.median(times[d])

    try:
        jobs, victims = {}, {}
        for d in delays:
            run("status", "--host", name[d])  # ships the agent, opens rtrain's shared connection
            jobs[d] = run("submit", "-q", "--host", name[d], "--", "echo", "hello").strip()
        measure("ssh true, new connection", lambda d, i: ssh(d, "-o", "ControlPath=none", target, "true"))
        for d in delays:
            subprocess.run(ssh(d, "-M", "-N", "-f", "-o", "ControlPath=" + mpath[d], target), env=env, check=True)
        measure("ssh true, over a master", lambda d, i: ssh(d, "-o", "ControlPath=" + mpath[d], target, "true"))
        measure("status", lambda d, i: rt + ["status", "--host", name[d]])
        measure("logs JOB", lambda d, i: rt + ["logs", jobs[d]])
        measure("gpus", lambda d, i: rt + ["gpus", "--host", name[d]])
        for d in delays:
            victims[d] = [run("submit", "-q", "--host", name[d], "--", "sleep", "600").strip()
                          for _ in range(a.runs)]
        time.sleep(1)
        measure("cancel", lambda d, i: rt + ["cancel", victims[d][i]])
        measure("submit, unchanged tree", lambda d, i: rt + ["submit", "-q", "--host", name[d], "--", "true"])
        measure("submit, one file changed", lambda d, i: rt + ["submit", "-q", "--host", name[d], "--", "true"],
                before=edit)
        measure("status, cold (no shared connection)", lambda d, i: rt + ["status", "--host", name[d]],
                before=disconnect)
    finally:
        try:
            run("hosts", "--disconnect")
        except subprocess.CalledProcessError:
            pass
        from launcher.openssh import close_master
        for p in mpath.values():
            close_master("ssh", p)
        lock = Path("/home") / USER / home / "daemon.lock"
        try:
            os.kill(int(lock.read_text().strip()), 9)
        except (OSError, ValueError):
            pass
        subprocess.run(["pkill", "-9", "-u", USER], capture_output=True)
        shutil.rmtree(str(Path("/home") / USER / home), ignore_errors=True)
        sshd.stop()
        shutil.rmtree(str(work), ignore_errors=True)
    report(a, results)


def _t(argv, env, cwd):
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit("%s failed (%d): %s" % (" ".join(map(str, argv)), p.returncode, p.stderr.decode()))
    return dt


def report(a, results):
    d = a.delay_ms / 1000.0
    r0, r1 = results[0.0], results[d]

    def rtt(k):
        return (r1[k] - r0[k]) / (2 * d)

    base = rtt("ssh true, over a master")
    cold = rtt("ssh true, new connection")
    goals = {"status": "<= %.1f (1.2x ssh over a master)" % (1.2 * base),
             "logs JOB": "<= %.1f" % (1.2 * base), "gpus": "<= %.1f" % (1.2 * base),
             "cancel": "<= %.1f" % (1.2 * base),
             "submit, unchanged tree": "<= 3", "submit, one file changed": "<= 4",
             "status, cold (no shared connection)": "<= %.1f (ssh new + 1)" % (cold + 1)}
    limit = {"status": 1.2 * base, "logs JOB": 1.2 * base, "gpus": 1.2 * base, "cancel": 1.2 * base,
             "submit, unchanged tree": 3, "submit, one file changed": 4,
             "status, cold (no shared connection)": cold + 1}
    print("wan benchmark, %s, %d CPUs: a loopback proxy holding each chunk %g ms each way "
          "(RTT %g ms); medians of %d" % (time.strftime("%Y-%m-%d"), os.cpu_count(), a.delay_ms,
                                           2 * a.delay_ms, a.runs))
    print("%-38s %9s %9s %12s   %s" % ("", "D=0", "D=%gms" % a.delay_ms, "round trips", "goal"))
    for k in r0:
        g = goals.get(k, "")
        met = "" if k not in limit else ("  met" if rtt(k) <= limit[k] + 0.05 else "  MISSED")
        print("%-38s %7.0fms %7.0fms %12.1f   %s%s" % (k, r0[k] * 1000, r1[k] * 1000, rtt(k), g, met))
    print("rtrain rows: warm shared connection (rtrain's own master), unless marked cold; one host "
          "(--host); cancel: a running `sleep`; logs: a finished job's one-line log")


if __name__ == "__main__":
    main()
