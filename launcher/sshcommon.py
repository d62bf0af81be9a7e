"""What the two SSH transports (openssh.py, paramiko_transport.py) share: which transport a host
uses, where rtrain's ~/.ssh files are ($HOME's, for both), the host spec parser, shell quoting
of argv, and the error one-liners, worded the same whichever transport met the problem.
Imports nothing heavy: commands that need no host must not pay for paramiko."""
import os
import shlex
import shutil

from .errors import HostError

TRANSPORTS = ("openssh", "paramiko")


def openssh_client():
    """Path of an OpenSSH client that can share connections (ControlMaster), or None. Windows'
    OpenSSH has no ControlMaster: there, and without an `ssh`, paramiko is the default."""
    if os.name != "posix":
        return None
    return shutil.which("ssh")


def transport_of(host_cfg):
    """'openssh' or 'paramiko': the host's `transport:`, else openssh where it can be used."""
    t = getattr(host_cfg, "transport", None)
    if t:
        return t
    return "openssh" if openssh_client() else "paramiko"


# ------------------------------------------------------------------ rtrain's ~/.ssh

def home():
    """rtrain's ~ : $HOME, for both transports (README, "Your ssh config")."""
    return os.path.expanduser("~")


def expand(path):
    return os.path.expanduser(path) if path else path


def ssh_config_path():
    """The user's ssh config: $RTRAIN_SSH_CONFIG (tests), else $HOME/.ssh/config."""
    return expand(os.environ.get("RTRAIN_SSH_CONFIG") or "~/.ssh/config")


def known_hosts_override():
    """$RTRAIN_KNOWN_HOSTS: the user's known_hosts file in place of any other (tests)."""
    v = os.environ.get("RTRAIN_KNOWN_HOSTS")
    return expand(v) if v else None


def global_known_hosts_override():
    """$RTRAIN_GLOBAL_KNOWN_HOSTS: the system-wide files (paths separated by spaces; set but
    empty: none), or None when unset."""
    v = os.environ.get("RTRAIN_GLOBAL_KNOWN_HOSTS")
    if v is None:
        return None
    return [expand(p) for p in v.split()]


DEFAULT_GLOBAL_KNOWN_HOSTS = ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]


def default_user_known_hosts():
    return [expand("~/.ssh/known_hosts"), expand("~/.ssh/known_hosts2")]


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
    return user or None, host, port


def key_name(hostname, port):
    """How known_hosts names a host: `host`, or `[host]:port` off port 22."""
    port = int(port or 22)
    return hostname if port == 22 else "[%s]:%d" % (hostname, port)


def quote(s):
    """Shell-quote one argv element. `~/...` must reach the remote shell with its tilde unquoted
    to expand; everything else is quoted: no user text is ever spliced into a shell string."""
    if s.startswith("~/") and "'" not in s:
        return "~/" + shlex.quote(s[2:])
    return shlex.quote(s)


def command_line(argv, env=None):
    cmd = " ".join(quote(a) for a in argv)
    if env:
        cmd = "env " + " ".join(quote("%s=%s" % kv) for kv in env.items()) + " " + cmd
    return cmd


def agent_home(host_cfg):
    return host_cfg.home or "~/.rtrain"


def agent_path(host_cfg, digest):
    """Where the agent lives on the host, named without asking it (`~/` is expanded by the
    remote shell: quote() leaves it unquoted)."""
    h = agent_home(host_cfg)
    if h == "~":
        h = "~/"
    return "%s/agent/agent-%s.pyz" % (h.rstrip("/"), digest[:16])


def ssh_keytype(name):
    """OpenSSH's word for a key type, as its messages print it: ssh-ed25519 -> ED25519."""
    n = name.lower()
    for prefix, word in (("ssh-ed25519", "ED25519"), ("sk-ssh-ed25519", "ED25519-SK"),
                         ("ecdsa-sha2", "ECDSA"), ("sk-ecdsa", "ECDSA-SK"), ("ssh-rsa", "RSA"),
                         ("rsa-sha2", "RSA"), ("ssh-dss", "DSA")):
        if n.startswith(prefix):
            return word
    return name.upper()


# ------------------------------------------------------------------ the one-liners

