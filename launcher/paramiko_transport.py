"""The paramiko transport, for laptops whose OpenSSH cannot share connections (Windows), machines
without `ssh`, and hosts with `transport: paramiko`: one connection per host per command, one
exec channel per agent call. The connection is fabric's Connection (ssh_config lookup: HostName,
User, Port, IdentityFile, ProxyJump chains as nested gateways, ProxyCommand), with rtrain's own
host-key policy on every hop: fabric trusts any key (AutoAddPolicy) and reads no known_hosts, so
each hop's key is checked here against known_hosts as OpenSSH reads it (knownhosts.py:
HostKeyAlias, hashed names, @revoked; RejectPolicy, or accept-new, which never replaces a
changed key). Every argv element is shell-quoted (sshcommon.quote)."""
import errno
import logging
import os
import socket

from . import knownhosts
from . import sshcommon as sc
from .errors import HostError
from .transport import AgentProcess, Transport

# paramiko logs failures with tracebacks; rtrain reports them as one line instead
_log = logging.getLogger("paramiko")
_log.addHandler(logging.NullHandler())
_log.propagate = False


def _modules():
    import fabric
    import paramiko
    return fabric, paramiko


class _KeyProblem(Exception):
    """Raised by the policy; carries the HostError to report."""

    def __init__(self, error):
        super().__init__(error.message)
        self.error = error


def _hop_files(hop):
    """(user known_hosts files, global ones) for a hop, as OpenSSH would pick them."""
    users = [sc.known_hosts_override()] if sc.known_hosts_override() else None
    if users is None and hop.ssh_config.get("userknownhostsfile"):
        users = [sc.expand(p) for p in hop.ssh_config["userknownhostsfile"].split()]
    users = users or sc.default_user_known_hosts()
    glob = sc.global_known_hosts_override()
    if glob is None and hop.ssh_config.get("globalknownhostsfile"):
        glob = [sc.expand(p) for p in hop.ssh_config["globalknownhostsfile"].split()]
    if glob is None:
        glob = list(sc.DEFAULT_GLOBAL_KNOWN_HOSTS)
    return users, glob


def _policy(host, hop, accept_new):
    """A MissingHostKeyPolicy doing all of the checking: the client holds no host keys, so
    paramiko asks it about every key."""
    _, paramiko = _modules()
    users, glob = _hop_files(hop)
    alias = hop.ssh_config.get("hostkeyalias")
    name = alias or sc.key_name(hop.host, hop.port)

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            kh = knownhosts.KnownHosts(users + glob)
            status, e = kh.check([name], key.get_name(), key.get_base64())
            if status == "ok":
                return
            if status == "revoked":
                raise _KeyProblem(sc.revoked_host_key(host, name, e.path, e.line))
            if status == "changed":
                raise _KeyProblem(sc.changed_host_key(host, name, e.path, e.line, e.keytype, users[0]))
            if not accept_new:
                files = users[:1] + [p for p in users[1:] + glob if p in kh.read]
                raise _KeyProblem(sc.unknown_host_key(host, name, files, hop.user, hop.host, hop.port))
            path = users[0]
            d = os.path.dirname(path)
            if d:
                os.makedirs(d, mode=0o700, exist_ok=True)
            with open(path, "a") as f:
                f.write(knownhosts.line(name, key.get_name(), key.get_base64()))

    return Policy()


class _Channel(AgentProcess):
    """One exec channel. Reads and writes give up after `timeout` seconds without progress
    (chan.settimeout): paramiko's keepalive never notices a peer that went silent (a network
    that died without a reset), and TCP alone takes ~15 minutes to."""

    def __init__(self, chan, host, timeout=None):
        self.chan = chan
        self.host = host
        self.timeout = timeout
        if timeout:
            chan.settimeout(timeout)
        self.out = chan.makefile("rb", 65536)
        self._err = None

    def write(self, data):
        try:
            self.chan.sendall(data)
        except socket.timeout:
            raise sc.no_answer(self.host, self.timeout)
        except (OSError, EOFError) as e:
            raise sc.connection_lost(self.host, e or type(e).__name__, sending=True)

    def close_stdin(self):
        try:
            self.chan.shutdown_write()
        except (OSError, EOFError):
            pass

    def readline(self):
        try:
            return self.out.readline()
        except socket.timeout:
            raise sc.no_answer(self.host, self.timeout)
        except (OSError, EOFError) as e:
            raise sc.connection_lost(self.host, e or type(e).__name__)

    def wait(self):
        self.close_stdin()
        # recv_exit_status() would wait forever on a silent network
        if not self.chan.status_event.wait(self.timeout):
            raise sc.no_answer(self.host, self.timeout)
        rc = self.chan.exit_status
        try:
            self._err = self.chan.makefile_stderr("rb").read()
        except (OSError, EOFError):
            self._err = b""
        return -1 if rc is None else rc

    def stderr(self):
        return (self._err or b"").decode("utf-8", "replace")

    def kill(self):
        try:
            self.chan.close()
        except Exception:  # noqa: BLE001
            pass


