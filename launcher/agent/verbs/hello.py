"""`hello`: what `rtrain hosts` checks: the agent, Python, RTRAIN_HOME, the disk, the daemon."""
import os
import platform
import shutil
import sqlite3
import sys

from .. import daemon, gpus, logind, policy
from ..protocol import PROTOCOL, VERSION, AgentError


def hello(ctx):
    home = ctx.home_root
    writable = True
    problem = ""
    try:
        ctx.home.ensure()
        probe = os.path.join(home, "tmp", ".probe%d" % os.getpid())
        with open(probe, "w") as f:
            f.write("x")
        os.unlink(probe)
    except OSError as e:
        writable, problem = False, "%s" % e.strerror
    try:
        st = os.statvfs(home)
        disk_free = st.f_bavail * st.f_frsize
    except OSError:
        disk_free = None
    database = None
    if writable:
        try:
            ctx.con.execute("SELECT COUNT(*) FROM jobs").fetchone()
        except AgentError as e:
            database = {"message": e.message, "hint": e.hint}
        except sqlite3.Error as e:
            database = {"message": "the job database %s cannot be read (%s)" % (ctx.home.db, e),
                        "hint": "restore it from a backup, or move RTRAIN_HOME aside to start afresh"}
    return {
        "database": database, "logind": logind.state(user_name()),
        "agent_version": VERSION, "protocol": PROTOCOL,
        "python": platform.python_version(), "executable": sys.executable,
        "platform": platform.platform(), "hostname": platform.node(),
        "user": user_name(), "home": home, "home_writable": writable, "home_problem": problem,
        "disk_free": disk_free,
        "nvidia_smi": shutil.which(gpus.base_argv(ctx.settings.nvidia_smi)[0]),
        "daemon_running": writable and daemon.running(ctx.home),
        "autostop": _autostop(ctx) if writable and database is None else None,
        "containers": _containers(ctx) if ctx.req.get("containers") is not None else None,
        "policy": policy.load().summary(),  # the tower's (`rtrain hosts` warns when it is ignored)
    }


def _containers(ctx):
    """The engines and their GPU support (`rtrain hosts`; asked for: it runs the engines)."""
    from .. import containerhost
    try:
        uuids = [u["uuid"] for u in gpus.read(ctx.settings)]
    except gpus.NvidiaSmiError:
        uuids = []
    return containerhost.summary((ctx.req.get("containers") or {}).get("engine"), uuids)


def _autostop(ctx):
    from .. import monitor
    from .watch import push_autostop
    push_autostop(ctx)
    return monitor.summary(ctx.home, started=ctx.monitor_started)


def user_name():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "?")
