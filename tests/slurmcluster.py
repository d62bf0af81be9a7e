"""A real single-node Slurm (munged + slurmctld + slurmd) with fake GPUs as GRES, for the tests
and benchmarks. Everything (config, munge key and socket, state, spool, logs, pids, device nodes)
lives under one folder; the ports are free ones picked at start, so it runs beside another
cluster on the same machine. Needs root (munged and slurmd run as root) and the Debian packages
slurmctld, slurmd, slurm-client and munge (tests/setup.sh installs them).

Facts it is built on (Slurm 22.05, Debian 12):
- slurmctld insists that SlurmctldHost is its own short host name.
- GRES GPUs need `File=` character devices: slurmd drops file-less GPUs, and with regular files
  the job gets no CUDA_VISIBLE_DEVICES. Fake nodes (mknod c 195 N, no driver behind them: slurmd
  only stat()s them) give Slurm's full behaviour.
- No slurmdbd, so no sacct and no AccountingStorageTRES; finished jobs stay visible to squeue and
  `scontrol show job` for MinJobAge seconds.
- A client can hang on a cluster that is not up: every call here has a timeout.
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


def _which(name):
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


def missing_binaries():
    return [b for b in BINARIES if not _which(b)]


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _free_ports(n):
    """n distinct free loopback ports (all held open at once, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """One node `node1` with `gpus` GPUs as GRES and `cpus` CPUs, partition `gpu` (default) and
    partition `short` (MaxTime 1 minute)."""

    def __init__(self, root, gpus=4, cpus=8, name="rtraintest", extra_conf=()):
        self.root = Path(root)
        self.extra_conf = list(extra_conf)  # more slurm.conf lines (partitions, preemption...)
        self.gpus = gpus
        self.cpus = cpus
        self.name = name
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.ctld_port, self.slurmd_port = _free_ports(2)
        self.started = False

    # -- environment of a client of this cluster
    def env(self, base=None):
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *argv, check=True, timeout=20, env=None, **kw):
        p = subprocess.run([str(a) for a in argv], env=env or self.env(), capture_output=True,
                           text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError("%s -> %d: %s" % (" ".join(map(str, argv)), p.returncode, p.stderr))
        return p

    def _write_config(self):
        r = self.root
        for d in ("state", "spool", "log", "munge", "dev"):
            (r / d).mkdir(exist_ok=True)
        # Clients (any user running sbatch/squeue) read the config and reach the munge socket.
        for d in (r, r / "munge", r / "dev"):
            os.chmod(d, 0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for i in range(self.gpus):
            dev = r / "dev" / ("nvidia%d" % i)
            if not dev.exists():
                os.mknod(str(dev), 0o666 | 0o020000, os.makedev(195, i))
                os.chmod(dev, 0o666)
        self.conf.write_text("\n".join([
            "ClusterName=%s" % self.name,
            "SlurmctldHost=%s(127.0.0.1)" % self.host,
            "SlurmctldPort=%d" % self.ctld_port,
            "SlurmdPort=%d" % self.slurmd_port,
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            "AuthInfo=socket=%s" % (r / "munge" / "munge.socket"),
            "StateSaveLocation=%s" % (r / "state"),
            "SlurmdSpoolDir=%s" % (r / "spool"),
            "SlurmctldPidFile=%s" % (r / "slurmctld.pid"),
            "SlurmdPidFile=%s" % (r / "slurmd.pid"),
            "SlurmctldLogFile=%s" % (r / "log" / "slurmctld.log"),
            "SlurmdLogFile=%s" % (r / "log" / "slurmd.log"),
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "MpiDefault=none", "SwitchType=switch/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # Schedule at once on every event (the defaults batch them for a busy cluster).
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,default_queue_depth=1000",
            "GresTypes=gpu", "ReturnToService=2", "SlurmdParameters=config_overrides",
            "MinJobAge=3600", "MaxJobCount=100000", "MessageTimeout=5",
            "KillWait=5",
            # refuse at submit what a partition's limits forbid, as most sites do
            "EnforcePartLimits=ALL",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            "JobCompLoc=%s" % (r / "log" / "jobcomp.txt"),
            "NodeName=node1 NodeAddr=127.0.0.1 NodeHostname=%s CPUs=%d RealMemory=8000 Gres=gpu:%d"
            " State=UNKNOWN" % (self.host, self.cpus, self.gpus),
            "PartitionName=gpu Nodes=node1 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "PartitionName=short Nodes=node1 MaxTime=1 State=UP OverSubscribe=NO",
            ] + self.extra_conf + [""]))
        files = "nvidia[0-%d]" % (self.gpus - 1) if self.gpus > 1 else "nvidia0"
        (r / "gres.conf").write_text("AutoDetect=off\nNodeName=node1 Name=gpu File=%s\n" % (
            r / "dev" / files))
        (r / "cgroup.conf").write_text("# unused: proctrack/linuxproc + task/none\n")

    def start(self, timeout=30):
        self._write_config()
        r = self.root
        subprocess.run([_which("munged"), "--force", "--key-file=%s" % (r / "munge" / "munge.key"),
                        "--socket=%s" % (r / "munge" / "munge.socket"),
                        "--pid-file=%s" % (r / "munge" / "munged.pid"),
                        "--log-file=%s" % (r / "log" / "munged.log"),
                        "--seed-file=%s" % (r / "munge" / "munged.seed")],
                       check=True, capture_output=True, timeout=20)
        self.started = True
        env = self.env()
        # Both daemonize; -N: the NodeName this slurmd acts as.
        subprocess.run([_which("slurmctld"), "-f", str(self.conf)], check=True, env=env,
                       capture_output=True, timeout=20)
        subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", "node1"], check=True,
                       env=env, capture_output=True, timeout=20)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self._alive("slurmctld.pid"):
                raise RuntimeError("slurmctld died: %s" % self.tail_log("slurmctld.log"))
            try:
                p = self.run(_which("sinfo"), "-h", "-n", "node1", "-o", "%t", check=False, timeout=3)
                if p.stdout.strip() in ("idle", "mix", "alloc"):
                    return self
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        raise RuntimeError("slurm did not come up in %ss: %s\n%s" % (
            timeout, self.tail_log("slurmctld.log"), self.tail_log("slurmd.log")))

    def tail_log(self, name, n=5):
        try:
            return "".join((self.root / "log" / name).read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return "(no %s)" % name

    def _pid(self, name):
        try:
            return int((self.root / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, name):
        pid = self._pid(name)
        if not pid:
            return False
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    def cancel_all(self, timeout=15):
        """Cancel every job and wait until none runs (their slurmstepd are gone with them)."""
        p = self.run(_which("squeue"), "-h", "-o", "%i", check=False)
        ids = [x.split("_")[0] for x in p.stdout.split()]
        if ids:
            self.run(_which("scancel"), *sorted(set(ids)), check=False)
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = self.run(_which("squeue"), "-h", "-t", "PD,R,CG,S", "-o", "%i", check=False)
            if p.returncode != 0 or not p.stdout.strip():
                return
            time.sleep(0.2)

    def stop(self):
        if not self.started:
            return
        try:
            self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass
        for name in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            pid = self._pid(name)
            if not pid:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                continue
            deadline = time.time() + 5
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.05)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.started = False
