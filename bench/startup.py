#!/usr/bin/env python3
"""Start-up cost: `rtrain --version` and `rtrain status` (empty history, local host) against a
bare `python -c pass`, in one run; then `rtrain status` with 10,000 jobs in the history, on the
local host and, as root (it starts its own sshd for the user rtrain-bench), over SSH on
loopback: with the default transport (OpenSSH) on a warm shared connection, next to `ssh host
true` on that same connection; and with `transport: paramiko`, next to a bare paramiko
connect + exec of `true`.
Usage: python3 bench/startup.py [--runs 20] [--jobs 10000] [--no-ssh]"""
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


def ssh_status(n, runs, tmp):
    """{figure: seconds}: rtrain status over ssh with n jobs (openssh, warm; paramiko), the same
    with --json --all, `ssh host true` on rtrain's shared connection, paramiko connect+exec."""
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    import conftest
    user = "rtrain-bench"  # the integration tests' teardown kills their users' processes
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", user], check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", user], check=True, capture_output=True)
    (tmp / "sshd").mkdir(parents=True)
    for d in (tmp.parent, tmp):
        os.chmod(str(d), 0o755)
    sshd = conftest.Sshd(tmp / "sshd")
    try:
        shutil.copyfile(str(sshd.root / "authkeys" / "root"), str(sshd.root / "authkeys" / user))
        pw = pwd.getpwnam(user)
        home = Path(pw.pw_dir) / (".rtrain-startup-%d" % os.getpid())
        fill(home, n)
        subprocess.run(["chown", "-R", "%s:%s" % (user, user), str(home)], check=True)
        hosts = tmp / "hosts.yaml"
        text = "hosts:\n  tower:\n    ssh: %s@127.0.0.1:%d\n    identity_file: %s\n    home: %s\n" % (
            user, sshd.port, sshd.user_key, home)
        hosts.write_text(text)
        pm_hosts = tmp / "hosts-paramiko.yaml"
        pm_hosts.write_text(text + "    transport: paramiko\n")
        ctl = tmp / "cm"
        env = dict(sshd.env(), RTRAIN_HOME=str(tmp / "local-home"), RTRAIN_SSH_CONTROL_DIR=str(ctl))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        rt = [sys.executable, "-m", "launcher", "--hosts", str(hosts)]
        timed(rt + ["status", "--host", "tower"], env, 1)  # ships the agent, opens the shared connection
        out = {}
        out["st"] = timed(rt + ["status", "--host", "tower"], env, runs)
        out["st_json"] = timed(rt + ["status", "--host", "tower", "--json", "--all"], env, max(3, runs // 2))
        [sock] = [p for p in ctl.iterdir() if p.is_socket()]
        out["mux_true"] = timed(["ssh", "-F", "/dev/null", "-o", "ControlPath=%s" % sock, "-p", str(sshd.port),
                                 "-l", user, "127.0.0.1", "true"], env, runs)
        rtp = [sys.executable, "-m", "launcher", "--hosts", str(pm_hosts)]
        out["st_pm"] = timed(rtp + ["status", "--host", "tower"], env, runs)
        pm = timed([sys.executable, "-c", (
            "import paramiko\nc = paramiko.SSHClient()\nc.load_host_keys(%r)\n"
            "c.set_missing_host_key_policy(paramiko.RejectPolicy())\n"
            "c.connect('127.0.0.1', port=%d, username=%r, key_filename=%r, allow_agent=False, "
            "look_for_keys=False)\n_, o, _ = c.exec_command('true')\no.channel.recv_exit_status()\n"
            "c.close()\n") % (str(sshd.known_hosts), sshd.port, user, str(sshd.user_key))], env, runs)
        out["pm"] = pm
        shutil.rmtree(str(home), ignore_errors=True)
        return out
    finally:
        from launcher.openssh import close_master
        for p in (tmp / "cm").glob("*"):
            if p.is_socket():
                close_master("ssh", str(p))
        sshd.stop()


def cleanup(tmp):
    """Stop the local daemon the runs started; remove the temp dir."""
    sys.path.insert(0, str(REPO / "tests"))
    from support import stop_agent
    stop_agent(tmp / "home")
    shutil.rmtree(str(tmp), ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--no-ssh", action="store_true", help="skip the part over SSH")
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
    if a.no_ssh or os.geteuid() != 0 or not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
        print("  (over SSH: skipped; run as root with openssh-server installed)")
        cleanup(tmp)
        return
    try:
        r = ssh_status(a.jobs, a.runs, tmp / "ssh")
    finally:
        cleanup(tmp)
    print("over SSH on 127.0.0.1, %d jobs in the history:" % a.jobs)
    print("  ssh host true, on rtrain's shared connection  %7.1f ms" % (r["mux_true"] * 1000))
    print("  rtrain status (openssh, warm)                 %7.1f ms   (%.1fx; +%.0f ms)" % (
        r["st"] * 1000, r["st"] / r["mux_true"], (r["st"] - r["mux_true"]) * 1000))
    print("  rtrain status --json --all (openssh, warm)    %7.1f ms" % (r["st_json"] * 1000))
    print("  paramiko connect + exec true                  %7.1f ms" % (r["pm"] * 1000))
    print("  rtrain status (transport: paramiko)           %7.1f ms   (%.2fx of paramiko)" % (
        r["st_pm"] * 1000, r["st_pm"] / r["pm"]))


if __name__ == "__main__":
    main()
