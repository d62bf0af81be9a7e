"""`rtrain hosts`: check each host, step by step (ssh, python, agent, nvidia-smi, leases,
disk), and say what to fix."""
import time

from . import connections, containercheck
from . import hosts as hostsmod
from .errors import HostError, RtrainError


def doctor(session, host=None):
    """[(host, [check])] where a check is {"name", "ok": True/False/None, "detail", "fix"}."""
    names = session.hosts(host)

    def check(name):
        h = session.cfg.get(name)
        c = session.client(name)
        out = []
        before = connections.state(c.transport)  # was a shared connection up before this call?
        t0 = time.monotonic()
        try:
            hello = c.call("hello", {"settings": c.settings(), "autostop": h.autostop,
                                     "containers": {"engine": h.container_engine}})
        except HostError as e:
            kind = "ssh" if h.kind == "ssh" else "agent"
            if e.check and h.kind == "ssh":  # ssh itself worked: say which part failed
                out.append({"name": "ssh", "ok": True, "detail": "%s reached" % h.ssh, "fix": ""})
            out.append({"name": e.check or kind, "ok": False, "detail": e.detail, "fix": e.hint})
            return out
        if h.kind == "ssh":
            out.append({"name": "ssh", "ok": True, "detail": "%s reached in %.0f ms" % (
                h.ssh, (time.monotonic() - t0) * 1000), "fix": ""})
            out.append(connections.check(c.transport, before))
        py = tuple(int(x) for x in hello["python"].split(".")[:2])
        out.append({"name": "python", "ok": py >= (3, 8), "detail": "%s (%s)" % (
            hello["python"], hello["executable"]),
            "fix": "" if py >= (3, 8) else "rtrain needs Python >= 3.8; set `python:` in hosts.yaml"})
        out.append({"name": "agent", "ok": True, "detail": "version %s, protocol %s, daemon %s" % (
            hello["agent_version"], hello["protocol"],
            "running" if hello.get("daemon_running") else "not needed: Slurm runs the jobs"
            if hello.get("slurm") is not None else "idle (starts on demand)"), "fix": ""})
        if hello.get("slurm") is not None:  # a cluster's login node: Slurm's checks, no nvidia-smi
            from . import slurmhost
            out += slurmhost.checks(hello["slurm"])
        else:
            out += _gpu_checks(c)
            out += containercheck.checks(hello.get("containers"), h.container_engine is not None)
        out += _home_checks(hello) + policy_check(hello.get("policy"))
        free = hello.get("disk_free")
        writable = bool(hello.get("home_writable"))
        # not writable: nothing works; under 1 GiB free: works until a snapshot or log fills it
        low = writable and free is not None and free < 1 << 30
        out.append({"name": "disk", "ok": None if low else writable, "detail": "%s: %s%s" % (
            hello["home"], "not writable (%s)" % hello.get("home_problem") if not writable
            else "writable", "" if free is None else ", %.1f GB free" % (free / 1e9)),
            "fix": "make it writable by you, or set `home:` in hosts.yaml" if not writable else
            "free some space or set `home:` in hosts.yaml to a larger disk" if low else ""})
        auto = hello.get("autostop") or {}
        if auto.get("enabled") or auto.get("source") == "cli":
            out.append(autostop_check(auto))
        return out

    return [(name, res if err is None else [{"name": "ssh" if session.cfg.get(name).kind == "ssh"
                                             else "agent", "ok": False, "detail": err.message,
                                             "fix": err.hint}])
            for name, res, err in hostsmod.parallel(check, names)]


def _gpu_checks(c):
    """nvidia-smi and the GPU leases of a host whose GPUs rtrain hands out."""
    out = []
    try:
        g = c.call("gpus", {"settings": c.settings()})
        if g.get("error"):
            out.append({"name": "nvidia-smi", "ok": False, "detail": g["error"]["message"],
                        "fix": "fix the NVIDIA driver there; CPU jobs (--gpus 0) still run"})
        elif not g.get("nvidia_smi_found", True):
            out.append({"name": "nvidia-smi", "ok": None, "detail": "not found: no GPUs",
                        "fix": "install the NVIDIA driver for GPU jobs; CPU jobs run"})
        else:
            free = sum(1 for u in g["gpus"] if u["state"] == "free")
            out.append({"name": "nvidia-smi", "ok": True, "detail": "%d GPU(s), %d free" % (
                len(g["gpus"]), free), "fix": ""})
            if g.get("lock_dir_problem"):
                out.append({"name": "leases", "ok": False, "detail": g["lock_dir_problem"],
                            "fix": "GPU jobs wait until it is fixed; CPU jobs run"})
            elif g.get("lock_dir"):
                out.append({"name": "leases", "ok": True, "detail": "GPU leases in %s" % (
                    g["lock_dir"]), "fix": ""})
    except RtrainError as e:
        out.append({"name": "nvidia-smi", "ok": False, "detail": e.message, "fix": e.hint})
    return out


