"""The OpenSSH transport: the agent runs through the system `ssh` client (`ssh [opts] -- HOST
CMD`, its stdin and stdout the agent's), with connection sharing. The first call to a host opens
a master connection (ControlMaster=auto) that stays up ControlPersist (the host's
`control_persist`, default 10 min) after the last use: every later call, from this command or
the next, is one session on it, about two round trips (docs/contracts.md, "Transports").

Everything in the user's ssh config applies as OpenSSH applies it. rtrain adds only what it
must, in a small config file of its own that includes the user's (ProxyJump hops get `-F` but no
`-o` options, so this is the only way they get them too): BatchMode, StrictHostKeyChecking (yes,
or accept-new), ServerAliveInterval/CountMax, ConnectTimeout, and, where $HOME is not the
account's home, $HOME/.ssh/config and $HOME/.ssh/known_hosts (README: "Your ssh config").
Control sockets live in a private 0700 directory (control_dir()); one owned by someone else or
writable by others is refused. A master that looks alive but is not (the laptop slept) is
dropped: see sshproc.py and before_start()."""
import hashlib
import os
import re
import socket
import stat
import subprocess
import threading
import time

from . import sshcommon as sc
from .agent import fsutil
from .errors import HostError
from .sshproc import MARKER, SshProcess
from .transport import Transport, local_home

SERVER_ALIVE_INTERVAL = 5   # seconds; a dead link is noticed after interval * count
SERVER_ALIVE_COUNT = 3
SLEPT_S = 10.0              # wall clock ran this much past the monotonic one: the laptop slept
_SOCK_MAX = 100             # sun_path is 104 bytes on macOS; OpenSSH adds a 17-byte suffix

# One exec ships the agent (no SFTP): a constant script, its arguments quoted (sshcommon.quote),
# writes a temp file next to the target and renames it into place.
SHIP = ('h=$1; f=$h/agent/$2; t=$f.tmp$$; umask 077; mkdir -p -- "$h/agent" && cat > "$t" && '
        'mv -f -- "$t" "$f" && exit 0; rc=$?; rm -f -- "$t"; df -Pk -- "$h" >&2; exit $rc')


def control_dir():
    """$RTRAIN_SSH_CONTROL_DIR, else RTRAIN_HOME/ssh on this machine (~/.rtrain/ssh); a path too
    long for a socket name falls back to a private directory in /tmp, checked the same way."""
    d = os.path.abspath(os.environ.get("RTRAIN_SSH_CONTROL_DIR") or os.path.join(local_home(), "ssh"))
    if len(d) + 18 + 17 > _SOCK_MAX:
        d = "/tmp/rtrain-ssh-%d-%s" % (os.geteuid(), hashlib.sha256(d.encode()).hexdigest()[:8])
    return d


def private_dir(d, host="local"):
    """Make d (0700) or check it: ours, a real directory, not writable by anyone else."""
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError as e:
        raise HostError(host, "cannot make the SSH control directory %s: %s" % (d, e.strerror),
                        "set RTRAIN_SSH_CONTROL_DIR to a private directory", permanent=True)
    why = None
    if not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != os.geteuid():
        why = "is owned by another user (uid %d)" % st.st_uid
    elif st.st_mode & 0o022:
        why = "can be written by other users (mode %03o)" % (st.st_mode & 0o777)
    if why:
        raise HostError(host, "the SSH control directory %s %s: refusing to share connections "
                        "through it" % (d, why), "remove it, or set RTRAIN_SSH_CONTROL_DIR to a "
                        "directory only you can write (mode 0700)", permanent=True)
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def _account_home():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return None


def _cfgq(path):
    return '"%s"' % path if any(c.isspace() for c in path) else path


