"""`rtrain prune`: free space on the hosts (the agent's `prune` verb), each host with its own
retention (hosts.yaml `prune_older_than`, `prune_keep`) unless the command line says."""
import re

from . import hosts as hostsmod
from .errors import RtrainError

DEFAULT_OLDER_THAN = "14d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def seconds(text):
    """'14d', '12h', '30m', '90s', '2w' (or a bare number of days) -> seconds."""
    m = re.match(r"\A\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*\Z", str(text))
    if not m:
        raise RtrainError("%r is not an age" % (text,), "write it as 14d, 12h, 30m or 2w")
    return float(m.group(1)) * _UNITS[m.group(2) or "d"]


def prune(session, host=None, older_than=None, keep=None, dry_run=False):
    """[(host, result or None, error or None)], hosts asked in parallel."""
    names = session.hosts(host)
    if older_than is not None:
        seconds(older_than)  # a bad value is one error, before any host is asked

    def ask(name):
        h = session.cfg.get(name)
        age = older_than if older_than is not None else (getattr(h, "prune_older_than", None)
                                                          or DEFAULT_OLDER_THAN)
        n = keep if keep is not None else (getattr(h, "prune_keep", None) or 0)
        return session.client(name).call("prune", {"older_than_s": seconds(age), "keep": int(n),
                                                   "dry_run": bool(dry_run)})

    return hostsmod.parallel(ask, names)
