"""`shell`: the agent becomes an interactive shell on the host (the client gave the call a
terminal: `ssh -t`, a paramiko pty, or this machine's own), in a job's work dir with its
environment and, while it runs, its GPUs; without a job, a login shell in the home directory."""
import json
import os
import sys

from .. import fsutil, runner, runtime
from ..protocol import AgentError


def shell(ctx):
    sh = runtime.login_shell()
    job_id = ctx.req.get("id")
    if job_id is None:
        os.chdir(os.path.expanduser("~"))
        _exec(sh, [sh, "-l"], dict(os.environ))
    row = ctx.job_row(job_id)
    paths = ctx.home.job(row["id"])
    if not os.path.isdir(paths.work):
        raise AgentError("no_work_dir", "job %d has no work dir yet: it has not started (%s)" % (
            row["id"], row["state"]), "`rtrain status %d` says why it waits" % row["id"])
    job_vars = fsutil.read_json(paths.env)
    gpus = json.loads(row["gpus"] or "[]") if row["state"] == "running" else []
    fixed = runner.fixed_vars(row["id"], gpus) + [("RTRAIN_SHELL", "1")]
    env = runtime.environment(os.environ, runtime.variables(
        runtime.read(ctx.home, row["id"]), job_vars if isinstance(job_vars, dict) else {}, fixed))
    os.chdir(paths.work)
    _exec(sh, [sh, "-i"], env)


def _exec(path, argv, env):
    sys.stdout.flush()
    os.execve(path, argv, env)
