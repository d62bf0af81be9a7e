"""The tower's policy, set by its admin in /etc/rtrain/tower.yaml (docs/design.md "Tower
policy"), read by every agent on the host (the scheduler, `gpus`, `hello`):

    hidden: [3]                 # GPUs rtrain never hands out (indexes or UUIDs)
    order: [2, 3]               # GPUs handed out first, in this order; the others after
    max_gpus_per_user: 2        # GPUs one user may hold at once (a share counts its fraction)
    reserved:                   # GPUs only these users or Unix groups may use
      - gpus: [0]
        users: [alice]
        groups: [vision]
    lock_dir: /run/lock/rtrain  # the default lease dir (hosts.yaml's lock_dir wins)

The file is optional. It counts only when root owns it and nobody else can write it, nor any
folder above it (a sticky one aside): otherwise any user could hand themselves GPUs, and it is
ignored, with a warning in `rtrain hosts`. A policy with an error (its line said) holds every
GPU job with that error until the admin fixes it: rtrain never hands out GPUs the admin may
have meant to hide. RTRAIN_TOWER_POLICY names another path (tests); the same checks apply.
Standard library only, Python >= 3.8.
"""
import os
import stat

from . import miniyaml

PATH = "/etc/rtrain/tower.yaml"
ENV = "RTRAIN_TOWER_POLICY"
KEYS = ("hidden", "order", "max_gpus_per_user", "reserved", "lock_dir")
RULE_KEYS = ("gpus", "users", "groups")

_cache = {}


class Policy(object):
    """state: "none" (no file), "ok", "ignored" (not trusted: `problem` says why) or "error"
    (trusted but wrong: `problem` says where)."""

    def __init__(self, path, state="none", problem="", data=None):
        self.path = path
        self.state = state
        self.problem = problem
        d = data or {}
        self.hidden = set(d.get("hidden") or ())
        self.order = list(d.get("order") or ())
        self.cap = d.get("max_gpus_per_user")
        self.reserved = list(d.get("reserved") or ())
        self.lock_dir = d.get("lock_dir")

    @property
    def active(self):
        return self.state == "ok"

    def _ids(self, unit):
        ids = {unit["index"], unit["uuid"]}
        if ":" in unit["index"]:  # a MIG device: its GPU's rules apply
            ids.add(unit["index"].split(":", 1)[0])
        if unit.get("parent_uuid"):
            ids.add(unit["parent_uuid"])
        return ids

    def hides(self, unit):
        return self.active and bool(self._ids(unit) & self.hidden)

    def rule(self, unit):
        """The reservation that covers unit, or None."""
        if not self.active:
            return None
        ids = self._ids(unit)
        for r in self.reserved:
            if ids & r["gpus"]:
                return r
        return None

    def may_use(self, unit, me):
        """me: (user name, set of group names)."""
        r = self.rule(unit)
        return r is None or me[0] in r["users"] or bool(me[1] & r["groups"])

    def rank(self, unit, pos):
        """Sort key: GPUs of `order` first, in its order; then the others as listed (pos)."""
        ids = self._ids(unit)
        for i, x in enumerate(self.order if self.active else ()):
            if x in ids:
                return (0, i, pos)
        return (1, 0, pos)

    def summary(self):
        return {"path": self.path, "state": self.state, "problem": self.problem,
                "hidden": sorted(self.hidden), "order": self.order, "cap": self.cap,
                "reserved": [describe(r) for r in self.reserved], "lock_dir": self.lock_dir}


def describe(rule):
    who = sorted(rule["users"]) + ["group %s" % g for g in sorted(rule["groups"])]
    return ", ".join(who) or "nobody"


def path():
    return os.environ.get(ENV) or PATH