def _unix_alive(path):
    """Does a master answer on this socket? A SIGKILLed one leaves the file: refused."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class OpenSSHTransport(Transport):
    kind = "openssh"
    request_in_argv = True  # agentclient.py: a session's stdin flows a round trip after its exec

    def __init__(self, host_cfg, accept_new_host_key=False, ssh=None):
        self.cfg = host_cfg
        self.name = host_cfg.name
        self.python = host_cfg.python or "python3"
        self.ssh = ssh or sc.openssh_client()
        if not self.ssh:
            raise HostError(self.name, "transport openssh: no `ssh` client found on PATH",
                            "install the OpenSSH client, or set `transport: paramiko` for this host "
                            "in hosts.yaml", permanent=True)
        self.accept_new = bool(accept_new_host_key or host_cfg.accept_new_host_key)
        self.io_timeout = float(getattr(host_cfg, "io_timeout", None) or 60.0)
        self.connect_timeout = float(host_cfg.connect_timeout or 10)
        self.doubt_s = max(2.0, self.connect_timeout)
        persist = getattr(host_cfg, "control_persist", "10m") or "10m"
        self.sharing = persist != "no"
        self.persist = persist
        user, alias, port = sc.parse_target(host_cfg.ssh)
        self.dest = alias
        self.target = []
        if port:
            self.target += ["-p", str(port)]
        if user:
            self.target += ["-l", user]
        if host_cfg.identity_file:
            self.target += ["-i", os.path.abspath(sc.expand(host_cfg.identity_file))]
        self._procs = set()
        self._lock = threading.Lock()
        self._checked = False
        self._stamped = False
        self._resolved = None
        self.dir = private_dir(control_dir(), self.name)
        self.config_file, key = self._write_config()
        self.control_path = os.path.join(self.dir, key)

    # ------------------------------------------------------------------ the config file
    def _config_text(self, strict):
        lines = ["# written by rtrain: its options, then your ssh config (README, \"Your ssh config\")",
                 "BatchMode yes", "StrictHostKeyChecking %s" % strict,
                 "ServerAliveInterval %d" % SERVER_ALIVE_INTERVAL,
                 "ServerAliveCountMax %d" % SERVER_ALIVE_COUNT,
                 "ConnectTimeout %d" % max(1, int(round(self.connect_timeout)))]
        kh = sc.known_hosts_override()
        if kh:
            lines.append("UserKnownHostsFile %s" % _cfgq(kh))
        gkh = sc.global_known_hosts_override()
        if gkh is not None:
            lines.append("GlobalKnownHostsFile %s" % (" ".join(_cfgq(p) for p in gkh) or "/dev/null"))
        lines.append("Include %s" % _cfgq(sc.ssh_config_path()))
        if not os.environ.get("RTRAIN_SSH_CONFIG"):
            lines.append("Include /etc/ssh/ssh_config")
        acct = _account_home()
        if not kh and acct and os.path.realpath(acct) != os.path.realpath(sc.home()):
            # OpenSSH reads the account's ~/.ssh; rtrain's ~ is $HOME (README)
            lines += ["Match all", "UserKnownHostsFile %s" % " ".join(
                _cfgq(p) for p in sc.default_user_known_hosts())]
        return "\n".join(lines) + "\n"

    def _write_config(self):
        text = self._config_text("accept-new" if self.accept_new else "yes")
        h = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = os.path.join(self.dir, "config-%s" % h)
        if not os.path.exists(path):
            fsutil.write_private(path, text)
        # the master does not depend on accept-new (it matters only while connecting)
        ident = "\0".join([self.ssh, self._config_text("yes"), self.dest] + self.target)
        return path, hashlib.sha256(ident.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ argv
    def argv(self, remote_cmd=None, direct=False, extra=()):
        a = [self.ssh, "-F", self.config_file, "-T"]
        cp = self.control_path.replace("%", "%%")
        if direct or not self.sharing:
            a += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        else:
            a += ["-o", "ControlMaster=auto", "-o", "ControlPath=" + cp,
                  "-o", "ControlPersist=" + self.persist]
        a += list(extra) + self.target + ["--", self.dest]
        if remote_cmd is not None:
            a.append(remote_cmd)
        return a

    # ------------------------------------------------------------------ the master
    def master_up(self):
        return self.sharing and os.path.exists(self.control_path) and _unix_alive(self.control_path)

    def before_start(self):
        """How the next ssh child will connect: 'reused' (a master answers), 'auto' or 'direct'.
        Once per command: a master that outlived a sleep of the laptop is dropped unused."""
        if not self.sharing:
            return "direct"
        if not os.path.exists(self.control_path):
            return "auto"
        if not _unix_alive(self.control_path):
            return "auto"  # a dead master's socket: ssh unlinks it and makes a new one
        if not self._checked:
            self._checked = True
            if self._slept():
                self.drop_master()
                return "auto"
        return "reused"

    def _slept(self):
        try:
            with open(self.control_path + ".t") as f:
                wall, mono = (float(x) for x in f.read().split()[:2])
        except (OSError, ValueError):
            return False
        dm = time.monotonic() - mono
        return dm < 0 or (time.time() - wall) - dm > SLEPT_S

    def proven(self):
        """A byte came back: note when (wall and monotonic clocks) the shared connection worked."""
        if self._stamped or not self.sharing:
            return
        self._stamped = True
        try:
            fsutil.write_private(self.control_path + ".t", "%f %f\n" % (time.time(), time.monotonic()))
        except OSError:
            pass

    def drop_master(self):
        """Close the shared connection (`ssh -O exit`); one that does not answer is killed."""
        return close_master(self.ssh, self.control_path)

    def is_mux_refusal(self, err):
        return bool(re.search(rb"mux_client|Session open refused|ControlSocket|Control socket|"
                              rb"unix_listener|ControlPath", err))

    # ------------------------------------------------------------------ processes
    def register(self, proc):
        with self._lock:
            self._procs.add(proc)

    def unregister(self, proc):
        with self._lock:
            self._procs.discard(proc)

    def start(self, argv, env=None):
        with self._lock:
            finished = [p for p in self._procs if p.done()]
        for p in finished:  # calls whose reply was read: their pipes go (status --watch)
            p.kill()
        return SshProcess(self, "echo %s && exec %s" % (MARKER.decode(), sc.command_line(argv, env)))

    def forward(self, remote_port, local_port=None):
        """Ask the shared connection to forward (`ssh -O forward -L`; `-O cancel` at close);
        without sharing, an `ssh -N -L` of its own."""
        from .forward import free_port
        port = free_port(local_port or remote_port)
        spec = "127.0.0.1:%d:127.0.0.1:%d" % (port, int(remote_port))
        if self.master_up():
            cp = self.control_path.replace("%", "%%")
            base = [self.ssh, "-F", self.config_file, "-o", "ControlPath=" + cp] + self.target
            p = subprocess.run(base + ["-O", "forward", "-L", spec, "--", self.dest], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=float(self.cfg.connect_timeout) + 10)
            if p.returncode == 0:
                return _MasterForward(base + ["-O", "cancel", "-L", spec, "--", self.dest], port)
        proc = subprocess.Popen(self.argv(direct=True, extra=["-N", "-o", "ExitOnForwardFailure=yes", "-L", spec]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return _ProcessForward(proc, port, self.name)

    def interactive(self, argv):
        return subprocess.call(self.argv(sc.command_line(argv), extra=["-t"]))

    def close(self):
        """End this command's ssh children; the shared connection stays for the next command."""
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            p.interrupt()

    def abort(self):
        """The connection went silent (logs -f's watchdog): end the children and the master."""
        self.close()
        threading.Thread(target=self.drop_master, daemon=True).start()

    # ------------------------------------------------------------------ Transport
    def agent_home(self):
        return sc.agent_home(self.cfg)

    def agent_path_unchecked(self, digest):
        return sc.agent_path(self.cfg, digest)

    def ensure_agent(self, blob, digest):
        home = self.agent_home()
        arg = "~/" if home == "~" else home
        proc = self.start(["sh", "-c", SHIP, "rtrain-ship", arg, "agent-%s.pyz" % digest[:16]])
        try:
            proc.write(blob)
            proc.close_stdin()
            while proc.readline():
                pass
            rc = proc.wait()
        except BaseException:
            proc.kill()
            raise
        if rc != 0:
            raise self._ship_error(home, proc.stderr(), len(blob))
        return sc.agent_path(self.cfg, digest)

    def _ship_error(self, home, err, need):
        m = None
        for line in err.splitlines():
            m = re.search(r"\s(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s", line + " ") or m
        free = int(m.group(3)) * 1024 if m else None
        if "No space left" in err or "Disk quota" in err or (free is not None and free < need + (64 << 10)):
            return sc.disk_full(self.name, home, free)
        reason = next((x for x in ("Permission denied", "Read-only file system", "Not a directory")
                       if x in err), None)
        if reason:
            return sc.home_not_writable(self.name, home, self.cfg.ssh, reason)
        last = [x for x in err.splitlines() if x.strip() and not x.startswith(("Filesystem", "df:"))]
        return HostError(self.name, "cannot put the agent in %s: %s" % (home, last[-1] if last else "?"),
                         "check RTRAIN_HOME there (`home:` in hosts.yaml)", check="disk")

    # ------------------------------------------------------------------ errors
    def resolved(self):
        """What OpenSSH makes of the host (`ssh -G`: no connection): user, hostname, port..."""
        if self._resolved is None:
            conf = {}
            try:
                out = subprocess.run(self.argv(direct=True, extra=["-G"]), stdin=subprocess.DEVNULL,
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.splitlines():
                    k, _, v = line.partition(" ")
                    conf.setdefault(k.lower(), v.strip())
            except (OSError, subprocess.SubprocessError):
                pass
            user, alias, port = sc.parse_target(self.cfg.ssh)
            conf.setdefault("hostname", alias)
            conf.setdefault("port", str(port or 22))
            conf.setdefault("user", user or "?")
            self._resolved = conf
        return self._resolved

    def diagnose(self):
        """stderr of `ssh HOST true` without connection sharing (error paths only)."""
        try:
            return subprocess.run(self.argv("true", direct=True), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True,
                                  timeout=4 * self.connect_timeout + 5).stderr
        except (OSError, subprocess.SubprocessError) as e:
            return str(e)

    def failure(self, err, mid_session=False):
        """ssh's exit 255 and its stderr -> the one-liner both transports print."""
        from .openssh_errors import map_failure
        return map_failure(self, err, mid_session)

    def describe(self):
        up = self.master_up()
        return {"transport": "openssh", "sharing": self.sharing, "persist": self.persist,
                "shared_up": up, "control_path": self.control_path}


class _MasterForward:
    def __init__(self, cancel, port):
        self.cancel = cancel
        self.local_port = port

    def close(self):
        subprocess.run(self.cancel, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)


class _ProcessForward:
    """An `ssh -N -L` of its own: ready once the local port answers (or it failed)."""

    def __init__(self, proc, port, host):
        self.proc = proc
        self.local_port = port
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode("utf-8", "replace").strip()
                raise HostError(host, "cannot forward port %d: %s" % (port, err.splitlines()[-1] if err else
                                                                       "ssh exit %d" % proc.returncode))
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def close_master(ssh, path):
    if not os.path.exists(path):
        return False
    ok = False
    try:
        ok = subprocess.run([ssh, "-F", "/dev/null", "-o", "ControlPath=" + path.replace("%", "%%"),
                             "-O", "exit", "rtrain"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=3).returncode == 0
    except (OSError, subprocess.SubprocessError):
        pass
    if not ok:
        _kill_masters(path)
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        os.unlink(path + ".t")
    except OSError:
        pass
    return True


def _kill_masters(path):
    """SIGKILL the ssh master serving `path` (Linux: found by its title `ssh: PATH [mux]`)."""
    want = ("ssh: %s [mux]" % path).encode()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if f.read().rstrip(b"\0").startswith(want) and os.stat("/proc/" + pid).st_uid == os.geteuid():
                    os.kill(int(pid), 9)
        except OSError:
            continue


def disconnect_all(ssh=None):
    """Close every shared connection in the control directory; returns how many."""
    ssh = ssh or sc.openssh_client()
    d = control_dir()
    n = 0
    if not ssh or not os.path.isdir(d):
        return 0
    private_dir(d)
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        try:
            if stat.S_ISSOCK(os.lstat(p).st_mode) and close_master(ssh, p):
                n += 1
        except OSError:
            continue
    return n
