#!/usr/bin/env python3
"""Slurm benchmark: rtrain's Slurm functions (launcher/agent/slurmjobs.py) side by side with what
a user would run by hand, on the same private single-node Slurm (tests/slurmcluster.py), in one run.

Measured, each --runs times, alternating rtrain and bare:
  submit-to-running  from the submit until a poll says the job runs (job: sleep 2)
                     rtrain: slurmjobs.submit + slurmjobs.status polls
                     bare:   sbatch --parsable --wrap + `squeue -h -j ID -o %T` polls
  end-to-end         from the submit until a poll says the job ended (job: true)
                     rtrain: until status says succeeded (the wrapper's exit.json tells it before
                     Slurm's COMPLETED); bare: until squeue says COMPLETED
  status of 200      status of 200 jobs (100 held array tasks, 90 held jobs, 10 finished)
                     rtrain: slurmjobs.status (one squeue --json, filtered here; and text mode)
                     bare:   `squeue --json` alone (nothing parsed), and `squeue -o` for the user;
                     again with 2,000 other users' jobs on the cluster (--json lists them all)
Polls are every --poll seconds on both sides. "rtrain (agent process)" is what an agent call
adds on the login node: a `python3 -S` start of the zipapp, in a fresh process per call.

And end to end from the laptop, through the real `rtrain` CLI over ssh (the sshd of the tests,
loopback, a host with `scheduler: slurm`), against what a user does by hand over ssh (OpenSSH
with a shared connection, ControlMaster: its fastest):
  submit-to-running  rtrain submit -q, then `rtrain status --json JOB` polls
                     bare: ssh sbatch --parsable --wrap, then `ssh squeue -h -j ID -o %T` polls
  end-to-end         rtrain submit -f (follows the log, exits with the job's code: `true`)
                     bare: ssh sbatch --wrap, ssh squeue polls until COMPLETED
  status of 200      rtrain status --json over 200 jobs (squeue_format auto, and text)
                     bare: ssh squeue --json
Needs root (it starts munged, slurmctld, slurmd). Usage: sudo python3 bench/slurm.py [--runs 10]
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from launcher import agentpkg  # noqa: E402
from launcher.agent import paths, slurmjobs  # noqa: E402
from slurmcluster import SlurmCluster, missing_binaries  # noqa: E402


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def p95(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))] if xs else float("nan")


class Bench:
    def __init__(self, cluster, tmp, poll):
        self.c = cluster
        self.env = cluster.env()
        self.poll = poll
        self.home = paths.Home(str(tmp / "home")).ensure()
        self.next_id = 1
        self.bare_dir = tmp / "bare"
        self.bare_dir.mkdir()
        blob, digest = agentpkg.build()
        self.pyz = tmp / ("agent-%s.pyz" % digest[:16])
        self.pyz.write_bytes(blob)

    def new_jobs(self, n, command):
        jobs = []
        for _ in range(n):
            i = self.next_id
            self.next_id += 1
            os.makedirs(self.home.job(i).work)
            jobs.append({"id": i, "command": command, "env": {}})
        return jobs

    # -- rtrain, in this process
    def rtrain(self, command, until):
        t0 = time.perf_counter()
        (j,) = self.new_jobs(1, command)
        slurmjobs.submit(self.home, [j], {}, env=self.env)
        t_sub = time.perf_counter() - t0
        while True:
            v = slurmjobs.status(self.home, [j["id"]], env=self.env)[j["id"]]
            if v["state"] in until:
                return time.perf_counter() - t0, t_sub, v
            time.sleep(self.poll)

    # -- rtrain, one agent process per call (python3 -S + the zipapp), as over ssh minus ssh
    def agent(self, calls):
        p = subprocess.run([sys.executable, "-S", str(REPO / "tests" / "slurm_driver.py"),
                            str(self.pyz), "rtrain_agent"],
                           input=json.dumps({"home": self.home.root, "calls": calls}),
                           capture_output=True, text=True, env=self.env, check=True)
        return json.loads(p.stdout)["results"]

    def rtrain_agent(self, command, until):
        t0 = time.perf_counter()
        (j,) = self.new_jobs(1, command)
        self.agent([["submit", {"jobs": [j], "options": {}}]])
        while True:
            v = self.agent([["status", {"ids": [j["id"]]}]])[0]["ok"]["views"][str(j["id"])]
            if v["state"] in until:
                return time.perf_counter() - t0
            time.sleep(self.poll)

    # -- bare sbatch --wrap + squeue polling
    def bare(self, command, until):
        t0 = time.perf_counter()
        p = subprocess.run(["sbatch", "--parsable", "-o", str(self.bare_dir / "slurm-%j.out"),
                            "--wrap", command], env=self.env, capture_output=True, text=True,
                           check=True, cwd=str(self.bare_dir))
        jid = p.stdout.strip().split(";")[0]
        while True:
            s = subprocess.run(["squeue", "-h", "-t", "all", "-j", jid, "-o", "%T"], env=self.env,
                               capture_output=True, text=True).stdout.strip()
            if s in until:
                return time.perf_counter() - t0
            time.sleep(self.poll)


class Cli:
    """The laptop: the rtrain CLI against the cluster's login node over the tests' sshd."""

    def __init__(self, cluster, tmp, poll):
        sys.path.insert(0, str(REPO / "tests" / "integration"))
        import conftest
        from slurmlogin import Login
        from support import ALICE
        conftest._ensure_users()
        (tmp / "sshd").mkdir()
        self.sshd = conftest.Sshd(tmp / "sshd")
        self.login = Login(self.sshd, cluster)
        self.poll, self.home = poll, "~/.rtrain-bench-%d" % os.getpid()
        self.src = tmp / "src"
        self.src.mkdir()
        self.env = self.sshd.env(known_hosts=self.login.known_hosts)
        self.rt = {}
        for fmt in ("auto", "text"):
            hosts = self.sshd.hosts_yaml(tmp / ("hosts-%s.yaml" % fmt), {"cluster": (
                ALICE, self.login.port, {"home": self.home, "scheduler": "slurm", "squeue_format": fmt})})
            self.rt[fmt] = [sys.executable, "-m", "launcher", "--hosts", str(hosts)]
        self.ssh_new = ["ssh", "-F", "/dev/null", "-i", str(self.sshd.user_key), "-o", "IdentitiesOnly=yes",
                        "-o", "UserKnownHostsFile=%s" % self.login.known_hosts, "-o", "BatchMode=yes",
                        "-p", str(self.login.port), "%s@127.0.0.1" % ALICE]
        self.ssh = self.ssh_new[:-1] + ["-o", "ControlMaster=auto", "-o", "ControlPath=%s/cm-%%C" % tmp,
                                        "-o", "ControlPersist=120", self.ssh_new[-1]]

    def cli(self, *args, fmt="auto", check=True):
        return subprocess.run(self.rt[fmt] + list(args), cwd=str(self.src), env=self.env,
                              capture_output=True, text=True, check=check).stdout

    def on_login(self, *argv):
        # ssh joins its arguments into one shell command: quote each
        p = subprocess.run(self.ssh + [" ".join(shlex.quote(a) for a in argv)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError("ssh %s -> %d: %s" % (" ".join(argv), p.returncode, p.stderr))
        return p.stdout

    def rtrain(self, command, until):
        t0 = time.perf_counter()
        job = self.cli("submit", "-q", "--", command).strip()
        t_sub = time.perf_counter() - t0
        while json.loads(self.cli("status", "--json", job))["state"] not in until:
            time.sleep(self.poll)
        return time.perf_counter() - t0, t_sub

    def follow(self, command):
        t0 = time.perf_counter()
        self.cli("submit", "-q", "-f", "--", command)
        return time.perf_counter() - t0

    def bare(self, command, until):
        t0 = time.perf_counter()
        jid = self.on_login("sbatch", "--parsable", "-o", "bench-bare-%j.out", "--wrap", command)
        jid = jid.strip().split(";")[0]
        while self.on_login("squeue", "-h", "-t", "all", "-j", jid, "-o", "%T").strip() not in until:
            time.sleep(self.poll)
        return time.perf_counter() - t0

    def status_200(self, runs):
        """200 jobs (190 held, 10 that ran) submitted through the agent's own verb, then timed."""
        req = {"manifest": {"entries": []}, "command": "true", "gpus": 0,
               "slurm": {"sbatch_args": ["--hold"]}}
        self.login.ok(self.home, ("agent", {"verb": "submit", "req": req, "times": 190}),
                      ("agent", {"verb": "submit", "req": dict(req, slurm={}), "times": 10}))
        deadline = time.time() + 60
        while time.time() < deadline and sum(
                j["state"] == "succeeded" for j in json.loads(self.cli("status", "--json"))) < 10:
            time.sleep(0.5)
        return {"ssh_new": timed(lambda: subprocess.run(self.ssh_new + ["true"], capture_output=True,
                                                        check=True), runs),
                "cli_version": timed(lambda: subprocess.run(self.rt["auto"][:3] + ["--version"],
                                                            capture_output=True, check=True), runs),
                "cli_auto": timed(lambda: self.cli("status", "--json"), runs),
                "cli_text": timed(lambda: self.cli("status", "--json", fmt="text"), runs),
                "ssh_json": timed(lambda: self.on_login("squeue", "--json"), runs),
                "ssh_text": timed(lambda: self.on_login("squeue", "-h", "-t", "all", "-o", "%i|%T|%r"), runs)}

    def stop(self):
        self.on_login("sh", "-c", "rm -rf ~/.rtrain-bench-* ~/bench-bare-*.out")
        subprocess.run(self.ssh[:-1] + ["-O", "exit", self.ssh[-1]], capture_output=True)
        self.sshd.stop()


