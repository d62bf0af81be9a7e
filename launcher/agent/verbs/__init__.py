"""The agent's verbs, one module each (docs/contracts.md): VERBS maps a verb's name to its
function, which takes a Context (context.py) and returns the reply's result. A verb's module is
imported when the verb is called, not before: an agent process runs one verb, and the others'
imports (urllib for notify, the daemon's) would only add to its start-up (docs/design.md
"Stdlib agent")."""
import importlib
import sys


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


# verb -> (module of this package, function); None: defined above
_WHERE = {
    "hello": ("hello", "hello"), "gpus": ("gpus", "gpus_verb"), "submit": ("submit", "submit"),
    "status": ("status", "status"), "cancel": ("status", "cancel"), "logs": ("logs", "logs"),
    "outputs": ("files", "outputs"), "read": ("files", "read"), "daemon": (None, "daemon"),
    "prune": ("prune", "prune"), "notify": (None, "notify_sender"), "autostop": ("watch", "autostop_verb"),
    "monitor": ("watch", "monitor_verb"), "shell": ("shell", "shell"), "usage": ("usage", "usage"),
}


def _function(name):
    module, attr = _WHERE[name]
    if module is None:
        return globals()[attr]
    return getattr(importlib.import_module("." + module, __name__), attr)


def _by_backend(name):
    """The verb as the backend of its request runs it (backends.py: Slurm has its own submit,
    cancel, gpus and hello)."""
    def verb(ctx):
        return ctx.backend.verb(name, _function(name))(ctx)
    verb.__name__ = name
    return verb


VERBS = {name: _by_backend(name) for name in _WHERE}