def load(where=None):
    """The Policy at `where` (default: path()), read again only when the file changed."""
    where = where or path()
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        return Policy(where)
    except OSError as e:
        return Policy(where, "ignored", "cannot read %s: %s" % (where, e.strerror))
    why = untrusted(where, st)
    if why:
        return Policy(where, "ignored", why)
    key = (where, st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _cache:
        _cache.clear()
        _cache[key] = _read(where)
    return _cache[key]


def untrusted(where, st):
    """Why the policy file cannot be trusted (someone but root could change it), or ""."""
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        return "%s is not a regular file" % where
    if st.st_uid != 0:
        return "%s belongs to %s, not root" % (where, _user(st.st_uid))
    if st.st_mode & 0o022:
        return "%s can be written by users other than root (chmod go-w)" % where
    d = os.path.dirname(os.path.abspath(where))
    while True:
        try:
            dst = os.lstat(d)
        except OSError as e:
            return "cannot check %s: %s" % (d, e.strerror)
        if stat.S_ISLNK(dst.st_mode):
            return "%s is a symlink" % d
        if dst.st_uid != 0:
            return "its folder %s belongs to %s, not root" % (d, _user(dst.st_uid))
        if dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX:
            return "its folder %s can be written by users other than root" % d
        if d == "/":
            return ""
        d = os.path.dirname(d)


def _user(uid):
    from .lockdir import user_name
    return user_name(uid)


def _read(where):
    try:
        with open(where, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return Policy(where, "error", "cannot read %s: %s" % (where, e))
    try:
        return Policy(where, "ok", "", check(miniyaml.parse(text)))
    except miniyaml.MiniYAMLError as e:
        return Policy(where, "error", ("%s:%d: %s" % (where, e.line, e.message)) if e.line else
                      "%s: %s" % (where, e.message))


def check(doc):
    """The policy's values, normalised (ids as strings, sets); MiniYAMLError(line 0) if wrong."""
    def bad(msg):
        raise miniyaml.MiniYAMLError(0, msg)

    if doc is None:
        return {}
    if not isinstance(doc, dict):
        bad("the policy must be a mapping of %s" % ", ".join(KEYS))
    for k in doc:
        if k not in KEYS:
            bad("unknown key %r; valid keys: %s" % (k, ", ".join(KEYS)))
    out = {"hidden": _ids(doc.get("hidden"), "hidden", bad), "order": list(_ids(doc.get("order"), "order", bad,
                                                                            keep_order=True))}
    cap = doc.get("max_gpus_per_user")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap < 0):
        bad("max_gpus_per_user must be a number of GPUs, got %r" % (cap,))
    out["max_gpus_per_user"] = cap
    rules = doc.get("reserved") or []
    if not isinstance(rules, list):
        bad("reserved must be a list of {gpus, users, groups}")
    out["reserved"] = []
    for r in rules:
        if not isinstance(r, dict) or not r.get("gpus") or set(r) - set(RULE_KEYS):
            bad("each reserved entry is {gpus: [...], users: [...], groups: [...]}, got %r" % (r,))
        out["reserved"].append({"gpus": set(_ids(r["gpus"], "reserved gpus", bad)),
                                "users": set(_names(r.get("users"), "users", bad)),
                                "groups": set(_names(r.get("groups"), "groups", bad))})
    ld = doc.get("lock_dir")
    if ld is not None and (not isinstance(ld, str) or not ld.startswith("/")):
        bad("lock_dir must be an absolute path, got %r" % (ld,))
    out["lock_dir"] = ld
    return out


def _ids(v, what, bad, keep_order=False):
    if v is None:
        return [] if keep_order else set()
    if not isinstance(v, list):
        v = [v]
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, str)) or str(x) == "":
            bad("%s: %r is not a GPU index or UUID" % (what, x))
        out.append(str(x))
    return out if keep_order else set(out)


def _names(v, what, bad):
    if v is None:
        return []
    if not isinstance(v, list):
        v = [v]
    if not all(isinstance(x, str) and x for x in v):
        bad("%s must be a list of names" % what)
    return v


def me():
    """(this user's name, the names of their groups)."""
    import grp
    import pwd
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    groups = set()
    for gid in set(os.getgroups()) | {os.getgid()}:
        try:
            groups.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return name, groups


def annotate(units, pol=None, who=None):
    """Mark what the policy does to each GPU for `rtrain gpus`: "policy" (a sentence), and the
    state "hidden" (never handed out) or "reserved" (free, but for others only)."""
    pol = pol or load()
    if not pol.active:
        return units
    who = who or me()
    for u in units:
        r = pol.rule(u)
        if pol.hides(u):
            u["state"], u["policy"] = "hidden", "hidden by the tower policy"
        elif r is not None and not pol.may_use(u, who):
            u["policy"] = "reserved for %s" % describe(r)
            if u["state"] == "free":
                u["state"] = "reserved"
        elif r is not None:
            u["policy"] = "reserved for %s (you may use it)" % describe(r)
    return units
