"""Autostop: run the host's stop command (a cloud CLI call, `sudo poweroff`...) once the host has
been idle for its whole window (docs/design.md "Autostop"). Standard library only.

Idle means, for the whole window: no queued or running rtrain job of this user; no GPU lease
held and no daemon waiting for GPUs in the shared lease dir (any user's GPU jobs); no GPU above
`gpu_util_busy` percent or with a process outside rtrain; and, unless `sessions: false`, no
interactive terminal with input within the window (a pseudo-terminal's last input is its atime:
an ssh login, a tmux or screen session). This module decides (`observe`, `step`) and warns; the
monitor (monitor.py) samples and acts.
"""
import os
import re
import stat
import subprocess
import time

DEFAULTS = {"idle": 1800.0, "command": None, "gpu_util_busy": 5, "sessions": True, "warn": 300.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$")
_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class AutostopError(ValueError):
    pass


def seconds(value, what="a duration"):
    """30, '45s', '30m', '2h', '1d' -> seconds (a number alone is seconds)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    m = _DURATION.match(value) if isinstance(value, str) else None
    if not m:
        raise AutostopError("%s must be a duration like 45s, 30m or 2h, got %r" % (what, value))
    return float(m.group(1)) * _UNIT[m.group(2)]


def check(cfg):
    """The autostop settings as stored, from hosts.yaml's mapping (or a CLI change); None: off."""
    if cfg is None or cfg is False:
        return None
    if not isinstance(cfg, dict):
        raise AutostopError("autostop must be a mapping with `idle:` and `command:`")
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise AutostopError("unknown autostop key(s) %s; valid: %s" % (
            ", ".join(sorted(unknown)), ", ".join(sorted(DEFAULTS))))
    out = dict(DEFAULTS)
    out.update(cfg)
    out["idle"] = seconds(out["idle"], "autostop.idle")
    out["warn"] = min(seconds(out["warn"], "autostop.warn"), out["idle"])
    if not isinstance(out["command"], str) or not out["command"].strip():
        raise AutostopError("autostop.command must be the command that stops the host "
                            "(e.g. 'sudo shutdown -h now')")
    busy = out["gpu_util_busy"]
    if isinstance(busy, bool) or not isinstance(busy, (int, float)) or not 0 <= busy <= 100:
        raise AutostopError("autostop.gpu_util_busy must be a percent (0-100), got %r" % (busy,))
    if not isinstance(out["sessions"], bool):
        raise AutostopError("autostop.sessions must be true or false, got %r" % (out["sessions"],))
    return out


# ------------------------------------------------------------------ what keeps the host up

def terminals(now=None, window=None):
    """[(path, owner uid, seconds since its last input)] of the pseudo-terminals open on this
    host (every ssh login with a tty, tmux and screen sessions), those with input within `window`
    seconds only when it is given."""
    now = time.time() if now is None else now
    out = []
    try:
        names = os.listdir("/dev/pts")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        path = "/dev/pts/" + name
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISCHR(st.st_mode):
            continue
        idle = max(0.0, now - st.st_atime)
        if window is None or idle <= window:
            out.append((path, st.st_uid, idle))
    return out


def busy_reasons(cfg, jobs, units, gpu_error, leases_held, waiters, ttys):
    """Why the host is not idle now ([] when it is): `jobs` this user's queued/running rows,
    `units` the GPUs (gpus.read), `leases_held` {lease: pid} in the lease dir, `waiters` how many
    daemons wait for GPUs there, `ttys` terminals() with input within the window."""
    why = []
    running = [j for j in jobs if j["state"] == "running"]
    queued = [j for j in jobs if j["state"] == "queued"]
    if running:
        why.append("job %s running" % ", ".join(str(j["id"]) for j in running[:3]))
    if queued:
        why.append("job %s queued" % ", ".join(str(j["id"]) for j in queued[:3]))
    if leases_held:
        why.append("%d GPU lease(s) held (rtrain jobs of any user)" % len(leases_held))
    if waiters:
        why.append("%d rtrain daemon(s) waiting for GPUs" % waiters)
    if gpu_error:
        why.append("cannot read the GPUs (%s)" % gpu_error)
    for u in units:
        util = u.get("utilization")
        if util is not None and util > cfg["gpu_util_busy"]:
            why.append("GPU %s at %s%%" % (u["index"], util))
        elif u.get("processes"):
            p = u["processes"][0]
            why.append("GPU %s used by pid %s %s" % (u["index"], p.get("pid"), p.get("name") or ""))
    if cfg["sessions"] and ttys:
        why.append("%d terminal session(s) in use (%s)" % (len(ttys), ", ".join(
            "%s of %s" % (t[0], _user(t[1])) for t in ttys[:3])))
    return why


def _user(uid):
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return "uid %d" % uid


# ------------------------------------------------------------------ the decision

def step(cfg, state, why, now):
    """Advance the autostop state by one observation; returns (new state, action) where action
    is None, "warn" or "fire". state: {"idle_since", "warned", "fired_at"}."""
    state = dict(state or {})
    if why:
        state.update(idle_since=None, warned=False, why_not=why)
        return state, None
    state["why_not"] = []
    if state.get("fired_at") and now - state["fired_at"] < cfg["idle"]:
        return state, None  # fired, and the host is still here: a whole new window before again
    since = state.get("idle_since") or now
    state["idle_since"] = since
    idle = now - since
    if idle >= cfg["idle"] - cfg["warn"] and cfg["warn"] > 0 and not state.get("warned"):
        state["warned"] = True  # never fire unwarned: at the latest, warn now and fire next time
        return state, "warn"
    if idle >= cfg["idle"]:
        state.update(fired_at=now, idle_since=None, warned=False)
        return state, "fire"
    return state, None


def fires_in(cfg, state, now):
    """Seconds until it fires if the host stays idle, or None while it is not idle."""
    if not state or state.get("why_not") or not state.get("idle_since"):
        return None
    return max(0.0, cfg["idle"] - (now - state["idle_since"]))


def warn(message, ttys=None):
    """Write `message` on every terminal of this host: our own ones directly, the others' through
    wall(1) when there is any. Returns the terminals written to."""
    done, others = [], False
    for path, uid, _idle in (terminals() if ttys is None else ttys):
        if uid != os.getuid():
            others = True
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError:
            others = True
            continue
        try:
            os.write(fd, ("\r\n*** %s ***\r\n" % message).encode("utf-8", "replace"))
            done.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    if others:
        try:
            subprocess.run(["wall", message], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return done


def fire(command, log):
    """Run the stop command (the user's own, from hosts.yaml) through the shell, its output to
    `log` (an fd). Returns its exit code, or None when it did not end in 120 s."""
    try:
        p = subprocess.run(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=log,
                           stderr=log, timeout=120)
        return p.returncode
    except subprocess.TimeoutExpired:
        return None
    except OSError:
        return 127
