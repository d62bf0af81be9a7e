"""Every path the agent uses, owned by one object (the submitit JobPaths idea)."""
import os

DEFAULT_HOME = "~/.rtrain"
DEFAULT_LOCK_DIR = "/tmp/rtrain-gpu-locks"


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

    def pid_file(self, job_id):
        return os.path.join(self.job_dir(job_id), "pid.json")

    def cancel_file(self, job_id):
        return os.path.join(self.job_dir(job_id), "cancel")


def lock_dir(requested=None):
    return os.path.abspath(os.path.expanduser(
        requested or os.environ.get("RTRAIN_LOCK_DIR") or DEFAULT_LOCK_DIR))
