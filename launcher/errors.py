"""One base error with a hint, and the exit codes the CLI uses."""

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl-C (and `logs -f` detached): 128 + SIGINT, as shells report it


class RtrainError(Exception):
    """An error the user can act on: one line of message, one line of hint."""

    exit_code = EXIT_ERROR

    def __init__(self, message, hint=""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self):
        return self.message


class ConfigError(RtrainError):
    """hosts.yaml is missing, malformed or names something unknown."""


class HostError(RtrainError):
    """A host cannot be reached, refuses us, or lacks what the agent needs."""

    def __init__(self, host, message, hint="", check=None, permanent=False):
        super().__init__("%s: %s" % (host, message), hint)
        self.host = host
        self.detail = message  # without the host's name
        self.check = check     # which `rtrain hosts` check failed: None (ssh), "python", "disk"
        self.permanent = permanent  # trying again unchanged cannot help (a host key, no python)
        self.request_sent = False   # set by AgentClient.exchange: the agent had the whole request


class JobNotFound(RtrainError):
    pass


class SyncError(RtrainError):
    """The tree changed while it was read or sent, or git could not list it."""


class AgentReplyError(RtrainError):
    """The agent answered with an error reply (see agent/protocol.py)."""

    def __init__(self, host, code, message, hint="", data=None):
        super().__init__("%s: %s" % (host, message) if host else message, hint)
        self.host = host
        self.code = code
        self.data = data
