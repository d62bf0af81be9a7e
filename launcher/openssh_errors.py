"""ssh's exit status 255 and what it wrote on stderr -> the one-liners of sshcommon.py, the same
text the paramiko transport gives for the same problem."""
import os
import re

from . import sshcommon as sc


def _files(conf, key, default):
    v = conf.get(key)
    if not v or v == "none":
        return default
    return [os.path.expanduser(p) for p in v.split()]


def known_files(t):
    """(user files, global files) that OpenSSH checks for this host."""
    conf = t.resolved()
    users = _files(conf, "userknownhostsfile", sc.default_user_known_hosts())
    glob = [p for p in _files(conf, "globalknownhostsfile", sc.DEFAULT_GLOBAL_KNOWN_HOSTS)
            if p != "/dev/null"]
    return users, glob


def map_failure(t, err, mid_session=False, again=True):
    host = t.name
    conf = t.resolved()
    proxied = any(conf.get(k) not in (None, "", "none") for k in ("proxyjump", "proxycommand"))
    if again and proxied and not mid_session and re.search(
            r"kex_exchange_identification|Connection closed by UNKNOWN", err):
        # with ControlPersist, OpenSSH sends the jump hosts' own errors to /dev/null: ask once
        # more without sharing to hear what went wrong on the way
        return map_failure(t, t.diagnose(), mid_session, again=False)
    user, hostname, port = conf.get("user"), conf.get("hostname"), int(conf.get("port") or 22)
    name = conf.get("hostkeyalias") if conf.get("hostkeyalias") not in (None, "", "none") else \
        sc.key_name(hostname, port)
    lines = [x.strip() for x in err.splitlines() if x.strip()]
    text = "\n".join(lines)

    m = re.search(r"Host key for (\S+) has changed", text)
    if m or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        off = re.search(r"Offending (\S+) key in (.+):(\d+)", text)
        users, _ = known_files(t)
        if off:
            return sc.changed_host_key(host, m.group(1) if m else name, off.group(2), off.group(3),
                                       off.group(1), users[0])
        return sc.changed_host_key(host, m.group(1) if m else name, users[0], None, "", users[0])
    m = re.search(r"host key for (\S+) (?:is marked as revoked|was revoked)", text)
    if m or "REVOKED HOST KEY" in text:
        return sc.revoked_host_key(host, m.group(1) if m else name)
    m = re.search(r"No \S+ host key is known for (\S+)", text)
    if m or "Host key verification failed" in text:
        users, glob = known_files(t)
        files = users[:1] + [p for p in users[1:] + glob if os.path.exists(p)]
        return sc.unknown_host_key(host, m.group(1) if m else name, files, user, hostname, port)
    m = re.search(r"open failed: (?:connect failed: )?(.+)", text)
    if m or "stdio forwarding failed" in text:
        jump = conf.get("proxyjump") if conf.get("proxyjump") not in (None, "none") else "a jump host"
        return sc.jump_failed(host, jump, "the next hop", m.group(1) if m else "stdio forwarding failed")
    m = re.search(r"(\S+)@(\S+): Permission denied \(", text)
    if m:
        who = sc.key_name(hostname, port) if m.group(2) == hostname else m.group(2)
        opened = re.search(r"Permissions \S+ for '(.+)' are too open", text)
        return sc.auth_refused(host, m.group(1), who, opened.group(1) if opened else None)
    m = re.search(r"Could not resolve hostname (\S+): (.+?)\.?$", text, re.M)
    if m:
        return sc.unresolved(host, m.group(1), m.group(2))
    m = re.search(r"connect to host (\S+) port (\d+): Connection refused", text)
    if m:
        if m.group(1) != hostname or int(m.group(2)) != port:
            return sc.jump_failed(host, m.group(1), "%s:%s" % (m.group(1), m.group(2)), "connection refused")
        return sc.refused(host, m.group(1), int(m.group(2)))
    if "timed out during banner exchange" in text:
        return sc.no_ssh_answer(host, name, t.connect_timeout)
    m = re.search(r"connect to host (\S+) port (\d+): (?:Connection|Operation) timed out", text)
    if m:
        return sc.timed_out(host, sc.key_name(m.group(1), m.group(2)), t.connect_timeout)
    m = re.search(r"connect to host (\S+) port (\d+): (.+)", text)
    if m:
        return sc.cannot_connect(host, m.group(1), int(m.group(2)), m.group(3))
    m = re.search(r"Bad owner or permissions on (.+)", text)
    if m:
        from .errors import HostError
        return HostError(host, "ssh refuses %s: bad owner or permissions" % m.group(1).strip(),
                         "it must be yours and writable by you alone (chmod 600)", permanent=True)
    if "Timeout, server" in text and "not responding" in text:
        return sc.connection_lost(host, "the host stopped answering")
    if mid_session or "closed by remote host" in text or "Broken pipe" in text or \
            "Connection reset" in text:
        last = lines[-1] if lines else "ssh ended (exit 255)"
        return sc.connection_lost(host, last)
    if re.search(r"Connection closed by \S+ port \d+|kex_exchange_identification|Connection reset", text):
        return sc.ssh_failed(host, name, "the connection was closed during the SSH handshake",
                             "ssh %s" % t.cfg.ssh)
    return sc.ssh_failed(host, name, lines[-1] if lines else "ssh ended (exit 255)",
                         "ssh -v %s" % t.cfg.ssh)
