"""Every path the agent uses, owned by one object (the submitit JobPaths idea)."""
import os
import stat

DEFAULT_HOME = "~/.rtrain"


def _default_lock_dir():
    """Where this host's GPU lease files live by default: /run/lock where that is a root-owned
    sticky world-writable dir (tmpfs on Debian, Ubuntu, Fedora, Arch: systemd-tmpfiles does not
    age it, while it deletes files in /tmp untouched for 10 days, a lease file under a long job
    included), else /tmp. Root owns both, so no user can delete another's leases (a dir made by
    the first user would be theirs: leases.py refuses that) and there is nothing to set up."""
    try:
        st = os.lstat("/run/lock")
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and \
            st.st_mode & (stat.S_IWOTH | stat.S_ISVTX) == stat.S_IWOTH | stat.S_ISVTX:
        return "/run/lock"
    return "/tmp"


DEFAULT_LOCK_DIR = _default_lock_dir()


def resolve_home(requested=None):
    return os.path.abspath(os.path.expanduser(requested or os.environ.get("RTRAIN_HOME") or DEFAULT_HOME))


class Home:
    """RTRAIN_HOME on this host: private to its user (mode 0700)."""

    def __init__(self, root):
        self.root = root
        self.db = os.path.join(root, "jobs.sqlite")
        self.store = os.path.join(root, "store")
        self.jobs = os.path.join(root, "jobs")
        self.config = os.path.join(root, "config.json")
        self.gpu_inventory = os.path.join(root, "gpus.json")
        self.daemon_lock = os.path.join(root, "daemon.lock")
        self.daemon_fifo = os.path.join(root, "daemon.fifo")
        self.daemon_log = os.path.join(root, "daemon.log")
        self.tmp = os.path.join(root, "tmp")

    def ensure(self):
        old = os.umask(0o077)
        try:
            for d in (self.root, self.store, self.jobs, self.tmp):
                os.makedirs(d, mode=0o700, exist_ok=True)
            if os.stat(self.root).st_mode & 0o077:
                os.chmod(self.root, 0o700)
        finally:
            os.umask(old)
        return self

    def job_dir(self, job_id):
        return os.path.join(self.jobs, str(job_id))

    def work(self, job_id):
        return os.path.join(self.job_dir(job_id), "work")

    def log(self, job_id):
        return os.path.join(self.job_dir(job_id), "log")

    def exit_file(self, job_id):
        return os.path.join(self.job_dir(job_id), "exit.json")

    def env_file(self, job_id):
        """The job's --env values: here (0600), never in the job database (DESIGN.md 8)."""
        return os.path.join(self.job_dir(job_id), "env.json")

    def pid_file(self, job_id):
        return os.path.join(self.job_dir(job_id), "pid.json")

    def cancel_file(self, job_id):
        return os.path.join(self.job_dir(job_id), "cancel")


def lock_dir(requested=None):
    return os.path.abspath(os.path.expanduser(
        requested or os.environ.get("RTRAIN_LOCK_DIR") or DEFAULT_LOCK_DIR))
