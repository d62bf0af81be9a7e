"""The SSH transport: paramiko, one connection per host per command, one exec channel per agent
call. Host keys are checked against known_hosts (RejectPolicy); `accept_new_host_key` adds an
unknown key like OpenSSH's StrictHostKeyChecking=accept-new and never replaces a changed one.
Every argv element is shell-quoted: the only unquoted shell text rtrain sends is none at all."""
import errno
import logging
import os
import shlex
import socket
import sys
import threading

from .errors import HostError
from .transport import AgentProcess, Transport


# paramiko logs failures with tracebacks; rtrain reports them as one line instead
_log = logging.getLogger("paramiko")
_log.addHandler(logging.NullHandler())
_log.propagate = False


def _paramiko():
    """import paramiko, without the ~40 ms of `invoke` (and asyncio, unittest.mock...) that
    paramiko.config imports for one rare feature, `Match exec` in ~/.ssh/config: when the
    config has none, paramiko is imported with invoke blocked (it then leaves that feature
    off, which nothing here uses). invoke itself stays importable afterwards."""
    if _loaded:
        return _loaded[0]
    with _import_lock:  # hosts are reached from several threads at once
        if not _loaded:
            block = "paramiko" not in sys.modules and "invoke" not in sys.modules \
                and not _config_uses_match_exec()
            if block:
                sys.modules["invoke"] = None  # makes `import invoke` raise ImportError
            try:
                import paramiko
            finally:
                if block and sys.modules.get("invoke", 0) is None:
                    del sys.modules["invoke"]
            _loaded.append(paramiko)
    return _loaded[0]


_loaded = []
_import_lock = threading.Lock()


def _config_uses_match_exec():
    try:
        with open(_ssh_config_path(), "rb") as f:
            text = f.read().lower()
    except OSError:
        return False
    return b"exec" in text and any(line.lstrip().startswith(b"match") and b"exec" in line
                                   for line in text.splitlines())


def _ssh_config_path():
    return os.path.expanduser(os.environ.get("RTRAIN_SSH_CONFIG") or "~/.ssh/config")


def _known_hosts_path(cfg_value=None):
    if os.environ.get("RTRAIN_KNOWN_HOSTS"):
        return os.path.expanduser(os.environ["RTRAIN_KNOWN_HOSTS"])
    if cfg_value:
        return os.path.expanduser(cfg_value.split()[0])
    return os.path.expanduser("~/.ssh/known_hosts")


def _global_known_hosts_paths(cfg_value=None):
    """The system-wide known_hosts files, read-only: $RTRAIN_GLOBAL_KNOWN_HOSTS (paths separated
    by spaces; set but empty: none), else GlobalKnownHostsFile from ~/.ssh/config, else
    OpenSSH's default pair."""
    env = os.environ.get("RTRAIN_GLOBAL_KNOWN_HOSTS")
    if env is not None:
        return [os.path.expanduser(p) for p in env.split()]
    if cfg_value:
        return [os.path.expanduser(p) for p in cfg_value.split()]
    return ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]


def parse_target(spec):
    """'user@host:port' or an alias -> (user or None, host, port or None)."""
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port = None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        port = int(p)
    else:
        host = spec
    return user, host, port


class Resolved:
    """Where and how to connect, after ~/.ssh/config."""

    def __init__(self, host_cfg):
        paramiko = _paramiko()
        user, alias, port = parse_target(host_cfg.ssh)
        conf = {}
        path = _ssh_config_path()
        if os.path.isfile(path):
            sc = paramiko.SSHConfig.from_path(path)
            conf = sc.lookup(alias)
        self.alias = alias
        self.hostname = conf.get("hostname", alias)
        self.port = port or int(conf.get("port", 22))
        self.user = user or conf.get("user") or _local_user()
        keys = []
        if host_cfg.identity_file:
            keys.append(os.path.expanduser(host_cfg.identity_file))
        keys += [os.path.expanduser(k) for k in conf.get("identityfile", [])]
        self.key_files = [k for k in keys if os.path.exists(k)]
        self.identities_only = conf.get("identitiesonly", "no").lower() == "yes"
        self.proxy_jump = conf.get("proxyjump")
        self.known_hosts = _known_hosts_path(conf.get("userknownhostsfile"))
        self.global_known_hosts = _global_known_hosts_paths(conf.get("globalknownhostsfile"))
        self.timeout = float(host_cfg.connect_timeout)
        self.accept_new = False

    @property
    def key_name(self):
        return self.hostname if self.port == 22 else "[%s]:%d" % (self.hostname, self.port)