class ParamikoTransport(Transport):
    kind = "paramiko"

    def __init__(self, host_cfg, accept_new_host_key=False):
        self.cfg = host_cfg
        self.name = host_cfg.name
        self.python = host_cfg.python or "python3"
        self.accept_new = accept_new_host_key or host_cfg.accept_new_host_key
        self._conns = []   # the target's Connection last, its gateways before it
        self._open_keys = {}  # id(hop) -> its private keys that others can read
        self._client = None
        self._gen = 0  # close() counts up: a connect that close() overtook is dropped

    # -------------------------------------------------------------- connecting
    def _connection(self):
        fabric, _ = _modules()
        cfg = fabric.Config(lazy=True, runtime_ssh_path=os.environ.get("RTRAIN_SSH_CONFIG") and
                            sc.ssh_config_path(), user_ssh_path=sc.ssh_config_path())
        cfg.load_ssh_config()
        user, alias, port = sc.parse_target(self.cfg.ssh)
        # ProxyJump a,b: a first, b through a, the target through b (built here: fabric 3.2
        # chains them the other way round)
        jumps = cfg.base_ssh_config.lookup(alias).get("proxyjump")
        gateway = None
        if jumps and jumps.lower() != "none":
            for i, hop in enumerate(j.strip() for j in jumps.split(",")):
                gateway = fabric.Connection(hop, config=cfg, gateway=gateway if i else None)
        conn = fabric.Connection(alias, user=user, port=port, config=cfg, gateway=gateway)
        hops = []
        c = conn
        while c is not None and not isinstance(c, str):
            hops.append(c)
            c = c.gateway
        timeout = float(self.cfg.connect_timeout)
        for i, hop in enumerate(hops):
            keys = [sc.expand(self.cfg.identity_file)] if (i == 0 and self.cfg.identity_file) else []
            keys += [sc.expand(k) for k in hop.ssh_config.get("identityfile", [])]
            given = [k for k in keys if os.path.exists(k)]
            # (fabric's Connection turns unknown attributes into config: keep ours here)
            opened = self._open_keys[id(hop)] = [k for k in given if sc.key_too_open(k)]
            keys = [k for k in given if k not in opened]  # as OpenSSH: never used
            only = hop.ssh_config.get("identitiesonly", "no").lower() == "yes"
            hop.connect_kwargs = {"allow_agent": not only, "look_for_keys": not only and not given,
                                  "banner_timeout": timeout, "auth_timeout": timeout}
            if keys:
                hop.connect_kwargs["key_filename"] = keys
            hop.connect_timeout = timeout
            hop.client.set_missing_host_key_policy(_policy(self.name, hop, self.accept_new))
        return list(reversed(hops))

    def _connect(self):
        if self._client is not None:
            return self._client
        gen = self._gen
        hops = self._connection()
        self._conns = hops
        for i, hop in enumerate(hops):
            try:
                hop.open()  # opens its gateway's channel to it: the hops before it are open
            except BaseException as e:
                err = self._map(e, hop, hops[i - 1] if i else None)
                self.close()
                if err is None:
                    raise
                raise err
        client = hops[-1].client
        client.get_transport().set_keepalive(15)
        if gen != self._gen:  # closed while we connected (from another thread): not wanted
            self.close()
            raise HostError(self.name, "connection closed", "run the command again")
        self._client = client
        return client

    def _map(self, e, hop, gateway):
        _, paramiko = _modules()
        name = hop.ssh_config.get("hostkeyalias") or sc.key_name(hop.host, hop.port)
        if isinstance(e, _KeyProblem):
            return e.error
        if isinstance(e, paramiko.ChannelException) or (gateway is not None and isinstance(
                e, paramiko.SSHException) and "direct-tcpip" in str(e).lower()):
            return sc.jump_failed(self.name, gateway.original_host, "%s:%d" % (hop.host, hop.port),
                                  getattr(e, "text", None) or str(e) or "refused")
        if isinstance(e, paramiko.AuthenticationException) or \
                "No authentication methods available" in str(e):
            opened = self._open_keys.get(id(hop))
            return sc.auth_refused(self.name, hop.user, name, opened[0] if opened else None)
        if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError) or \
                isinstance(e, ConnectionRefusedError):
            return sc.refused(self.name, hop.host, hop.port)
        if isinstance(e, socket.gaierror):
            return sc.unresolved(self.name, hop.host, e.strerror)
        if isinstance(e, socket.timeout):
            return sc.timed_out(self.name, name, float(self.cfg.connect_timeout))
        if isinstance(e, paramiko.SSHException):
            msg = str(e)
            if "Error reading SSH protocol banner" in msg or "timed out" in msg.lower() or \
                    "No existing session" in msg:
                return sc.no_ssh_answer(self.name, name, float(self.cfg.connect_timeout))
            return sc.ssh_failed(self.name, name, msg, "ssh -p %d %s@%s" % (hop.port, hop.user, hop.host))
        if isinstance(e, OSError):
            return sc.cannot_connect(self.name, hop.host, hop.port, e.strerror or e)
        return None

    # -------------------------------------------------------------- Transport
    def agent_home(self):
        return sc.agent_home(self.cfg)

    def agent_path_unchecked(self, digest):
        return sc.agent_path(self.cfg, digest)

    def _run(self, argv):
        chan = self._connect().get_transport().open_session(timeout=30)
        chan.settimeout(self._io_timeout())
        chan.exec_command(sc.command_line(argv))
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        return chan.recv_exit_status(), out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def ensure_agent(self, blob, digest):
        from .paramiko_sftp import ship
        try:
            return ship(self, self._connect(), blob, digest)
        except socket.timeout:
            raise sc.no_answer(self.name, self._io_timeout())

    def start(self, argv, env=None):
        cmd = sc.command_line(argv, env)
        try:
            chan = self._connect().get_transport().open_session(timeout=30)
            chan.exec_command(cmd)
        except HostError:
            raise
        except Exception as e:  # noqa: BLE001 - paramiko raises several kinds here
            self.close()
            raise sc.connection_lost(self.name, e or type(e).__name__)
        return _Channel(chan, self.name, self._io_timeout())

    def _io_timeout(self):
        return float(getattr(self.cfg, "io_timeout", None) or 60.0)

    def forward(self, remote_port, local_port=None):
        """A relay here (forward.py) opening one direct-tcpip channel per connection."""
        from .forward import Relay, free_port
        t = self._connect().get_transport()
        return Relay(lambda: t.open_channel("direct-tcpip", ("127.0.0.1", int(remote_port)), ("127.0.0.1", 0),
                                            timeout=self._io_timeout()),
                     free_port(local_port or remote_port))

    def interactive(self, argv):
        from .forward import terminal_pump, terminal_size
        chan = self._connect().get_transport().open_session(timeout=30)
        cols, rows = terminal_size()
        chan.get_pty(term=os.environ.get("TERM", "xterm"), width=cols, height=rows)
        chan.exec_command(sc.command_line(argv))
        return terminal_pump(chan)

    def close(self):
        self._gen += 1
        for c in reversed(self._conns):
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self._conns = []
        self._client = None

    def describe(self):
        return {"transport": "paramiko", "sharing": False, "persist": None, "shared_up": False}


def free_bytes(transport, path):
    """Bytes available on the file system holding path (or its nearest existing parent)."""
    import posixpath
    import re
    for _ in range(64):
        try:
            rc, out, _err = transport._run(["df", "-Pk", path])
        except Exception:  # noqa: BLE001 - only a better message is at stake
            return None
        if rc == 0:
            m = re.search(r"\s(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s", (out.strip().splitlines() or [""])[-1] + " ")
            return int(m.group(3)) * 1024 if m else None
        parent = posixpath.dirname(path.rstrip("/"))
        if not parent or parent == path:
            return None
        path = parent
    return None


def home_error(transport, home, e, need):
    """Why RTRAIN_HOME can't take the agent. SFTP says only "Failure" for a full disk (it has
    no errno for it), so ask `df` how much room there is before calling it not writable."""
    if getattr(e, "errno", None) not in (errno.EACCES, errno.EPERM):
        free = free_bytes(transport, home)
        if free is not None and free < need + (64 << 10):
            return sc.disk_full(transport.name, home, free)
    return sc.home_not_writable(transport.name, home, transport.cfg.ssh, getattr(e, "strerror", None) or e)
