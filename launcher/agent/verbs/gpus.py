"""`gpus`: every schedulable GPU of this host, free / busy / unknown, and who holds it."""
import json
import os

from .. import gpus, jobprocs, leases, policy
from ..protocol import AgentError


def gpus_verb(ctx):
    settings = ctx.settings
    lock_dir = settings.resolved_lock_dir()
    error = None
    found = True
    try:
        units = gpus.read(settings)
    except gpus.NvidiaSmiError as e:
        units = []
        found = e.kind != "not_found"
        error = {"kind": e.kind, "message": e.message} if found else None
    mine = {}
    shared = {}  # uuid -> our jobs on it that share it (--gpus 0.5)
    try:
        for row in ctx.con.execute("SELECT id, gpus, share FROM jobs WHERE state='running'").fetchall():
            for u in json.loads(row["gpus"]):
                mine[u] = row["id"]
                if (row["share"] or 1) > 1:
                    shared.setdefault(u, []).append(row["id"])
    except AgentError:
        pass  # a damaged job database: `hello` says so; the GPUs can still be shown
    held = leases.holders(lock_dir, [u["uuid"] for u in units])
    left = _leftovers(ctx, lock_dir, [uuid for uuid, h in held.items()
                                      if h["uid"] == os.getuid() and uuid not in mine])
    for u in units:
        u["job"] = mine.get(u["uuid"])
        u["holder"] = None
        h = held.get(u["uuid"]) or {}
        if h.get("how") == "shared":
            u["holder"] = _shared_holder(h, shared.get(u["uuid"], ()))
        elif u["job"] is not None:
            u["holder"] = "job %d" % u["job"]
        elif u["uuid"] in left:
            u["holder"] = left[u["uuid"]]
        elif h.get("how") == "socket":
            u["holder"] = "rtrain job of %s" % (h["user"] or "another user")
        elif h.get("how") == "file":
            u["holder"] = "%s (its lease file is locked by pid %s)" % (
                h["user"] or "another user", h["pid"])
        if u["holder"] and u["state"] == "free":
            u["state"] = "busy"
            u["reason"] = "leased"
        if u["state"] == "busy" and not u["holder"] and u.get("processes"):
            p = u["processes"][0]
            u["holder"] = "pid %s %s" % (p.get("pid"), p.get("name") or "")
        if h.get("note") and not u["holder"]:
            # junk at the lease file's name blocks older agents only: the lease is its socket
            u["reason"] = "%s; ignored (remove it for older rtrain agents)" % h["note"]
    policy.annotate(units)  # hidden and reserved GPUs, as the tower's admin set them
    problem = None
    if units:
        try:
            leases.ensure_dir(lock_dir)  # made here if missing, as the first GPU job would
        except leases.LockDirError as e:
            problem = str(e)
    return {"gpus": units, "error": error, "nvidia_smi_found": found, "lock_dir": lock_dir,
            "lock_dir_problem": problem}


def _shared_holder(h, ours):
    """Who holds the slots of a GPU shared by k jobs: "shared 2/2: jobs 4, 5 (0.5 each)"."""
    who = sorted({leases.user_name(uid) if uid is not None else "?" for _, uid, _ in h["slots"]})
    mine = ", ".join(str(j) for j in sorted(ours))
    return "shared %d/%d: %s%s (1/%d each)" % (
        len(h["slots"]), h["share"], ("job%s %s" % ("s" if len(ours) > 1 else "", mine)) if ours else "",
        (" and " if ours else "") + "rtrain jobs of " + ", ".join(who) if len(ours) < len(h["slots"]) else "",
        h["share"])


def _leftovers(ctx, lock_dir, uuids):
    """{uuid: holder} for GPUs whose lease one of our own processes holds while no running job
    of this home has them: processes a job left running when it ended (jobprocs.py)."""
    if not uuids:
        return {}
    names = {leases.socket_name(lock_dir, u): u for u in uuids}
    inodes = jobprocs.socket_inodes(names)
    users = jobprocs.socket_users({i for s in inodes.values() for i in s})
    mine = jobprocs.tag(ctx.home_root, "")
    out = {}
    for name, uuid in names.items():
        pids = set()
        for i in inodes.get(name, ()):
            pids |= users.get(i, set())
        jobs = {(jobprocs.environ_tag(p) or "") for p in pids}
        ids = sorted(t[len(mine):] for t in jobs if t.startswith(mine))
        if ids:
            out[uuid] = "left running by job %s (%s)" % (", ".join(ids), jobprocs.describe(pids))
        elif pids:
            out[uuid] = "another rtrain of yours (%s)" % jobprocs.describe(pids)
    return out
