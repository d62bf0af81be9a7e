"""Groups of jobs (sweeps, arrays) and dependencies, as the user names them: `g7` on the default
host, `tower:g7` elsewhere (what `submit -q` prints). Verbs that return data: a group's
status, cancel, the tails of its logs; and the dependencies of a submit (one host only)."""
import base64
import re

from . import hosts as hostsmod
from .errors import AgentReplyError, JobNotFound, RtrainError

_GROUP_REF = re.compile(r"^(?:(?P<host>[^:\s]+):)?g(?P<id>\d+)$")


def is_group(ref):
    return bool(_GROUP_REF.match(str(ref).strip()))


def format_id(cfg, host, gid):
    return "g%s" % gid if host == hostsmod.default_host(cfg) else "%s:g%s" % (host, gid)


def parse(cfg, ref):
    """'g7' or 'tower:g7' -> (host or None: ask every host, 7)."""
    m = _GROUP_REF.match(str(ref).strip())
    if not m:
        raise RtrainError("%r is not a group id" % ref, "group ids look like g7 or tower:g7")
    host = m.group("host")
    if host is not None:
        cfg.get(host)
    else:
        host = hostsmod.default_host(cfg)
    return host, int(m.group("id"))


def find(session, ref):
    """(host, group id, the agent's answer to status {"group"}) of a group reference."""
    host, gid = parse(session.cfg, ref)
    names = [host] if host is not None else list(session.cfg.hosts)
    found, errors = [], []
    for name, res, err in hostsmod.parallel(
            lambda h: session.client(h).call("status", {"group": gid}), names):
        if err is None:
            found.append((name, res))
        elif not (isinstance(err, AgentReplyError) and err.code == "no_such_job"):
            errors.append(err)
    if len(found) == 1:
        return found[0][0], gid, found[0][1]
    if len(found) > 1:
        raise RtrainError("group %s exists on several hosts: %s" % (ref, ", ".join(h for h, _ in found)),
                          "name it as HOST:g%d, e.g. %s:g%d" % (gid, found[0][0], gid))
    if errors:
        raise errors[0]
    raise JobNotFound("no group %s" % ref, "`rtrain status` lists your groups")


def decorate(session, host, g):
    g = dict(g)
    g["host"] = host
    g["id"] = format_id(session.cfg, host, g["group"])
    return g


def status(session, ref):
    """(the group's summary, its jobs newest first)."""
    host, _gid, res = find(session, ref)
    return (decorate(session, host, res["groups"][0]),
            [session.decorate(host, j) for j in res["jobs"]])


def cancel(session, ref):
    host, gid, _ = find(session, ref)
    res = session.client(host).call("cancel", {"group": gid})
    out = decorate(session, host, res["group"])
    out["cancelled_queued"] = res["cancelled_queued"]
    out["cancelled_running"] = res["cancelled_running"]
    return out


def tails(session, ref, lines):
    """(the group's summary, [(job, the last `lines` lines of its log as bytes)])."""
    host, gid, _ = find(session, ref)
    res = session.client(host).call("logs", {"group": gid, "tail_lines": int(lines)})
    return (decorate(session, host, res["group"]),
            [(session.decorate(host, j), base64.b64decode(j["tail"])) for j in res["jobs"]])


def dependencies(cfg, after, after_any, host):
    """(the host the job must go to, its `after` refs, its `after_any` refs), refs as the agent
    there takes them (12, "g7"). A dependency is on the job's own host: a job or group of
    another host is refused here (the agent refuses an unknown one)."""
    def one(text):
        out = []
        for ref in [x.strip() for t in text for x in t.split(",") if x.strip()]:
            if is_group(ref):
                h, n = parse(cfg, ref)
                local = "g%d" % n
            else:
                h, n = hostsmod.parse_ref(cfg, ref)
                local = n
            out.append((h, local, ref))
        return out

    a, b = one(after or ()), one(after_any or ())
    named = sorted({h for h, _, _ in a + b if h is not None})
    if host is None and len(named) > 1:
        raise RtrainError("dependencies are on one host; these are on %s" % " and ".join(named),
                          "a job can wait only for jobs of its own host")
    target = host or (named[0] if named else None)
    for h, _local, ref in a + b:
        if h is None and target is None:
            raise RtrainError("dependency %s: which host? several hosts are configured" % ref,
                              "name it as HOST:%s (e.g. tower:%s)" % (ref, ref))
        if h is not None and target is not None and h != target:
            raise RtrainError("dependencies are on one host: %s is on %s, the job goes to %s" % (
                ref, h, target), "submit the job to %s (--host %s), or drop that dependency" % (h, h))
    return target, [x for _, x, _ in a], [x for _, x, _ in b]