def autostop_check(auto):
    """The `autostop` line of `rtrain hosts` (and what `rtrain autostop HOST` says) from the
    agent's summary (agent/monitor.py summary())."""
    if not auto.get("enabled"):
        return {"name": "autostop", "ok": None, "detail": "off (turned off with `rtrain autostop --cancel`)",
                "fix": "it comes back when autostop: in hosts.yaml changes, or with rtrain autostop HOST --idle"}
    rule = "`%s` after %s idle" % (auto["command"], _duration(auto["idle_s"]))
    if not auto.get("monitor"):
        return {"name": "autostop", "ok": False, "detail": "%s, but its monitor is not running" % rule,
                "fix": "run any rtrain command for this host to start it, or the systemd unit "
                       "(README: Cloud VMs)"}
    if auto.get("fires_in") is not None:
        return {"name": "autostop", "ok": True, "detail": "in %s: %s" % (_duration(auto["fires_in"]), rule),
                "fix": ""}
    if not auto.get("why_not") and auto.get("fired_ago") is not None:
        return {"name": "autostop", "ok": True, "detail": "ran its command %s ago; again after a new idle "
                "window: %s" % (_duration(auto["fired_ago"]), rule), "fix": ""}
    why = "; ".join(auto.get("why_not") or []) or "its monitor is taking a first look"
    return {"name": "autostop", "ok": True, "detail": "not idle (%s): %s" % (why, rule), "fix": ""}


def _duration(s):
    s = int(round(s))
    if s < 120:
        return "%d s" % s
    if s < 7200:
        return "%d min" % round(s / 60.0)
    return "%dh%02d" % (s // 3600, s % 3600 // 60)


def policy_check(pol):
    """The tower policy's line (agent/policy.py): what it sets, or why it is ignored."""
    if not pol or pol.get("state") in (None, "none"):
        return []
    if pol["state"] == "ignored":
        return [{"name": "policy", "ok": None, "detail": "the tower policy is ignored: %s" % pol["problem"],
                 "fix": "ask the admin: the file and its folders must be root's and writable by root only"}]
    if pol["state"] == "error":
        return [{"name": "policy", "ok": False, "detail": pol["problem"],
                 "fix": "GPU jobs wait until the admin fixes it"}]
    parts = ["%d hidden" % len(pol["hidden"])] if pol["hidden"] else []
    parts += ["GPUs reserved for %s" % "; ".join(pol["reserved"])] if pol["reserved"] else []
    parts += ["at most %s GPUs per user" % pol["cap"]] if pol.get("cap") is not None else []
    parts += ["preferred order %s" % ",".join(pol["order"])] if pol["order"] else []
    parts += ["lease dir %s" % pol["lock_dir"]] if pol.get("lock_dir") else []
    return [{"name": "policy", "ok": True, "detail": "%s: %s" % (pol["path"], ", ".join(parts) or "empty"),
             "fix": ""}]


def _home_checks(hello):
    """The job database, and whether logind ends the user's jobs at logout (logind.py)."""
    out = []
    if hello.get("database"):
        out.append({"name": "database", "ok": False, "detail": hello["database"]["message"],
                    "fix": hello["database"]["hint"]})
    logind = hello.get("logind") or {}
    if logind.get("kill_user_processes") and not logind.get("linger"):
        out.append({"name": "logind", "ok": False, "detail": "logind ends your processes when you "
                    "log out (KillUserProcesses=yes) and %s does not linger: jobs would die with "
                    "the ssh session" % hello.get("user", "you"),
                    "fix": "loginctl enable-linger %s (or ask an admin to)" % hello.get("user", "$USER")})
    elif logind.get("kill_user_processes"):
        out.append({"name": "logind", "ok": True, "detail": "KillUserProcesses=yes, but you linger: "
                    "jobs run in your user manager's scope", "fix": ""})
    return out
