#!/usr/bin/env python3
"""A project's start-up costs over SSH (loopback, its own sshd, user rtrain-bench): how long from
`rtrain submit` to the job's first instruction
  - with no data and no environment (the floor),
  - with a 2 GB data dir (rtrain.yaml `data:`): the first job (hash, send, data tree) and the
    second (nothing sent, the tree exists: a symlink),
  - with an environment (rtrain.yaml `setup:`): the first job (it builds it) and the second
    (cache hit),
next to a bare OpenSSH `ssh host true` and a paramiko connect + exec `true`.
Usage: sudo python3 bench/project.py [--runs 5] [--gb 2]"""
import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from startup import timed  # noqa: E402
USER = "rtrain-bench"  # the integration tests' teardown kills their users' processes


def median_ms(xs):
    return statistics.median(xs) * 1000


def start_latency(rt, env, src, stamp_dir, extra=()):
    """Seconds from `rtrain submit` to the job's first command (it writes the time)."""
    stamp = stamp_dir / ("start-%d" % time.monotonic_ns())
    t0 = time.time()
    subprocess.run(rt + ["submit", "-q"] + list(extra) + ["--", "date +%%s.%%N > %s" % stamp],
                   cwd=str(src), env=env, check=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            text = stamp.read_text().strip()
            if text:
                return float(text) - t0
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError("the job did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--gb", type=float, default=2.0)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    import conftest
    from wheels import make_wheel
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", USER], check=True, capture_output=True)
    tmp = Path(tempfile.mkdtemp(prefix="rtrain-bench-project-"))
    os.chmod(str(tmp), 0o755)
    (tmp / "sshd").mkdir()
    sshd = conftest.Sshd(tmp / "sshd")
    home = Path(pwd.getpwnam(USER).pw_dir) / (".rtrain-project-%d" % os.getpid())
    try:
        shutil.copyfile(str(sshd.root / "authkeys" / "root"), str(sshd.root / "authkeys" / USER))
        stamps = tmp / "stamps"
        stamps.mkdir(mode=0o1777)
        os.chmod(str(stamps), 0o1777)
        wheels = tmp / "wheels"
        make_wheel(str(wheels), "tinypkg", "1.0")
        os.chmod(str(wheels), 0o755)
        hosts = tmp / "hosts.yaml"
        hosts.write_text("hosts:\n  tower:\n    ssh: %s@127.0.0.1:%d\n    identity_file: %s\n"
                         "    home: %s\n" % (USER, sshd.port, sshd.user_key, home))
        env = dict(sshd.env(), RTRAIN_HOME=str(tmp / "local-home"), XDG_CACHE_HOME=str(tmp / "cache"))
        rt = [sys.executable, "-m", "launcher", "--hosts", str(hosts)]
        ssh_true = timed(["ssh", "-F", "/dev/null", "-i", str(sshd.user_key), "-p", str(sshd.port),
                          "-o", "UserKnownHostsFile=%s" % sshd.known_hosts, "-o", "BatchMode=yes",
                          "%s@127.0.0.1" % USER, "true"], env, args.runs)
        pm_true = timed([sys.executable, "-c", (
            "import paramiko\nc = paramiko.SSHClient()\nc.load_host_keys(%r)\n"
            "c.set_missing_host_key_policy(paramiko.RejectPolicy())\n"
            "c.connect('127.0.0.1', port=%d, username=%r, key_filename=%r, allow_agent=False, "
            "look_for_keys=False)\n_, o, _ = c.exec_command('true')\no.channel.recv_exit_status()\n"
            "c.close()\n") % (str(sshd.known_hosts), sshd.port, USER, str(sshd.user_key))], env, args.runs)

        # the floor: a project with no data and no environment
        plain = tmp / "plain"
        plain.mkdir()
        (plain / "train.py").write_text("print('hi')\n")
        start_latency(rt, env, plain, stamps)  # ships the agent, starts the daemon
        floor = [start_latency(rt, env, plain, stamps) for _ in range(args.runs)]

        # 2 GB of data, ignored by git's rules, named in `data:`
        big = tmp / "big"
        (big / "data" / "corpus").mkdir(parents=True)
        (big / ".gitignore").write_text("data/\n")
        (big / "rtrain.yaml").write_text("data: [data/corpus]\n")
        n = max(1, int(args.gb * 20))
        for i in range(n):
            with open(big / "data" / "corpus" / ("shard%03d.bin" % i), "wb") as f:
                for _ in range(50):
                    f.write(os.urandom(1 << 20))
        size = n * 50 * (1 << 20)
        first = start_latency(rt, env, big, stamps)
        second = [start_latency(rt, env, big, stamps) for _ in range(args.runs)]
        tree = next((home / "builds" / "data").glob("*.ready"))
        import json
        tree_s = json.loads(tree.read_text())["seconds"]

        # an environment: built by the first job, reused by the next
        proj = tmp / "envproj"
        proj.mkdir()
        (proj / "requirements.txt").write_text("tinypkg==1.0\n")
        (proj / "rtrain.yaml").write_text(
            "setup: pip install --no-index --find-links %s -r requirements.txt\n" % wheels)
        env_first = start_latency(rt, env, proj, stamps)
        env_hit = [start_latency(rt, env, proj, stamps) for _ in range(args.runs)]
        built = json.loads(next((home / "builds" / "env").glob("*.ready")).read_text())

        print("project start-up over ssh (loopback), %d runs, medians" % args.runs)
        print("  ssh host true (OpenSSH, new connection)   %8.0f ms" % (ssh_true * 1000))
        print("  paramiko connect + exec true              %8.0f ms" % (pm_true * 1000))
        print("  submit -> job start, no data, no env      %8.0f ms   %.2fx ssh true" % (
            median_ms(floor), median_ms(floor) / (ssh_true * 1000)))
        print("  %.1f GB data, first job (hash, send, tree) %7.0f ms   (data tree built in %.2f s)" % (
            size / 1e9, first * 1000, tree_s))
        print("  %.1f GB data, second job                   %6.0f ms   %.2fx ssh true, %.2fx no data" % (
            size / 1e9, median_ms(second), median_ms(second) / (ssh_true * 1000),
            median_ms(second) / median_ms(floor)))
        print("  env, first job (builds it: %s, %.1f s)    %8.0f ms" % (
            built.get("tool"), built["seconds"], env_first * 1000))
        print("  env, second job (cache hit)               %8.0f ms   %.2fx ssh true, %.2fx no env" % (
            median_ms(env_hit), median_ms(env_hit) / (ssh_true * 1000), median_ms(env_hit) / median_ms(floor)))
    finally:
        from support import stop_agent
        stop_agent(home)  # the daemon and the jobs, by pid
        sshd.stop()
        subprocess.run(["rm", "-rf", str(home)])
        shutil.rmtree(str(tmp), ignore_errors=True)


if __name__ == "__main__":
    main()
