#!/usr/bin/env python3
"""Sync benchmark: `rtrain submit` side by side with `rsync -a` over ssh and `tar c | ssh tar x`,
and with `ssh host true` (new, and over a shared connection) and a bare paramiko connect + exec
of `true`, all in one run against the same real OpenSSH sshd on 127.0.0.1 (started here, as in
tests/integration; needs root and openssh-server, rsync). rtrain uses its default transport
(OpenSSH with connection sharing): a first sync starts from a new RTRAIN_HOME on this machine
too, so its connection is new (cold), as rsync's and tar's; the re-sync and the submits of an
unchanged tree find rtrain's shared connection up (warm), as they would for a user. rsync and
tar are also timed over a shared connection of their own (ControlMaster), for comparison.

  (a) a tree of N files (default 10,000: small .py/.txt/.json/.yaml files in nested folders plus
      a few larger binary files, in a git repository with one commit):
        first sync   rtrain: a fresh RTRAIN_HOME on the host (the agent shipped there before,
                     untimed, and the connection closed again) and a fresh local hash cache each
                     run; rsync and tar: a fresh, empty destination each run
        re-sync      after changing one file (rtrain: same home and cache, so one blob to send)
      Goals (issue 3): re-sync no slower than rsync; first sync within 1.2x of tar over ssh.
  (b) `rtrain submit` of an unchanged tree against a fresh Python process that imports paramiko,
      connects (same key, known_hosts checked), execs `true` and closes. Goal: within 1.5x.
      Also shown: the same submit with a 10-file tree, and OpenSSH's `ssh host true`.

Every rtrain figure is the wall time of a whole `rtrain submit -q -y -- true` process, from start
to the job being queued (it returns once the job is in the host's queue). The job is then waited
for, untimed: the daemon building its private copies must not run during the next measurement.
Medians over --runs.
The host side runs as a user of its own, rtrain-bench (created if missing): the integration
tests' teardown kills every process of their test users, which would cut these runs short.
Usage: python3 bench/sync.py [--files 10000] [--runs 3] [--keep] [--baseline CHECKOUT]
"""
import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

# its own user: the integration tests' teardown kills every process of their test users
USER = "rtrain-bench"

WORDS = ("import torch numpy def return self model data loss optimizer batch epoch config train "
         "eval layer weight bias forward backward step lr scheduler dataset loader tensor cuda "
         "device shape None True False if else for in range len print logging path os sys").split()


# ------------------------------------------------------------------ the tree

def _text(rng, size, head):
    out = [head]
    n = len(head)
    while n < size:
        line = "    " * rng.randint(0, 3) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(line)
        n += len(line) + 1
    return ("\n".join(out) + "\n").encode()