def _local_user():
    import getpass
    return getpass.getuser()


class _AcceptNew:
    """MissingHostKeyPolicy for accept-new: add an unknown key to the user's known_hosts file."""

    def __init__(self, path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, mode=0o700, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("%s %s %s\n" % (hostname, key.get_name(), key.get_base64()))
        client.get_host_keys().add(hostname, key.get_name(), key)


def _known_line(path, name):
    """Line number of `name`'s entry in a known_hosts file (hashed entries included), or None."""
    paramiko = _paramiko()
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                for pat in parts[0].split(","):
                    if pat == name:
                        return n
                    if pat.startswith("|1|"):
                        try:
                            if paramiko.HostKeys.hash_host(name, pat) == pat:
                                return n
                        except Exception:  # noqa: BLE001
                            pass
    except OSError:
        return None
    return None


def no_answer(host, timeout):
    return HostError(host, "no answer from the host for %gs" % timeout,
                     "the network or the host may be down: check with `rtrain hosts` "
                     "(io_timeout in hosts.yaml sets the limit)")


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

    def _silent(self):
        return no_answer(self.host, self.timeout)

    def write(self, data):
        try:
            self.chan.sendall(data)
        except socket.timeout:
            raise self._silent()
        except (OSError, EOFError) as e:
            raise HostError(self.host, "connection lost while sending: %s" % (e or type(e).__name__),
                            "run the command again")

    def close_stdin(self):
        try:
            self.chan.shutdown_write()
        except (OSError, EOFError):
            pass

    def readline(self):
        try:
            return self.out.readline()
        except socket.timeout:
            raise self._silent()
        except (OSError, EOFError) as e:
            raise HostError(self.host, "connection lost: %s" % (e or type(e).__name__),
                            "check the network; run the command again")

    def wait(self):
        self.close_stdin()
        # recv_exit_status() would wait forever on a silent network
        if not self.chan.status_event.wait(self.timeout):
            raise self._silent()
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


class SSHTransport(Transport):
    kind = "ssh"

    def __init__(self, host_cfg, accept_new_host_key=False):
        self.cfg = host_cfg
        self.name = host_cfg.name
        self.python = host_cfg.python or "python3"
        self.accept_new = accept_new_host_key or host_cfg.accept_new_host_key
        self._client = None
        self._jump = None
        self._home = None
        self._gen = 0  # close() counts up: a connect that close() overtook is dropped

    # -------------------------------------------------------------- connecting
    def _connect(self):
        if self._client is not None:
            return self._client
        gen = self._gen
        paramiko = _paramiko()
        r = Resolved(self.cfg)
        sock = None
        if r.proxy_jump:
            sock = self._jump_channel(r)
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(r.known_hosts)
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as e:
            raise HostError(self.name, "cannot read %s: %s" % (r.known_hosts, e))
        known_files = [r.known_hosts]
        # The system-wide files, read-only (accept-new writes the user's file only), when the
        # user's file does not name this host: it comes first, as with OpenSSH (paramiko would
        # put system keys first).
        if client.get_host_keys().lookup(r.key_name) is None:
            for path in r.global_known_hosts:
                try:
                    client.load_system_host_keys(path)
                except (OSError, paramiko.SSHException):
                    continue  # missing or unreadable: OpenSSH skips it too
                known_files.append(path)
        client.set_missing_host_key_policy(_AcceptNew(r.known_hosts) if self.accept_new
                                           else paramiko.RejectPolicy())
        try:
            client.connect(r.hostname, port=r.port, username=r.user, key_filename=r.key_files or None,
                           timeout=r.timeout, banner_timeout=r.timeout, auth_timeout=r.timeout,
                           allow_agent=not r.identities_only,
                           look_for_keys=not r.identities_only and not r.key_files, sock=sock)
        except paramiko.BadHostKeyException as e:
            kh, line = r.known_hosts, None
            for path in known_files:
                line = _known_line(path, r.key_name)
                if line:
                    kh = path
                    break
            where = "%s line %s" % (kh, line) if line else kh
            raise HostError(self.name, "HOST KEY CHANGED for %s: %s holds a different %s key" % (
                r.key_name, where, e.expected_key.get_name()),
                "if the host was reinstalled, remove the old key with `ssh-keygen -R '%s' -f %s`%s; "
                "otherwise someone may be intercepting the connection" % (
                    r.key_name, kh, "" if kh == r.known_hosts else " (a system file: ask its admin)"),
                permanent=True)
        except paramiko.SSHException as e:
            msg = str(e)
            if "not found in known_hosts" in msg:
                raise HostError(self.name, "host key for %s is not in %s" % (
                    r.key_name, " nor in ".join(known_files)),
                                "check the key and connect once with `ssh -p %d %s@%s`, or pass "
                                "--accept-new-host-key" % (r.port, r.user, r.hostname), permanent=True)
            if isinstance(e, paramiko.AuthenticationException):
                raise HostError(self.name, "authentication refused for %s@%s" % (r.user, r.key_name),
                                "add your public key to ~/.ssh/authorized_keys there, or set "
                                "identity_file for this host in hosts.yaml")
            if "Error reading SSH protocol banner" in msg or "timed out" in msg.lower() or \
                    "No existing session" in msg:
                raise HostError(self.name, "no SSH answer from %s within %gs" % (r.key_name, r.timeout),
                                "is the host up and is sshd listening there? (connect_timeout in hosts.yaml)")
            raise HostError(self.name, "SSH to %s failed: %s" % (r.key_name, msg),
                            "try `ssh -p %d %s@%s` to see more" % (r.port, r.user, r.hostname))
        except paramiko.ssh_exception.NoValidConnectionsError:
            raise HostError(self.name, "connection refused by %s:%d" % (r.hostname, r.port),
                            "is sshd running there, on that port?")
        except socket.gaierror as e:
            raise HostError(self.name, "cannot resolve host name %r (%s)" % (r.hostname, e.strerror),
                            "check `ssh:` in hosts.yaml and HostName in ~/.ssh/config")
        except socket.timeout:
            raise HostError(self.name, "connection to %s timed out after %gs" % (r.key_name, r.timeout),
                            "is the host up and reachable from here? (connect_timeout in hosts.yaml)")
        except ConnectionRefusedError:
            raise HostError(self.name, "connection refused by %s:%d" % (r.hostname, r.port),
                            "is sshd running there, on that port?")
        except OSError as e:
            raise HostError(self.name, "cannot connect to %s:%d: %s" % (r.hostname, r.port, e.strerror or e),
                            "check the network and `ssh:` in hosts.yaml")
        t = client.get_transport()
        t.set_keepalive(15)
        if gen != self._gen:  # closed while we connected (from another thread): not wanted
            client.close()
            raise HostError(self.name, "connection closed", "run the command again")
        self._client = client
        return client

    def _jump_channel(self, r):
        from .config import Host
        jump_user, jump_host, jump_port = parse_target(r.proxy_jump.split(",")[0])
        spec = ("%s@" % jump_user if jump_user else "") + jump_host + (":%d" % jump_port if jump_port else "")
        self._jump = SSHTransport(Host(name=self.name + " (jump %s)" % jump_host, kind="ssh", ssh=spec,
                                       connect_timeout=self.cfg.connect_timeout), self.accept_new)
        jt = self._jump._connect().get_transport()
        try:
            return jt.open_channel("direct-tcpip", (r.hostname, r.port), ("127.0.0.1", 0),
                                   timeout=r.timeout)
        except Exception as e:  # noqa: BLE001 - paramiko raises several kinds here
            raise HostError(self.name, "jump host %s cannot reach %s:%d: %s" % (
                jump_host, r.hostname, r.port, e), "check ProxyJump in ~/.ssh/config")

    # -------------------------------------------------------------- Transport
    def agent_home(self):
        return self.cfg.home or "~/.rtrain"

    def _run(self, argv):
        chan = self._connect().get_transport().open_session(timeout=30)
        chan.settimeout(self._io_timeout())
        chan.exec_command(" ".join(_quote(a) for a in argv))
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        return chan.recv_exit_status(), out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def agent_path_unchecked(self, digest):
        """Where ensure_agent puts the agent, named without asking the host (`~/` is expanded
        by the remote shell: _quote leaves it unquoted). No round trip on the hot path; the
        client ships the agent only when python3 there cannot open this file."""
        home = self.agent_home()
        if home == "~":
            home = "~/"
        return "%s/agent/agent-%s.pyz" % (home.rstrip("/"), digest[:16])

    def ensure_agent(self, blob, digest):
        paramiko = _paramiko()
        client = self._connect()
        sftp = client.open_sftp()
        sftp.get_channel().settimeout(self._io_timeout())
        try:
            home = self.agent_home()
            if home.startswith("~/"):
                home = sftp.normalize(".") + "/" + home[2:]
            elif home == "~":
                home = sftp.normalize(".")
            path = "%s/agent/agent-%s.pyz" % (home, digest[:16])
            try:
                if sftp.stat(path).st_size == len(blob):
                    return path
            except IOError as e:
                if isinstance(e, socket.timeout):
                    raise
            tmp = "%s.tmp%d" % (path, os.getpid())
            try:
                _mkdirs(sftp, home, 0o700)
                _mkdirs(sftp, home + "/agent", 0o700)
                with sftp.open(tmp, "wb") as f:
                    f.write(blob)
                sftp.chmod(tmp, 0o600)
                try:
                    sftp.posix_rename(tmp, path)
                except IOError:
                    sftp.rename(tmp, path)
            except (IOError, paramiko.SSHException) as e:
                if isinstance(e, socket.timeout):
                    raise
                try:
                    sftp.remove(tmp)
                except (IOError, paramiko.SSHException):
                    pass
                raise self._home_error(home, e, len(blob))
            return path
        except socket.timeout:
            raise no_answer(self.name, self._io_timeout())
        finally:
            sftp.close()

    def _home_error(self, home, e, need):
        """Why RTRAIN_HOME can't take the agent. SFTP says only "Failure" for a full disk (it has
        no errno for it), so ask `df` how much room there is before calling it not writable."""
        if getattr(e, "errno", None) not in (errno.EACCES, errno.EPERM):
            free = self._free_bytes(home)
            if free is not None and free < need + (64 << 10):
                return HostError(self.name, "no space left on the device holding %s (%d KiB free)" % (
                    home, free >> 10), "free some space there (old jobs live in %s/jobs), or set "
                    "`home:` for this host in hosts.yaml to a larger disk" % home, check="disk")
        return HostError(self.name, "RTRAIN_HOME %s on %s is not writable: %s" % (
            home, self.cfg.ssh, getattr(e, "strerror", None) or e),
            "make it writable or set `home:` for this host in hosts.yaml", check="disk")

    def _free_bytes(self, path):
        """Bytes available on the file system holding path (or its nearest existing parent)."""
        import posixpath
        for _ in range(64):
            try:
                rc, out, _err = self._run(["df", "-Pk", path])
            except Exception:  # noqa: BLE001 - only a better message is at stake
                return None
            if rc == 0:
                import re
                m = re.search(r"\s(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s", (out.strip().splitlines() or [""])[-1] + " ")
                return int(m.group(3)) * 1024 if m else None
            parent = posixpath.dirname(path.rstrip("/"))
            if not parent or parent == path:
                return None
            path = parent
        return None

    def start(self, argv, env=None):
        cmd = " ".join(_quote(a) for a in argv)
        if env:
            cmd = "env " + " ".join(_quote("%s=%s" % kv) for kv in env.items()) + " " + cmd
        try:
            chan = self._connect().get_transport().open_session(timeout=30)
            chan.exec_command(cmd)
        except HostError:
            raise
        except Exception as e:  # noqa: BLE001 - paramiko raises several kinds here
            self.close()
            raise HostError(self.name, "connection lost: %s" % (e or type(e).__name__),
                            "check the network; run the command again")
        return _Channel(chan, self.name, self._io_timeout())

    def _io_timeout(self):
        return float(getattr(self.cfg, "io_timeout", None) or 60.0)

    def close(self):
        self._gen += 1
        for c in (self._client, self._jump):
            if c is not None:
                try:
                    (c.close if hasattr(c, "get_transport") else c.close)()
                except Exception:  # noqa: BLE001
                    pass
        self._client = None
        self._jump = None


def _quote(s):
    # `~/...` must reach the remote shell unquoted-tilde to expand; everything else is quoted
    if s.startswith("~/") and "'" not in s:
        return "~/" + shlex.quote(s[2:])
    return shlex.quote(s)


def _mkdirs(sftp, path, mode):
    try:
        sftp.stat(path)
        return
    except IOError:
        pass
    try:
        sftp.mkdir(path, mode)
        sftp.chmod(path, mode)
    except IOError as e:
        try:
            sftp.stat(path)  # made by a concurrent rtrain: fine
        except IOError:
            raise e  # else the mkdir's error (permission denied...) stands, not "no such file"
