"""`rtrain usage`: GPU-hours of your jobs (ended and running) per host and project, from the
job records on each host (agent verb `usage`), with their cost where hosts.yaml gives the host
a `price_per_gpu_hour`, and with `compare_price` what the same GPU-hours would have cost at
that price (a cloud's, say). Returns data; render.usage_table prints it."""
import time

from . import hosts as hostsmod
from .errors import RtrainError


def seconds(text):
    from .prune import seconds as age
    try:
        return age(text)
    except RtrainError:
        raise RtrainError("--since %r is not an age" % text, "e.g. --since 30d, 12h or 90m")


def usage(session, since="30d", by=None, host=None):
    """{"rows": [...], "totals": {...}, "failures": [(host, error)], "since": epoch}. A row:
    {"host", "user", "project", "jobs", "running", "gpu_hours", "cost", "compare_cost"}; with
    `by` (project, user or host) the rows are summed per that key."""
    cut = time.time() - seconds(since)
    names = session.hosts(host)
    rows, failures = [], []
    for name, res, err in hostsmod.parallel(
            lambda h: session.client(h).call("usage", {"since": cut}), names):
        if err is not None:
            failures.append((name, err))
            continue
        h = session.cfg.get(name)
        for p in res["projects"]:
            rows.append({"host": name, "user": res["user"], "project": p["project"], "jobs": p["jobs"],
                         "running": p["running"], "gpu_hours": p["gpu_hours"],
                         "cost": _times(p["gpu_hours"], h.price_per_gpu_hour),
                         "compare_cost": _times(p["gpu_hours"], h.compare_price)})
    if by:
        rows = _sum_by(rows, by)
    rows.sort(key=lambda r: (-r["gpu_hours"], r.get("host") or "", r.get("project") or ""))
    return {"rows": rows, "totals": _sum_by(rows, None)[0] if rows else None,
            "failures": failures, "since": cut, "by": by}


def _times(hours, price):
    return None if price is None else round(hours * price, 2)


def _sum_by(rows, key):
    out = {}
    for r in rows:
        k = r[key] if key else "total"
        s = out.setdefault(k, {"host": None, "user": None, "project": None, "jobs": 0, "running": 0,
                               "gpu_hours": 0.0, "cost": None, "compare_cost": None})
        if key:
            s[key] = k
        for f in ("jobs", "running", "gpu_hours"):
            s[f] += r[f]
        for f in ("cost", "compare_cost"):
            if r[f] is not None:
                s[f] = round((s[f] or 0.0) + r[f], 2)
    return list(out.values())
