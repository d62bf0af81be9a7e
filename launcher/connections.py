"""Which transport each host uses and its shared connection: the `transport` line of `rtrain
hosts`, and `rtrain hosts --disconnect [HOST]`. Returns data; the CLI prints."""
from .sshcommon import transport_of


def state(transport):
    """The transport's describe(), or None (local)."""
    d = getattr(transport, "describe", None)
    return d() if d else None


def check(transport, before):
    """A doctor check row: the transport, and whether the call found a shared connection up
    (`before`: state() taken before it) or opened one."""
    now = state(transport)
    if now is None:
        return None
    if now["transport"] == "paramiko":
        detail = "paramiko (fabric): a new connection per command"
    elif not now["sharing"]:
        detail = "openssh, no connection sharing (control_persist: no)"
    elif before and before["shared_up"]:
        detail = "openssh, shared connection up (reused; closes %s after its last use)" % now["persist"]
    elif now["shared_up"]:
        detail = "openssh, shared connection opened (closes %s after its last use)" % now["persist"]
    else:
        detail = "openssh, no shared connection (another rtrain made it, or it could not be made)"
    return {"name": "transport", "ok": True, "detail": detail, "fix": ""}


def disconnect(cfg, host=None):
    """Close shared connections: host's, or every configured host's and any other rtrain left.
    Returns ([(host, 'closed' | 'none' | 'not shared')], how many others were closed)."""
    from . import hosts as hostsmod
    names = [host] if host else [n for n in cfg.hosts if cfg.hosts[n].kind == "ssh"]
    out = []
    for name in names:
        h = cfg.get(name)
        if h.kind != "ssh" or transport_of(h) != "openssh":
            out.append((name, "not shared"))
            continue
        t = hostsmod.ssh_transport(h)
        out.append((name, "closed" if t.drop_master() else "none"))
    others = 0
    if host is None:
        from .openssh import disconnect_all
        from .sshcommon import openssh_client
        if openssh_client():
            others = disconnect_all()
    return out, others
