"""How the client reaches an agent: the Transport protocol and the local transport.

A transport knows one host. It starts the agent as a process (`python3 AGENT VERB`)
and hands back an AgentProcess: bytes in on stdin, JSON lines out on stdout.
The framing and error mapping live in agentclient.py, shared by every transport;
the SSH transports (openssh.py, the default; paramiko_transport.py) implement the same few
methods over the system `ssh` client and over paramiko (docs/contracts.md, "Transports").
"""
import os
import socket
import subprocess
import sys


class AgentProcess:
    """A running agent call. Subclasses wrap a subprocess or an SSH channel."""

    def write(self, data):
        raise NotImplementedError

    def close_stdin(self):
        raise NotImplementedError

    def readline(self):
        """One line of stdout as bytes (b'' at EOF)."""
        raise NotImplementedError

    def wait(self):
        """Exit status; after it, stderr() holds what the process wrote there."""
        raise NotImplementedError

    def stderr(self):
        raise NotImplementedError

    def kill(self):
        raise NotImplementedError


class Transport:
    """One host. `name` is the host's name in hosts.yaml ('local' for this machine)."""

    name = "?"
    kind = "?"

    def agent_home(self):
        """RTRAIN_HOME on the host as the agent should see it (may start with ~)."""
        raise NotImplementedError

    def ensure_agent(self, blob, digest):
        """Make sure the agent zipapp `blob` (sha256 `digest`) is on the host; return its path."""
        raise NotImplementedError

    def start(self, argv, env=None):
        """Start argv on the host (no shell), return an AgentProcess."""
        raise NotImplementedError

    def close(self):
        pass

    def forward(self, remote_port, local_port=None):
        """Forward 127.0.0.1:local_port here to 127.0.0.1:remote_port on the host until the
        returned object's close(); its local_port says where (forward.py)."""
        raise NotImplementedError

    def interactive(self, argv):
        """Run argv on the host with this terminal (a pty there); returns its exit status."""
        raise NotImplementedError


class _Popen(AgentProcess):
    def __init__(self, proc):
        self._p = proc
        self._err = b""

    def write(self, data):
        self._p.stdin.write(data)
        self._p.stdin.flush()

    def close_stdin(self):
        close_stream(self._p.stdin)

    def readline(self):
        return self._p.stdout.readline()

    def wait(self):
        self.close_stdin()
        self._err = self._p.stderr.read() or b""
        return self._p.wait()

    def stderr(self):
        return self._err.decode("utf-8", "replace")

    def kill(self):
        try:
            self._p.kill()
        except OSError:
            pass


def local_home():
    return os.path.expanduser(os.environ.get("RTRAIN_HOME") or "~/.rtrain")


class LocalTransport(Transport):
    """This machine: the eGPU / workstation case, and the default with no hosts.yaml."""

    kind = "local"

    def __init__(self, name="local", python=None, home=None):
        self.name = name
        self.python = python or sys.executable
        self.home = os.path.expanduser(home) if home else local_home()

    def agent_home(self):
        return self.home

    def ensure_agent(self, blob, digest):
        """The agent file, written (0600) if it is not there; the bootstrap checks its bytes
        on every call and removes it if they are wrong (agentboot.py)."""
        d = os.path.join(self.home, "agent")
        path = os.path.join(d, "agent-%s.pyz" % digest[:16])
        if os.path.exists(path):
            return path
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(self.home, 0o700)
        tmp = "%s.tmp%d" % (path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        return path

    def start(self, argv, env=None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=full_env)
        return _Popen(p)

    def forward(self, remote_port, local_port=None):
        """The job is on this machine: its port is reachable as it is; another local port is a
        relay to it."""
        from .forward import Relay
        if not local_port or local_port == remote_port:
            return _NoForward(remote_port)
        return Relay(lambda: socket.create_connection(("127.0.0.1", remote_port), 10), local_port)

    def interactive(self, argv):
        return subprocess.call(list(argv))


class _NoForward:
    def __init__(self, port):
        self.local_port = port

    def close(self):
        pass


def close_stream(stream):
    """Close a pipe to a process that may be gone already."""
    try:
        stream.close()
    except OSError:
        pass
