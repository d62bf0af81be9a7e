"""The verbs that ask the hosts about jobs and GPUs: status, job, cancel, gpus, pull. They
return data (or yield events) and never print; submit, logs and doctor have modules of their
own."""
import os
import time

from . import hosts as hostsmod
from .errors import AgentReplyError, RtrainError

HIDE_FINISHED_AFTER_S = 24 * 3600


def status(session, host=None, states=None, show_all=False, limit=None, fold_groups=False):
    """(jobs newest first, [(host, error)], hidden count) across hosts, asked in parallel.
    Without show_all, finished jobs older than a day are hidden and so are all but the
    `limit` newest finished ones per host. fold_groups: each sweep or array is one entry
    among the jobs, with its jobs counted per state ("counts"; groups.py)."""
    names = session.hosts(host)
    req = {"fold_groups": True} if fold_groups else {}
    if states:
        req["states"] = list(states)
    if not show_all and not states:
        req["since"] = time.time() - HIDE_FINISHED_AFTER_S
    if limit:
        req["limit"] = int(limit)
    jobs, failures, hidden = [], [], 0
    for name, res, err in hostsmod.parallel(lambda h: session.client(h).call("status", req), names):
        if err is not None:
            failures.append((name, err))
            continue
        hidden += res.get("hidden", 0)
        jobs.extend(session.decorate(name, j) for j in res["jobs"])
        if res.get("groups"):
            from .groups import decorate
            jobs.extend(decorate(session, name, g) for g in res["groups"])
    jobs.sort(key=lambda j: j["submitted_at"], reverse=True)
    return jobs, failures, hidden


def job(session, ref):
    """One job, with its GPU-hours and, where the host has price_per_gpu_hour, its cost."""
    job = session.find(ref)[2]
    job["gpu_hours"] = gpu_hours(job)
    price = session.cfg.get(job["host"]).price_per_gpu_hour
    job["cost"] = None if price is None else round(job["gpu_hours"] * price, 2)
    return job


def gpu_hours(job, now=None):
    """GPUs held times the hours they were held (until now for a running job)."""
    start = job.get("started_at")
    if not start:
        return 0.0
    end = job.get("ended_at") or (now or time.time())
    # a job sharing a GPU with others (--gpus 0.5) counts its share
    return len(job.get("gpus") or ()) / float(job.get("share") or 1) * max(0.0, end - start) / 3600.0


def cancel(session, ref):
    host, n = session.locate(ref)  # one call, not a lookup first: one round trip less
    try:
        res = session.client(host).call("cancel", {"id": n})
    except AgentReplyError as e:
        if e.code == "no_such_job":
            raise hostsmod.not_found(ref)
        raise
    out = session.decorate(host, res["job"])
    out["was"] = res["was"]
    out["ended_leftovers"] = res.get("ended_leftovers", 0)
    return out


def gpus(session, host=None):
    """[(host, result or None, error or None)] for every host, asked in parallel."""
    names = session.hosts(host)

    def ask(name):
        c = session.client(name)
        return c.call("gpus", {"settings": c.settings()})

    return hostsmod.parallel(ask, names)


def pull(session, ref, paths=(), dest=None, progress=None, pycache=False):
    """Copy files a job wrote to dest (default ./rtrain-out/JOB/, which sync never sends:
    selection.PULL_DIR). Returns [(path, size)]. progress(path, done, total) is called as
    bytes arrive. __pycache__ folders come only with pycache=True."""
    import base64
    host, n, job = session.find(ref)
    client = session.client(host)
    listing = client.call("outputs", {"id": n, "paths": list(paths), "pycache": bool(pycache)})
    from .selection import PULL_DIR
    dest = os.path.abspath(dest or os.path.join(PULL_DIR, job["id"].replace(":", "-")))
    got = []
    for f in listing["files"]:
        target = os.path.join(dest, f["path"])
        if not os.path.abspath(target).startswith(dest + os.sep):
            raise RtrainError("refusing to write %r outside %s" % (f["path"], dest))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".rtrain-part"
        done = 0
        with open(tmp, "wb") as out:
            for frame in client.stream("read", {"id": n, "path": f["path"]}):
                if "d" in frame:
                    data = base64.b64decode(frame["d"])
                    out.write(data)
                    done += len(data)
                    if progress:
                        progress(f["path"], done, f["size"])
        os.chmod(tmp, 0o755 if f.get("exec") else 0o644)
        os.replace(tmp, target)
        got.append((f["path"], done))
    return {"job": job, "dest": dest, "files": got}


def autostop(session, host, change=None):
    """The host's autostop (agent/monitor.py summary()); `change` ({"cancel": True} or {"idle",
    "command"}) changes it until autostop: in hosts.yaml changes."""
    h = session.cfg.get(host)
    if change and change.get("idle") is not None:
        from .agent.autostop import AutostopError, seconds
        try:
            change["idle"] = seconds(change["idle"], "--idle")
        except AutostopError as e:
            raise RtrainError(str(e), "e.g. rtrain autostop %s --idle 30m" % host)
    c = session.client(host)
    return c.call("autostop", {"settings": c.settings(), "autostop": h.autostop, "change": change})
