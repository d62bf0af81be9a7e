"""`autostop` (see or change the host's autostop, which hosts.yaml sets) and `monitor` (run the
watcher: monitor.py)."""
import sys

from .. import autostop, monitor
from ..protocol import AgentError


def push_autostop(ctx, change=None):
    """Record what hosts.yaml says of autostop (every request that carries it) and start the
    monitor if it is wanted. Returns the record."""
    req = ctx.req
    rec = None
    if "autostop" in req or change is not None:
        try:
            rec = monitor.push(ctx.home, req.get("autostop"), req.get("settings"), change)
        except autostop.AutostopError as e:
            raise AgentError("bad_request", str(e), "fix `autostop:` for this host in hosts.yaml")
    ctx.monitor_started = monitor.ensure(ctx.home, ctx.con, ctx.agent_argv)
    return rec if rec is not None else monitor.config(ctx.home)


def autostop_verb(ctx):
    """`change`: {"cancel": true} turns it off; {"idle": S, "command": C} changes it (a command
    is needed where none is set yet). Without `change`: what it will do, and when."""
    change = ctx.req.get("change")
    if change is not None:
        current = monitor.config(ctx.home).get("config") or {}
        if change.get("cancel"):
            cfg = None
        else:
            merged = dict(current)
            for key in ("idle", "command", "warn", "gpu_util_busy", "sessions"):
                if change.get(key) is not None:
                    merged[key] = change[key]
            if not merged.get("command"):
                raise AgentError("bad_request", "autostop has no stop command on this host yet",
                                 "give one: rtrain autostop HOST --idle 30m --command 'sudo shutdown -h now', "
                                 "or set autostop.command in hosts.yaml")
            try:
                cfg = autostop.check(merged)
            except autostop.AutostopError as e:
                raise AgentError("bad_request", str(e))
        push_autostop(ctx, {"config": cfg})
    else:
        push_autostop(ctx)
    return monitor.summary(ctx.home, started=ctx.monitor_started)


def monitor_verb(ctx):
    code = monitor.Monitor(ctx.home).serve()
    sys.exit(code or 0)
