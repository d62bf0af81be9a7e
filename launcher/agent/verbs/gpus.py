"""`gpus`: every schedulable GPU of this host, free / busy / unknown, and who holds it."""
import json
import os

from .. import gpus, leases


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
    for row in ctx.con.execute("SELECT id, gpus FROM jobs WHERE state='running'").fetchall():
        for u in json.loads(row["gpus"]):
            mine[u] = row["id"]
    held = leases.holders(lock_dir)
    for u in units:
        u["job"] = mine.get(u["uuid"])
        u["holder"] = None
        key = os.path.basename(leases.lock_path(lock_dir, u["uuid"]))[:-5]
        if u["job"] is not None:
            u["holder"] = "job %d" % u["job"]
        elif key in held:
            u["holder"] = "rtrain job of %s" % (leases.pid_user(held[key]) or "another user")
        if u["holder"] and u["state"] == "free":
            u["state"] = "busy"
            u["reason"] = "leased"
        if u["state"] == "busy" and not u["holder"] and u.get("processes"):
            p = u["processes"][0]
            u["holder"] = "pid %s %s" % (p.get("pid"), p.get("name") or "")
    problem = None
    if units:
        try:
            leases.ensure_dir(lock_dir)  # made here if missing, as the first GPU job would
        except leases.LockDirError as e:
            problem = str(e)
    return {"gpus": units, "error": error, "nvidia_smi_found": found, "lock_dir": lock_dir,
            "lock_dir_problem": problem}
