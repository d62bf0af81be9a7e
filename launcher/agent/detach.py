"""Start an agent verb as a process of its own (the daemon, the monitor, the webhook sender):
its own session, so it outlives the ssh connection that started it; its output to its log; its
request (`{"home"}`) on stdin. Standard library only."""
import json
import os
import subprocess

from . import jobprocs


def environment(home):
    """The environment of a process of the agent's own (not of a job it may be started from)."""
    env = dict(os.environ, RTRAIN_HOME=home.root)
    env.pop(jobprocs.TAG_VAR, None)  # started from inside a job: it is not that job's process
    return env


def start(argv, verb, home, log_path):
    """Run `argv + [verb]` detached for RTRAIN_HOME `home` (a paths.Home)."""
    env = environment(home)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        p = subprocess.Popen(list(argv) + [verb], stdin=subprocess.PIPE, stdout=log, stderr=log,
                             start_new_session=True, close_fds=True, env=env)
        p.stdin.write(json.dumps({"home": home.root}).encode() + b"\n")
        p.stdin.close()
    finally:
        os.close(log)