def make_tree(root, n_files, seed=1):
    """n_files files: nested folders of small source/text files (each unique) and 6 larger
    binary ones (1-8 MB). Returns (files, bytes)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    big = [("data/vocab.bin", 1 << 20), ("data/embeddings.npy", 3 << 20), ("assets/logo.png", 1 << 20),
           ("checkpoints/tiny.pt", 8 << 20), ("data/sample.parquet", 2 << 20), ("docs/paper.pdf", 2 << 20)]
    exts = [".py"] * 6 + [".txt", ".json", ".yaml", ".md", ".cfg"]
    total = 0
    small = n_files - len(big)
    dirs = []
    for a in range(max(1, small // 400)):
        for b in range(8):
            dirs.append("pkg%02d/mod%d" % (a, b))
            dirs.append("pkg%02d/mod%d/sub%d" % (a, b, b % 3))
    for i in range(small):
        d = dirs[i % len(dirs)]
        rel = "%s/file_%05d%s" % (d, i, rng.choice(exts))
        size = int(min(64 * 1024, max(80, rng.lognormvariate(7.2, 0.9))))
        data = _text(rng, size, "# %s\n" % rel)
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        total += len(data)
    for rel, size in big:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rng.getrandbits(size * 8).to_bytes(size, "little")
        p.write_bytes(data)
        total += size
    (root / "train.py").write_text("print('training')\n")
    (root / ".gitignore").write_text("__pycache__/\n*.pyc\n")
    total += (root / "train.py").stat().st_size + (root / ".gitignore").stat().st_size
    genv = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x", GIT_COMMITTER_NAME="b",
                GIT_COMMITTER_EMAIL="b@x", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tree"]):
        subprocess.run(["git", "-C", str(root)] + args, check=True, env=genv,
                       stdout=subprocess.DEVNULL)
    return n_files + 2, total


def touch_one(root, k):
    """Change one small file (a new version each call)."""
    p = root / "pkg00" / "mod0" / "file_00000.py"
    with open(p, "a") as f:
        f.write("# edit %d\n" % k)


# ------------------------------------------------------------------ timing helpers

def timed(argv, env=None, cwd=None, stdin=None):
    t = time.perf_counter()
    p = subprocess.run(argv, env=env, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit("%s failed (%d):\n%s\n%s" % (" ".join(map(str, argv)), p.returncode,
                                                      p.stdout.decode(), p.stderr.decode()))
    return dt, p.stdout.decode()


class Bench:
    def __init__(self, sshd, work):
        self.sshd = sshd
        self.work = work
        self.ssh = ["ssh", "-F", "/dev/null", "-p", str(sshd.port), "-i", str(sshd.user_key),
                    "-o", "UserKnownHostsFile=%s" % sshd.known_hosts, "-o", "StrictHostKeyChecking=yes",
                    "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ControlMaster=no",
                    "-o", "ControlPath=none"]
        self.target = "%s@127.0.0.1" % USER
        self.mux_path = str(work / "mux")
        self.ssh_mux = [a if a != "ControlPath=none" else "ControlPath=" + self.mux_path for a in self.ssh]
        self.n = 0
        self.remote_dirs = []

    def remote_dir(self, kind):
        self.n += 1
        d = "bench-%s-%d-%d" % (kind, os.getpid(), self.n)
        self.remote_dirs.append(d)
        return d

    # rtrain
    def rtrain_world(self, repo=None):
        """A fresh remote RTRAIN_HOME (new hosts.yaml) and a fresh local hash cache; `repo`:
        the rtrain checkout to run (default this one)."""
        self.n += 1
        d = self.work / ("rt-%d" % self.n)
        d.mkdir()
        hosts = self.sshd.hosts_yaml(d / "hosts.yaml", {"tower": (USER, self.sshd.port)})
        home = [ln.split(":", 1)[1].strip() for ln in hosts.read_text().splitlines()
                if ln.strip().startswith("home:")][0]
        self.remote_dirs.append(home.replace("~/", ""))
        env = self.sshd.env(XDG_CACHE_HOME=str(d / "cache"), RTRAIN_HOME=str(d / "local-home"))
        # as installed: Python keeps rtrain's bytecode (pip compiles it); the warm-up writes it
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if repo:
            env["PYTHONPATH"] = str(repo)
        # the agent is on the host already (shipping it is a once-per-host cost, not the tree's),
        # and the connection is cold again, as tar's and rsync's are
        rt = [sys.executable, "-m", "launcher", "--hosts", str(hosts)]
        timed(rt + ["status"], env=env, cwd=str(self.work))
        if os.path.exists(os.path.join(str(repo or REPO), "launcher", "openssh.py")):
            timed(rt + ["hosts", "--disconnect"], env=env, cwd=str(self.work))
        return hosts, env

    def rtrain_submit(self, src, world):
        hosts, env = world
        dt, out = timed([sys.executable, "-m", "launcher", "--hosts", str(hosts), "submit", "-q", "-y",
                         "--", "true"], env=env, cwd=src)
        assert out.strip().isdigit(), out
        self.settle(world, out.strip())
        return dt

    def settle(self, world, job_id, limit_s=120):
        """Wait (untimed) until the job has ended: the host's daemon builds each job's private
        copies of the tree after the submit returns, and that work must not run during the next
        measurement (a user edits between two submits; rsync leaves no such work behind)."""
        hosts, env = world
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            _, out = timed([sys.executable, "-m", "launcher", "--hosts", str(hosts), "status", "--json",
                            job_id], env=env, cwd=str(self.work))
            if json.loads(out)["state"] not in ("queued", "running"):
                return
            time.sleep(0.2)
        raise SystemExit("job %s did not end within %d s" % (job_id, limit_s))

    # a shared connection for rsync and tar (the `_mux` figures)
    def start_master(self):
        subprocess.run(self.ssh_mux + ["-M", "-N", "-f", self.target], check=True)

    def stop_master(self):
        subprocess.run(["ssh", "-o", "ControlPath=" + self.mux_path, "-O", "exit", "x"], capture_output=True)

    # rsync
    def rsync(self, src, dest, mux=False):
        ssh = self.ssh_mux if mux else self.ssh
        return timed(["rsync", "-a", "--exclude=/.git", "-e", " ".join(shlex.quote(a) for a in ssh),
                      str(src) + "/", "%s:%s/" % (self.target, dest)])[0]

    # tar
    def tar(self, src, dest, mux=False):
        t = time.perf_counter()
        tar = subprocess.Popen(["tar", "-c", "-C", str(src), "--exclude=./.git", "."],
                               stdout=subprocess.PIPE)
        ssh = subprocess.Popen((self.ssh_mux if mux else self.ssh) + [self.target, "mkdir -p %s && tar -x -C %s" % (
            shlex.quote(dest), shlex.quote(dest))], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        tar.stdout.close()
        rc1, rc2 = tar.wait(), ssh.wait()
        if rc1 or rc2:
            raise SystemExit("tar | ssh tar x failed: %s %s" % (rc1, rc2))
        return time.perf_counter() - t

    def ssh_true(self, mux=False):
        return timed((self.ssh_mux if mux else self.ssh) + [self.target, "true"])[0]

    def paramiko_true(self):
        code = (
            "import paramiko\n"
            "c = paramiko.SSHClient()\n"
            "c.load_host_keys(%r)\n"
            "c.set_missing_host_key_policy(paramiko.RejectPolicy())\n"
            "c.connect('127.0.0.1', port=%d, username=%r, key_filename=%r, allow_agent=False,"
            " look_for_keys=False)\n"
            "ch = c.get_transport().open_session()\n"
            "ch.exec_command('true')\n"
            "assert ch.recv_exit_status() == 0\n"
            "c.close()\n") % (str(self.sshd.known_hosts), self.sshd.port, USER, str(self.sshd.user_key))
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return timed([sys.executable, "-c", code], env=env)[0]

    def cleanup(self):
        self.stop_master()
        from launcher.openssh import close_master
        for d, _, files in os.walk(str(self.work)):
            for f in files:
                p = os.path.join(d, f)
                if "local-home" in p and os.path.basename(d) == "ssh" and not f.startswith("config"):
                    close_master("ssh", p)
        for d in self.remote_dirs:
            full = Path("/home") / USER / d
            lock = full / "daemon.lock"
            try:
                pid = int(json.loads(lock.read_text() or "{}").get("pid") or 0)
                if pid:
                    os.kill(pid, 9)
            except (OSError, ValueError, AttributeError):
                pass
            shutil.rmtree(str(full), ignore_errors=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (median)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (sshd logs, the tree)")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also time the rtrain of another checkout (e.g. `git archive HEAD | tar x "
                         "-C /tmp/base`), in the same run, as a column of its own")
    args = ap.parse_args()
    for tool in ("rsync", "ssh", "tar", "git"):
        if not shutil.which(tool):
            raise SystemExit("%s not found (bash tests/setup.sh installs what is needed)" % tool)
    if os.geteuid() != 0:
        raise SystemExit("bench/sync.py starts sshd for a test user: run it as root")
    import conftest
    import fakesmi
    conftest._ensure_users()
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", USER], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="rtrain-bench-sync-"))
    os.chmod(str(work), 0o755)
    (work / "sshd").mkdir()
    sshd = conftest.Sshd(work / "sshd")
    fakesmi.install(sshd.bin_dir, gpus=1)
    shutil.copyfile(str(sshd.root / "authkeys" / "root"), str(sshd.root / "authkeys" / USER))
    b = Bench(sshd, work)
    try:
        src = work / "tree"
        nfiles, nbytes = make_tree(src, args.files)
        small = work / "small"
        make_tree_small(small)
        # warm up: page cache, sshd, python's bytecode caches
        b.ssh_true()
        b.paramiko_true()
        b.rtrain_submit(small, b.rtrain_world())
        rtrains = [("rt", None)] + ([("base", args.baseline)] if args.baseline else [])
        if args.baseline:
            b.rtrain_submit(small, b.rtrain_world(args.baseline))
        r = {k: [] for k in ("rs_first", "rs_re", "tar_first", "pm_true", "ssh_true",
                             "rs_first_mux", "rs_re_mux", "tar_first_mux", "mux_true")}
        b.start_master()
        for tag, _ in rtrains:
            for k in ("first", "re", "same", "small"):
                r["%s_%s" % (tag, k)] = []
        edits = 0
        for _ in range(args.runs):
            d = b.remote_dir("tar")
            r["tar_first"].append(b.tar(src, d))
            d = b.remote_dir("rsync")
            r["rs_first"].append(b.rsync(src, d))
            edits += 1
            touch_one(src, edits)
            r["rs_re"].append(b.rsync(src, d))
            d = b.remote_dir("tar")
            r["tar_first_mux"].append(b.tar(src, d, mux=True))
            d = b.remote_dir("rsync")
            r["rs_first_mux"].append(b.rsync(src, d, mux=True))
            edits += 1
            touch_one(src, edits)
            r["rs_re_mux"].append(b.rsync(src, d, mux=True))
            for tag, repo in rtrains:
                world = b.rtrain_world(repo)
                r[tag + "_first"].append(b.rtrain_submit(src, world))
                edits += 1
                touch_one(src, edits)
                r[tag + "_re"].append(b.rtrain_submit(src, world))
                for _ in range(2):
                    r[tag + "_same"].append(b.rtrain_submit(src, world))
                    if tag == "rt":
                        r["pm_true"].append(b.paramiko_true())
                sw = b.rtrain_world(repo)
                b.rtrain_submit(small, sw)
                r[tag + "_small"].append(b.rtrain_submit(small, sw))
            r["ssh_true"].append(b.ssh_true())
            r["mux_true"].append(b.ssh_true(mux=True))
    finally:
        b.cleanup()
        sshd.stop()
        if args.keep:
            print("kept %s" % work)
        else:
            shutil.rmtree(str(work), ignore_errors=True)
    report(args, nfiles, nbytes, {k: med(v) for k, v in r.items()}, r)


def make_tree_small(root):
    root.mkdir()
    for i in range(10):
        (root / ("f%d.py" % i)).write_text("print(%d)\n" % i)


def report(args, nfiles, nbytes, m, raw):
    def ms(x):
        return "%8.0f ms" % (x * 1000)
    base = bool(args.baseline)
    print("sync benchmark, %s, %d CPUs, sshd on 127.0.0.1 (ed25519 key), medians of %d runs" % (
        time.strftime("%Y-%m-%d"), os.cpu_count(), args.runs))
    print("tree: %d files, %.1f MB, git repo (.git not sent by any tool)" % (nfiles, nbytes / 1e6))
    if base:
        print("baseline: the rtrain in %s" % args.baseline)
    print()
    def b(k):
        return ("%11s" % ms(m["base_" + k])) if base else ""
    bh = "%11s" % "baseline" if base else ""
    print("%-30s %11s%s %11s %11s   %s" % ("(a) tree sync", "rtrain", bh, "rsync -a", "tar|ssh", "ratio (goal)"))
    print("%-30s %11s%s %11s %11s   %.2fx of tar (<= 1.2x)" % (
        "first sync (cold)", ms(m["rt_first"]), b("first"), ms(m["rs_first"]), ms(m["tar_first"]),
        m["rt_first"] / m["tar_first"]))
    print("%-30s %11s%s %11s %11s   %.2fx of rsync (<= 1.0x)" % (
        "re-sync, one file changed", ms(m["rt_re"]), b("re"), ms(m["rs_re"]), "-", m["rt_re"] / m["rs_re"]))
    print("%-30s %11s%s %11s %11s   %.2fx of tar" % (
        "  ...rsync/tar over a master", "", " " * len(b("first")), ms(m["rs_first_mux"]),
        ms(m["tar_first_mux"]), m["rt_first"] / m["tar_first_mux"]))
    print("%-30s %11s%s %11s %11s   %.2fx of rsync" % (
        "  ...re-sync over a master", "", " " * len(b("first")), ms(m["rs_re_mux"]), "-",
        m["rt_re"] / m["rs_re_mux"]))
    print()
    print("%-30s %11s%s %11s   %s" % ("(b) nothing to send", "rtrain", bh, "paramiko", "ratio (goal)"))
    print("%-30s %11s%s %11s   %.2fx (<= 1.5x)" % (
        "submit, unchanged %d files" % nfiles, ms(m["rt_same"]), b("same"), ms(m["pm_true"]),
        m["rt_same"] / m["pm_true"]))
    print("%-30s %11s%s %11s   %.2fx" % ("submit, unchanged 10 files", ms(m["rt_small"]), b("small"),
                                        ms(m["pm_true"]), m["rt_small"] / m["pm_true"]))
    print("%-30s %11s" % ("OpenSSH `ssh host true`", ms(m["ssh_true"])))
    print("%-30s %11s   rtrain unchanged %d files: %.2fx" % (
        "  ...over a master", ms(m["mux_true"]), nfiles, m["rt_same"] / m["mux_true"]))
    print()
    print("what each does:")
    print("  rtrain    `rtrain submit -q -y -- true` as a fresh process: git ls-files, hash (local cache),")
    print("            one ssh session (OpenSSH; a new connection for a first sync, rtrain's shared one")
    print("            after), agent: check/receive blobs (verified, flushed), queue the job; time until")
    print("            it is queued (the daemon builds the job's private copies after)")
    print("  rsync -a  `rsync -a --exclude=/.git -e ssh` into a fresh folder (first) / the same one (re-sync)")
    print("  tar|ssh   `tar -c --exclude=./.git . | ssh host 'mkdir -p D && tar -x -C D'`, fresh folder")
    print("  paramiko  `python3 -c 'import paramiko; connect; exec true; close'` (known_hosts checked)")
    print("  ssh: OpenSSH client, same ed25519 key, -F /dev/null, no ControlMaster")
    print()
    print("raw (ms): " + "; ".join("%s %s" % (k, " ".join("%.0f" % (x * 1000) for x in v))
                                   for k, v in sorted(raw.items())))


if __name__ == "__main__":
    main()
