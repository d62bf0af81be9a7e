"""Every path the agent uses: RTRAIN_HOME (Home), one job's folder (JobPaths), the GPU lease dir."""
import collections
import os
import stat

DEFAULT_HOME = "~/.rtrain"

# A job's folder, jobs/N/, and what it holds (JobPaths names them):
JOB_FILES = (
    ("dir", None),                       # the folder itself
    ("manifest", "manifest.json"),       # its snapshot: paths, hashes, modes (docs/contracts.md)
    ("work", "work"),                    # private copies of the snapshot: the job's cwd
    ("build_error", "build-error.json"),  # why its work dir could not be built
    ("env", "env.json"),                 # --env values, 0600: never in the job database
    ("notify", "notify.json"),           # where to tell of its end (a webhook URL: a secret), 0600
    ("stall", "stall.json"),             # when its GPUs idle this long, say so (monitor.py)
    ("log", "log"),                      # stdout and stderr, byte for byte
    ("pids", "pid.json"),                # its wrapper and process group (a new daemon adopts them)
    ("cancel", "cancel"),                # there once it was asked to stop
    ("exit_pending", "exit.pending"),    # the room its exit record is written into
    ("exit", "exit.json"),               # its exit code or signal, written by its wrapper
)


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
        self.config = os.path.join(root, "config.json")  # settings before they were per job
        self.gpu_inventory = os.path.join(root, "gpus.json")
        self.daemon_lock = os.path.join(root, "daemon.lock")
        self.daemon_fifo = os.path.join(root, "daemon.fifo")
        self.daemon_log = os.path.join(root, "daemon.log")
        self.tmp = os.path.join(root, "tmp")

    def open_db(self):
        """The job database (db.py), migrated if an older agent made it."""
        from . import db, settings
        return db.connect(self.db, lambda: settings.from_legacy_config(self.config).to_dict())

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

    def job(self, job_id):
        """Every path of job `job_id` (JobPaths)."""
        return JobPaths(os.path.join(self.jobs, str(job_id)))


class JobPaths(collections.namedtuple("JobPaths", [name for name, _ in JOB_FILES])):
    """The files of one job's folder, jobs/N/ (the submitit JobPaths idea): `dir` the folder,
    the others as JOB_FILES says."""

    __slots__ = ()

    def __new__(cls, folder):
        return super(JobPaths, cls).__new__(cls, *(
            folder if rel is None else os.path.join(folder, rel) for _, rel in JOB_FILES))


def lock_dir(requested=None):
    """hosts.yaml's lock_dir, else $RTRAIN_LOCK_DIR, else the tower policy's, else the default."""
    if not requested and not os.environ.get("RTRAIN_LOCK_DIR"):
        from . import policy
        pol = policy.load()
        requested = pol.lock_dir if pol.active else None
    return os.path.abspath(os.path.expanduser(
        requested or os.environ.get("RTRAIN_LOCK_DIR") or DEFAULT_LOCK_DIR))