def timed(fn, n=5):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--poll", type=float, default=0.05)
    args = ap.parse_args()
    if missing_binaries() or os.geteuid() != 0:
        sys.exit("needs root and Slurm (apt-get install slurmctld slurmd slurm-client munge)")
    tmp = Path(tempfile.mkdtemp(prefix="rtrain-bench-slurm-"))
    os.chmod(tmp, 0o755)  # other users reach the cluster's config and munge socket
    cluster = SlurmCluster(tmp / "cluster")
    (tmp / "cluster").mkdir()
    try:
        cluster.start()
        b = Bench(cluster, tmp, args.poll)
        b.rtrain("true", ("succeeded", "failed", "lost"))  # warm up: the cluster's first jobs
        b.bare("true", ("COMPLETED", "FAILED"))             # are slower than the next ones
        st = {}
        res = {k: [] for k in ("run_rt", "run_agent", "run_bare", "e2e_rt", "e2e_agent", "e2e_bare",
                               "sub_rt", "run_cli", "run_ssh", "e2e_cli", "e2e_ssh", "sub_cli")}
        for i in range(args.runs):
            t, ts, _ = b.rtrain("sleep 2", ("running",))
            res["run_rt"].append(t)
            res["sub_rt"].append(ts)
            res["run_bare"].append(b.bare("sleep 2", ("RUNNING",)))
            res["run_agent"].append(b.rtrain_agent("sleep 2", ("running",)))
            cluster.cancel_all()
            t, _, v = b.rtrain("true", ("succeeded", "failed", "lost"))
            assert v["state"] == "succeeded", v
            res["e2e_rt"].append(t)
            res["e2e_bare"].append(b.bare("true", ("COMPLETED", "FAILED")))
            res["e2e_agent"].append(b.rtrain_agent("true", ("succeeded", "failed", "lost")))
            print("run %d: %s" % (i, {k: round(v[-1], 3) for k, v in res.items() if v}), file=sys.stderr)
        # status of 200 jobs: 100 held tasks of one array, 90 held jobs, 10 finished jobs
        held = b.new_jobs(100, "true")
        slurmjobs.submit(b.home, held, {"sbatch_args": ["--hold"]}, env=b.env)
        for _ in range(90):
            (j,) = b.new_jobs(1, "true")
            slurmjobs.submit(b.home, [j], {"sbatch_args": ["--hold"]}, env=b.env)
            held.append(j)
        ran = []
        for _ in range(10):
            (j,) = b.new_jobs(1, "true")
            slurmjobs.submit(b.home, [j], {}, env=b.env)
            ran.append(j)
        ids = [j["id"] for j in held + ran]
        deadline = time.time() + 60
        while time.time() < deadline:
            v = slurmjobs.status(b.home, [j["id"] for j in ran], env=b.env)
            if all(x["state"] == "succeeded" for x in v.values()):
                break
            time.sleep(0.2)
        user = os.environ.get("USER") or "root"

        def measure(tag):
            st[tag] = {
                "rt_json": timed(lambda: slurmjobs.status(b.home, ids, mode="json", env=b.env)),
                "rt_text": timed(lambda: slurmjobs.status(b.home, ids, mode="text", env=b.env)),
                "agent": timed(lambda: b.agent([["status", {"ids": ids}]])),
                "sq_json": timed(lambda: subprocess.run(["squeue", "--json"], env=b.env,
                                                        capture_output=True, check=True)),
                "sq_text": timed(lambda: subprocess.run(
                    ["squeue", "-h", "-r", "-t", "all", "-u", user, "-o", "%i|%T|%r"],
                    env=b.env, capture_output=True, check=True)),
            }
            views = slurmjobs.status(b.home, ids, env=b.env)
            assert len(views) == 200 and all(x["state"] in ("queued", "succeeded") for x in views.values())
        measure("200")
        # 2,000 held jobs of another user: squeue --json lists them all, whatever the filter
        def other(_):
            subprocess.run(["runuser", "-u", "nobody", "--", "env", "SLURM_CONF=%s" % cluster.conf,
                            "sbatch", "--hold", "-o", "/dev/null", "--wrap", "true"],
                           check=True, capture_output=True, cwd="/tmp")
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(other, range(2000)))
        measure("200+2000 others")
        cluster.stop()
        # through the CLI over ssh, on a fresh cluster (the jobs above stay listed for MinJobAge)
        cluster = SlurmCluster(tmp / "cluster2")
        (tmp / "cluster2").mkdir()
        cluster.start()
        cli = Cli(cluster, tmp, args.poll)
        try:
            cli.follow("true")  # ships the agent
            cli.bare("true", ("COMPLETED", "FAILED"))
            for i in range(args.runs):
                t, ts = cli.rtrain("sleep 5", ("running",))
                res["run_cli"].append(t)
                res["sub_cli"].append(ts)
                res["run_ssh"].append(cli.bare("sleep 5", ("RUNNING",)))
                cluster.cancel_all()
                res["e2e_cli"].append(cli.follow("true"))
                res["e2e_ssh"].append(cli.bare("true", ("COMPLETED", "FAILED")))
                print("cli run %d: %s" % (i, {k: round(res[k][-1], 3) for k in (
                    "run_cli", "run_ssh", "e2e_cli", "e2e_ssh")}), file=sys.stderr)
            st["200, through the CLI over ssh"] = cli.status_200(args.runs)
        finally:
            cli.stop()
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    ms = lambda x: "%7.0f ms" % (x * 1000)  # noqa: E731
    print("Slurm 22.05, single node, 4 GPUs as GRES; %d runs, polls every %.0f ms" % (
        args.runs, args.poll * 1000))
    print("%-40s %10s %10s %8s" % ("one small job", "median", "p95", "ratio"))
    for label, rt, bare in (("submit-to-running, rtrain", "run_rt", "run_bare"),
                            ("submit-to-running, rtrain agent process", "run_agent", "run_bare"),
                            ("submit-to-running, sbatch --wrap", "run_bare", "run_bare"),
                            ("end-to-end, rtrain", "e2e_rt", "e2e_bare"),
                            ("end-to-end, rtrain agent process", "e2e_agent", "e2e_bare"),
                            ("end-to-end, sbatch --wrap + squeue", "e2e_bare", "e2e_bare")):
        print("%-40s %10s %10s %7.2fx" % (label, ms(med(res[rt])), ms(p95(res[rt])),
                                          med(res[rt]) / med(res[bare])))
    print("%-40s %10s" % ("  (rtrain submit call itself)", ms(med(res["sub_rt"]))))
    print("from the laptop, over ssh (bare: OpenSSH with a shared connection)")
    for label, rt, bare in (("submit-to-running, rtrain CLI", "run_cli", "run_ssh"),
                            ("submit-to-running, ssh sbatch + squeue", "run_ssh", "run_ssh"),
                            ("end-to-end, rtrain submit -f", "e2e_cli", "e2e_ssh"),
                            ("end-to-end, ssh sbatch + squeue", "e2e_ssh", "e2e_ssh")):
        print("%-40s %10s %10s %7.2fx" % (label, ms(med(res[rt])), ms(p95(res[rt])),
                                          med(res[rt]) / med(res[bare])))
    print("%-40s %10s" % ("  (rtrain submit -q itself, until sbatch)", ms(med(res["sub_cli"]))))
    for tag, s in st.items():
        print("status of 200 jobs (%s)" % tag)
        rows = (("rtrain status --json, squeue_format auto", "cli_auto", "ssh_json"),
                ("rtrain status --json, squeue_format text", "cli_text", "ssh_json"),
                ("ssh squeue --json", "ssh_json", "ssh_json"),
                ("ssh squeue -o", "ssh_text", "ssh_json"),
                ("(ssh HOST true, a new connection)", "ssh_new", "ssh_json"),
                ("(rtrain --version: the CLI's start-up)", "cli_version", "ssh_json")) if "cli_auto" in s else (
                ("rtrain status, squeue --json", "rt_json", "sq_json"),
                ("rtrain status, text format", "rt_text", "sq_json"),
                ("rtrain status, agent process", "agent", "sq_json"),
                ("bare squeue --json", "sq_json", "sq_json"),
                ("bare squeue -o (this user)", "sq_text", "sq_json"))
        for label, k, base in rows:
            print("  %-40s %10s %7.2fx" % (label, ms(med(s[k])), med(s[k]) / med(s[base])))


if __name__ == "__main__":
    main()
