"""The `containers` lines of `rtrain hosts` (doctor.py): the engines on a host, the one container
jobs get, and whether it can give them GPUs, from the agent's summary (agent/containerhost.py).
A problem is a failure where hosts.yaml names the engine (`container_engine:`: the user means
to run containers there), a warning elsewhere (host jobs do not need an engine)."""


def checks(summary, engine_set=False):
    """[check] ({"name", "ok", "detail", "fix"}) from hello's "containers" (None: not asked, or
    an older agent); the GPU line only on a host with GPUs."""
    if not summary:
        return []
    bad = False if engine_set else None
    found = []
    for engine in ("podman", "docker"):
        e = summary.get(engine)
        if not e:
            continue
        what = "%s %s" % (engine, e["version"]) if e.get("version") else "%s (%s)" % (engine, e.get("error"))
        if engine == "podman" and summary.get("podman_rootless"):
            what += " rootless"
        if engine == summary.get("engine"):
            what += " (used)"
        found.append(what)
    if summary.get("problem"):
        message, hint = summary["problem"]
        return [{"name": "containers", "ok": bad, "detail": "; ".join(found + [message]),
                 "fix": (hint or "") + ("" if engine_set else "; host jobs run")}]
    used = summary.get(summary.get("engine")) or {}
    out = [{"name": "containers", "ok": True if used.get("error") is None else bad,
            "detail": ", ".join(found),
            "fix": "" if used.get("error") is None else
            "check that %s runs here and that you may use it (docker: group docker)" % summary["engine"]}]
    g = summary.get("gpus")
    if g:
        out.append({"name": "ctr GPUs", "ok": True if g["ok"] else bad, "detail": g["detail"],
                    "fix": g.get("hint") or ""})
    return out
