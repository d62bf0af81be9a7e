"""The agent's verbs, one module each (docs/contracts.md): VERBS maps a verb's name to its
function, which takes a Context (context.py) and returns the reply's result."""
import sys

from . import files, gpus, hello, logs, prune, shell, status, submit, usage, watch


def daemon(ctx):
    """Run this user's scheduler daemon (daemon.py) until it is idle; started by poke()."""
    from .. import daemon as daemon_mod
    code = daemon_mod.Daemon(ctx.home, ctx.agent_argv).serve()
    sys.exit(code or 0)


def notify_sender(ctx):
    """Deliver the queued notifications, then exit (notify.py; started by notify.start_sender)."""
    from .. import notify
    notify.deliver(ctx.home)
    sys.exit(0)


VERBS = {
    "hello": hello.hello, "gpus": gpus.gpus_verb, "submit": submit.submit, "status": status.status,
    "cancel": status.cancel, "logs": logs.logs, "outputs": files.outputs, "read": files.read,
    "daemon": daemon, "prune": prune.prune, "notify": notify_sender, "autostop": watch.autostop_verb,
    "monitor": watch.monitor_verb, "shell": shell.shell, "usage": usage.usage,
}


def _by_backend(name, fn):
    """The verb as the backend of its request runs it (backends.py: Slurm has its own submit,
    cancel, gpus and hello)."""
    def verb(ctx):
        return ctx.backend.verb(name, fn)(ctx)
    verb.__doc__ = fn.__doc__
    return verb


VERBS = {name: _by_backend(name, fn) for name, fn in VERBS.items()}
