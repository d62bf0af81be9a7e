"""Every process a job started, found again wherever it went (docs/design.md "Detached jobs").

A child that calls setsid or double-forks leaves the job's process group, so the group alone
cannot end a job. The job's processes are found:
  - by its cgroup, where the daemon has one to give without root: its own cgroup v2 directory
    when it is ours to write (a delegated subtree: systemd's Delegate=yes, which daemon.spawn
    asks for through `systemd-run --user --scope` where a user manager runs, or an admin's
    chown). The wrapper makes rtrain-JOBTAG in it and starts the command there; nothing the job
    does without meaning to (setsid, double fork, closing every descriptor) leaves it;
  - else (and as well) by a marker every descendant inherits: RTRAIN_JOB_TAG (a hash of the home
    and the job id) in /proc/PID/environ of this user's processes, and by the job's session and
    process group (pid.json).
The lease sockets (leases.py) are inherited too, so the GPU is free only once the last of
these processes is gone. Linux /proc only; elsewhere the process group is all there is.
"""
import hashlib
import os
import signal
import time

TAG_VAR = "RTRAIN_JOB_TAG"
_CGROUP_PREFIX = "rtrain-"


def tag(home_root, job_id):
    h = hashlib.sha256(home_root.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return "%s-%s" % (h, job_id)


# ------------------------------------------------------------------ cgroups

def _cgroup2_mount():
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return None


def delegated_root():
    """The cgroup v2 directory job cgroups can be made in (this process's own, when it is ours
    to write and not the hierarchy's root), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), None)
    except OSError:
        return None
    mount = _cgroup2_mount()
    if not rel or rel == "/" or mount is None:
        return None  # the root: a whole machine's (or container's) tree is not ours to fill
    d = mount + rel
    try:
        if os.stat(d).st_uid != os.getuid() or not os.access(d + "/cgroup.procs", os.W_OK) or \
                not os.access(d, os.W_OK):
            return None
    except OSError:
        return None
    return d


def make_cgroup(job_tag):
    """A fresh cgroup for one job under delegated_root(), or None."""
    root = delegated_root()
    if root is None:
        return None
    path = "%s/%s%s" % (root, _CGROUP_PREFIX, job_tag)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError:
        return None
    return path


def move(path, pid=0):
    """Put pid (0: this process) into the cgroup at path. False if it can't be done."""
    try:
        with open(path + "/cgroup.procs", "w") as f:
            f.write("%d\n" % (pid or os.getpid()))
        return True
    except OSError:
        return False


def cgroup_pids(path):
    try:
        with open(path + "/cgroup.procs") as f:
            return {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        return set()


def remove_cgroup(path):
    """rmdir the job's cgroup once it is empty (True when gone)."""
    if not path:
        return True
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ markers

def _own_pids():
    uid = os.getuid()
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit():
            try:
                if os.stat("/proc/" + name).st_uid == uid:
                    yield int(name)
            except OSError:
                continue


def _stat(pid):
    """(state, pgid, sid, start time in clock ticks) of pid, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        rest = data[data.rfind(b")") + 2:].split()
        return rest[0].decode("ascii", "replace"), int(rest[2]), int(rest[3]), int(rest[19])
    except (OSError, ValueError, IndexError):
        return None


def _authentic(num, start):
    """The job's group (or session) id `num` still names the job's: no process has that pid
    now (it lives on only as the id of the job's other processes, which keeps the kernel from
    giving it out again), or the one that has it is the job's own leader (same start time).
    Otherwise the number was given to a new process, whose group is not the job's."""
    if not num:
        return False
    st = _stat(num)
    return st is None or (start is not None and str(st[3]) == str(start))


def environ_tag(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            env = f.read()
    except OSError:
        return None
    key = TAG_VAR.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(key):
            return item[len(key):].decode("utf-8", "replace")
    return None


def find(job_tag, pids=None, skip_pgid=None):
    """The live processes of the job: in its cgroup, carrying its marker, or in its process
    group or session (pids: its pid.json, see _authentic). Never this process; zombies don't
    count, nor processes of group skip_pgid (being killed)."""
    pids = pids or {}
    me = os.getpid()
    groups = {pids["pgid"]} if _authentic(pids.get("pgid"), pids.get("pgid_start")) else set()
    sessions = {pids["sid"]} if _authentic(pids.get("sid"), pids.get("sid_start")) else set()
    inside = cgroup_pids(pids["cgroup"]) if pids.get("cgroup") else set()
    try:  # a process that started before the job's first one is none of its descendants
        since = int(pids.get("pgid_start") or 0)
    except (TypeError, ValueError):
        since = 0
    found = set()
    for pid in set(_own_pids()) | inside:
        if pid == me:
            continue
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X") or st[1] == skip_pgid:
            continue
        if pid in inside or st[1] in groups or st[2] in sessions or \
                (st[3] >= since and environ_tag(pid) == job_tag):
            found.add(pid)
    return found


def signal_all(job_tag, pids, sig):
    """Send sig to every process of the job once; returns how many there were."""
    found = find(job_tag, pids)
    for p in found:
        _kill(p, sig)
    return len(found)


def end_all(job_tag, pids, timeout=5.0):
    """SIGKILL every process of the job until none is left (a process forked meanwhile carries
    the marker and is found on the next round; stopping them first keeps them from forking).
    True when none is left."""
    deadline = time.monotonic() + timeout
    if pids.get("cgroup") and os.path.exists(pids["cgroup"] + "/cgroup.kill"):
        try:
            with open(pids["cgroup"] + "/cgroup.kill", "w") as f:
                f.write("1\n")
        except OSError:
            pass
    while True:
        found = find(job_tag, pids)
        if not found:
            remove_cgroup(pids.get("cgroup"))
            return True
        if time.monotonic() > deadline:
            return False
        for p in found:
            _kill(p, signal.SIGSTOP)
        for p in found:
            _kill(p, signal.SIGKILL)
        time.sleep(0.02)


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def describe(pids):
    """"pid 12 (python3), pid 13 (sleep)" for a few of pids."""
    out = []
    for p in sorted(pids)[:5]:
        try:
            with open("/proc/%d/comm" % p) as f:
                out.append("pid %d (%s)" % (p, f.read().strip()))
        except OSError:
            out.append("pid %d" % p)
    if len(pids) > 5:
        out.append("%d more" % (len(pids) - 5))
    return ", ".join(out)


# ------------------------------------------------------------------ lease sockets

def socket_inodes(names):
    """{abstract socket name (bytes, leading NUL): set of inodes} from /proc/net/unix."""
    want = {b"@" + n[1:]: n for n in names}
    out = {}
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] in want:
                    out.setdefault(want[parts[7]], set()).add(int(parts[6]))
    except (OSError, ValueError):
        pass
    return out


def socket_users(inodes):
    """{inode: set of this user's pids holding a descriptor on it}."""
    links = {"socket:[%d]" % i: i for i in inodes}
    out = {}
    if not links:
        return out
    for pid in _own_pids():
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target in links:
                out.setdefault(links[target], set()).add(pid)
    return out
