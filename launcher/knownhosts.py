"""known_hosts, read as OpenSSH reads it, for the paramiko transport (paramiko's own reader
stops at the first `@cert-authority` or `@revoked` line). Host patterns with `*`, `?` and `!`,
hashed names (`|1|salt|hash`), `[host]:port`, several files; `@revoked` keys are refused
whatever host they are listed for; `@cert-authority` lines vouch for host certificates, which
paramiko does not offer, so they are skipped. Standard library only."""
import base64
import hashlib
import hmac
import re


class Entry:
    __slots__ = ("marker", "patterns", "keytype", "key", "path", "line")

    def __init__(self, marker, patterns, keytype, key, path, line):
        self.marker, self.patterns, self.keytype, self.key = marker, patterns, keytype, key
        self.path, self.line = path, line


def parse(text, path="?"):
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        parts = raw.split()
        if not parts or parts[0].startswith("#"):
            continue
        marker = None
        if parts[0].startswith("@"):
            marker, parts = parts[0].lower(), parts[1:]
        if len(parts) < 3:
            continue
        out.append(Entry(marker, parts[0], parts[1], parts[2], path, n))
    return out


def _hashed_match(pattern, name):
    try:
        salt, digest = pattern[3:].split("|", 1)
        salt_b = base64.b64decode(salt)
        want = base64.b64decode(digest)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(hmac.new(salt_b, name.encode(), hashlib.sha1).digest(), want)


def _glob(pat):
    """OpenSSH's patterns know `*` and `?` only (`[` is literal: `[host]:port`)."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pat.lower())
    return re.compile(rx + r"\Z")


def host_matches(patterns, name):
    """OpenSSH's rule: a name matches when some pattern matches it and no negated one does."""
    hit = False
    for pat in patterns.split(","):
        neg = pat.startswith("!")
        if neg:
            pat = pat[1:]
        if pat.startswith("|1|"):
            ok = _hashed_match(pat, name)
        else:
            ok = _glob(pat).match(name.lower()) is not None
        if ok and neg:
            return False
        hit = hit or ok
    return hit


class KnownHosts:
    """The entries of several known_hosts files, in order; files that cannot be read are
    skipped, as OpenSSH does."""

    def __init__(self, paths):
        self.entries = []
        self.read = []
        for p in paths:
            try:
                with open(p, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            self.read.append(p)
            self.entries += parse(text, p)

    def check(self, names, keytype, key_b64):
        """('ok' | 'revoked' | 'changed' | 'unknown', Entry or None) for the key a host showed,
        looked up under `names` (HostKeyAlias, or `[host]:port`)."""
        plain = [e for e in self.entries if any(host_matches(e.patterns, n) for n in names)]
        for e in self.entries:
            if e.marker == "@revoked" and e.key == key_b64:
                return "revoked", e
        mine = [e for e in plain if e.marker is None]
        for e in mine:
            if e.key == key_b64 and e.keytype == keytype:
                return "ok", e
        if mine:
            same_type = [e for e in mine if e.keytype == keytype]
            return "changed", (same_type or mine)[0]
        return "unknown", None


def line(name, keytype, key_b64):
    return "%s %s %s\n" % (name, keytype, key_b64)