def unknown_host_key(host, name, files, user, hostname, port):
    return HostError(host, "host key for %s is not in %s" % (name, " nor in ".join(files)),
                     "check the key and connect once with `ssh -p %d %s@%s`, or pass "
                     "--accept-new-host-key" % (int(port or 22), user, hostname), permanent=True)


def changed_host_key(host, name, path, line, keytype, user_file):
    where = "%s line %s" % (path, line) if line else path
    return HostError(host, "HOST KEY CHANGED for %s: %s holds a different %s key" % (
        name, where, ssh_keytype(keytype)),
        "if the host was reinstalled, remove the old key with `ssh-keygen -R '%s' -f %s`%s; "
        "otherwise someone may be intercepting the connection" % (
            name, path, "" if path == user_file else " (a system file: ask its admin)"),
        permanent=True)


def revoked_host_key(host, name, path=None, line=None):
    where = (" (%s line %s)" % (path, line)) if path else ""
    return HostError(host, "the host key of %s is marked as revoked in known_hosts%s" % (name, where),
                     "a revoked key must never be trusted: ask the host's admin which key it "
                     "should have", permanent=True)


def auth_refused(host, user, name, open_key=None):
    if open_key:  # OpenSSH ignores a private key others can read (paramiko here does too)
        return HostError(host, "authentication refused for %s@%s: the private key %s can be read "
                         "by others, so it was not used" % (user, name, open_key),
                         "chmod 600 %s" % open_key)
    return HostError(host, "authentication refused for %s@%s" % (user, name),
                     "add your public key to ~/.ssh/authorized_keys there, or set identity_file "
                     "for this host in hosts.yaml")


def key_too_open(path):
    """True for a private key file that others may read (OpenSSH refuses to use it)."""
    try:
        return os.name == "posix" and os.stat(path).st_mode & 0o077 != 0
    except OSError:
        return False


def no_ssh_answer(host, name, timeout):
    return HostError(host, "no SSH answer from %s within %gs" % (name, timeout),
                     "is the host up and is sshd listening there? (connect_timeout in hosts.yaml)")


def timed_out(host, name, timeout):
    return HostError(host, "connection to %s timed out after %gs" % (name, timeout),
                     "is the host up and reachable from here? (connect_timeout in hosts.yaml)")


def refused(host, hostname, port):
    return HostError(host, "connection refused by %s:%d" % (hostname, int(port or 22)),
                     "is sshd running there, on that port?")


def unresolved(host, hostname, reason):
    return HostError(host, "cannot resolve host name %r (%s)" % (hostname, reason),
                     "check `ssh:` in hosts.yaml and HostName in your ssh config")


def cannot_connect(host, hostname, port, reason):
    return HostError(host, "cannot connect to %s:%d: %s" % (hostname, int(port or 22), reason),
                     "check the network and `ssh:` in hosts.yaml")


def jump_failed(host, jump, target, reason):
    return HostError(host, "jump host %s cannot reach %s: %s" % (jump, target, reason),
                     "check ProxyJump in your ssh config")


def ssh_failed(host, name, reason, try_cmd):
    return HostError(host, "SSH to %s failed: %s" % (name, reason), "try `%s` to see more" % try_cmd)


def no_answer(host, timeout):
    return HostError(host, "no answer from the host for %gs" % timeout,
                     "the network or the host may be down: check with `rtrain hosts` "
                     "(io_timeout in hosts.yaml sets the limit)")


def connection_lost(host, detail, sending=False):
    return HostError(host, "connection lost%s: %s" % (" while sending" if sending else "", detail),
                     "check the network; run the command again")


def home_not_writable(host, home, where, reason):
    return HostError(host, "RTRAIN_HOME %s on %s is not writable: %s" % (home, where, reason),
                     "make it writable or set `home:` for this host in hosts.yaml", check="disk")


def disk_full(host, home, free=None):
    return HostError(host, "no space left on the device holding %s%s" % (
        home, "" if free is None else " (%d KiB free)" % (free >> 10)),
        "free some space there (old jobs live in %s/jobs), or set `home:` for this host in "
        "hosts.yaml to a larger disk" % home, check="disk")
