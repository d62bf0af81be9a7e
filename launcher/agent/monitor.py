"""The monitor: a per-user process that watches the GPUs while something needs watching, and acts
(docs/design.md "Autostop", "Stalled jobs"). Standard library only.

Two things need it: the host's autostop settings (autostop.py), and running jobs that asked to be
told when their GPUs stall (`stall.json` in the job's folder: `after` seconds under `util_busy`
percent, then `action`: notify, or cancel). Every INTERVAL_S it reads nvidia-smi, the job table
and the shared lease dir, advances both, and writes what it saw to monitor-state.json (what
`rtrain hosts` shows: "autostop in 12 min", or why not). Like the daemon it is started on demand
(ensure(), by any agent call that may need it), guarded by a lock, in its own session; it goes
when nothing needs it. After a reboot the next rtrain command starts it, or a systemd user unit
at boot (docs/rtrain-monitor.service runs RTRAIN_HOME/bin/rtrain-monitor, written by ensure()).
"""
import fcntl
import json
import os
import signal
import sys
import time
import traceback

from . import autostop, db, detach, fsutil, gpus, jobstate, leases, notify
from .settings import Settings

INTERVAL_S = float(os.environ.get("RTRAIN_MONITOR_INTERVAL_S", "30"))


# ------------------------------------------------------------------ files

def _path(home, name):
    return os.path.join(home.root, name)


def config(home):
    """{"config": autostop settings or None, "source": "hosts.yaml" | "cli", "settings": the host's
    GPU settings, "from_hosts": what hosts.yaml said last} (autostop.json), or {}."""
    rec = fsutil.read_json(_path(home, "autostop.json"))
    return rec if isinstance(rec, dict) else {}


def push(home, from_hosts, settings, change=None):
    """Record the autostop settings. from_hosts: what hosts.yaml says now (sent by every client
    that talks to the host); it is adopted only when it differs from what hosts.yaml said last,
    so a change made with `rtrain autostop` (change: {"config": ...}) stays until hosts.yaml's own
    settings change. Returns the record."""
    rec = config(home)
    new = dict(rec)
    if from_hosts is not None or "from_hosts" not in rec:
        checked = autostop.check(from_hosts) if from_hosts is not None else None
        if checked != rec.get("from_hosts") or "config" not in rec:
            new.update(config=checked, source="hosts.yaml", from_hosts=checked)
    if change is not None:
        new.update(config=change["config"], source="cli")
    if settings is not None:
        new["settings"] = settings
    if new != rec:
        fsutil.write_json_atomic(_path(home, "autostop.json"), new)
    return new


def state(home):
    rec = fsutil.read_json(_path(home, "monitor-state.json"))
    return rec if isinstance(rec, dict) else {}


def _stall_cfg(home, job_id):
    rec = fsutil.read_json(home.job(job_id).stall)
    return rec if isinstance(rec, dict) and rec.get("after") else None


def needed(home, con):
    """Autostop is on, or a queued or running job wants its GPUs watched."""
    if config(home).get("config"):
        return True
    return any(_stall_cfg(home, r["id"]) for r in
               con.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')"))


# ------------------------------------------------------------------ lifecycle

def running(home):
    return fsutil.flock_held(_path(home, "monitor.lock"), create=True)


def ensure(home, con, argv):
    """Start the monitor if something needs it and none runs. True when one runs or was just
    started. Never raises."""
    try:
        if not needed(home, con):
            return False
        _write_starter(home, argv)
        if running(home):
            return True
        detach.start(argv, "monitor", home, _path(home, "monitor.log"))
        return True
    except (OSError, ValueError):
        return False


def _write_starter(home, argv):
    """RTRAIN_HOME/bin/rtrain-monitor: starts the monitor of the agent build last used, for a
    systemd user unit at boot (docs/rtrain-monitor.service)."""
    import shlex
    d = _path(home, "bin")
    path = os.path.join(d, "rtrain-monitor")
    text = "#!/bin/sh\n# written by rtrain: runs this user's rtrain monitor (autostop, stalled jobs)\n" \
           "echo %s | exec %s monitor\n" % (shlex.quote(json.dumps({"home": home.root})),
                                            " ".join(shlex.quote(a) for a in argv))
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = path + ".tmp%d" % os.getpid()
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)


class Monitor:
    def __init__(self, home, interval=None, clock=time.time):
        self.home = home
        self.con = home.open_db()
        self.interval = INTERVAL_S if interval is None else interval
        self.clock = clock
        self.state = state(home)
        self.log_fd = sys.stdout.fileno()

    def say(self, text):
        print(time.strftime("%Y-%m-%d %H:%M:%S"), text, flush=True)

    def serve(self, max_ticks=None):
        lock = os.open(_path(self.home, "monitor.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            return 0
        os.ftruncate(lock, 0)
        os.write(lock, json.dumps({"pid": os.getpid()}).encode())
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        idle_ticks = ticks = 0
        try:
            while not stop and (max_ticks is None or ticks < max_ticks):
                ticks += 1
                try:
                    busy = self.tick()
                except Exception:  # noqa: BLE001 - one bad tick must not end the watch
                    traceback.print_exc()
                    busy = True
                idle_ticks = 0 if busy else idle_ticks + 1
                if idle_ticks >= 3:
                    return 0  # nothing to watch for three ticks
                time.sleep(self._interval())
        finally:
            os.close(lock)
        return 0

    def _interval(self):
        """INTERVAL_S, or less where an autostop window is short: it looks at least four times
        per idle window and twice per warning."""
        cfg = config(self.home).get("config")
        if not cfg:
            return self.interval
        return max(0.05, min([self.interval, cfg["idle"] / 4.0] + ([cfg["warn"] / 2.0] if cfg["warn"] else [])))

    # -------------------------------------------------------------- one look

    def tick(self):
        """One look at the host. False when nothing needs watching."""
        now = self.clock()
        rec = config(self.home)
        cfg = rec.get("config")
        jobs = db.active(self.con)
        watched = [(r, _stall_cfg(self.home, r["id"])) for r in jobs if r["state"] == "running"]
        watched = [(r, c) for r, c in watched if c]
        if not cfg and not watched:
            self.state.pop("autostop", None)
            self.state["stalls"] = {}
            self._save(now)
            # a queued job that will want watching keeps the monitor
            return any(_stall_cfg(self.home, r["id"]) for r in jobs)
        views = {}
        host_settings = Settings.from_dict(rec.get("settings"))
        if cfg:
            views[host_settings] = self._units(host_settings)
        for r, _ in watched:
            s = Settings.from_dict(json.loads(r["settings"] or "{}"))
            if s not in views:
                views[s] = self._units(s)
        self._stalls(watched, views, now)
        if cfg:
            self._autostop(cfg, host_settings, jobs, views[host_settings], now)
        else:
            self.state.pop("autostop", None)
        self._save(now)
        return True

    def _units(self, settings):
        try:
            return gpus.read(settings), None
        except gpus.NvidiaSmiError as e:
            return [], (None if e.kind == "not_found" else e.message)

    def _autostop(self, cfg, settings, jobs, view, now):
        units, error = view
        lock_dir = settings.resolved_lock_dir()
        held = {u: h for u, h in leases.holders(lock_dir, [x["uuid"] for x in units]).items() if h["how"]}
        try:
            waiters = sum(1 for n in os.listdir(lock_dir) if n.startswith(leases.WAKE_PREFIX))
        except OSError:
            waiters = 0
        ttys = autostop.terminals(now, cfg["idle"]) if cfg["sessions"] else []
        why = autostop.busy_reasons(cfg, jobs, units, error, held, waiters, ttys)
        st, action = autostop.step(cfg, self.state.get("autostop"), why, now)
        if action == "warn":
            left = autostop.fires_in(cfg, st, now) or 0
            msg = "rtrain autostop: this host has been idle; it stops in %d min (%s)" % (
                round(left / 60.0), cfg["command"])
            done = autostop.warn(msg, autostop.terminals(now))
            self.say("autostop: warned %d terminal(s): %s" % (len(done), msg))
        elif action == "fire":
            self.say("autostop: idle for %ds, running: %s" % (cfg["idle"], cfg["command"]))
            rc = autostop.fire(cfg["command"], self.log_fd)
            st["last_exit"] = rc
            self.say("autostop: the command ended with %s" % rc)
        st["fires_in"] = autostop.fires_in(cfg, st, now)
        st["idle_s"] = cfg["idle"]
        self.state["autostop"] = st

    def _stalls(self, watched, views, now):
        stalls = self.state.setdefault("stalls", {})
        live = set()
        for row, cfg in watched:
            key = str(row["id"])
            live.add(key)
            s = Settings.from_dict(json.loads(row["settings"] or "{}"))
            units, error = views[s]
            mine = set(json.loads(row["gpus"] or "[]"))
            utils = [u.get("utilization") for u in units if u["uuid"] in mine]
            st = stalls.setdefault(key, {})
            low = bool(utils) and not error and all(x is not None and x <= cfg.get("util_busy", 5) for x in utils)
            if not low:
                if st.get("idle_since"):
                    self._message(row, "")
                stalls[key] = {}
                continue
            since = st.setdefault("idle_since", now)
            idle = now - since
            if idle < cfg["after"]:
                continue
            text = "GPU idle %s" % _minutes(idle)
            self._message(row, text)
            if not st.get("told"):
                st["told"] = True
                self.say("job %s stalled: %s" % (row["id"], text))
                notify.job_event(self.home, db.get(self.con, row["id"]), state="stalled", message=text)
                if cfg.get("action") == "cancel":
                    self.say("job %s: cancelled (on_stall: cancel)" % row["id"])
                    jobstate.request_cancel(self.home, row)
        for key in list(stalls):
            if key not in live:
                del stalls[key]

    def _message(self, row, text):
        cur = db.get(self.con, row["id"])
        if cur is None or cur["state"] != "running" or cur["message"] == text:
            return
        if text or cur["message"].startswith("GPU idle"):
            with db.Tx(self.con):
                self.con.execute("UPDATE jobs SET message=? WHERE id=? AND state='running'", (text, row["id"]))

    def _save(self, now):
        self.state["at"] = now
        self.state["pid"] = os.getpid()
        try:
            fsutil.write_json_atomic(_path(self.home, "monitor-state.json"), self.state, durable=False)
        except OSError:
            pass


def _minutes(s):
    if s < 120:
        return "%d s" % s
    if s < 7200:
        return "%d min" % (s // 60)
    return "%dh%02d" % (s // 3600, s % 3600 // 60)


def summary(home, now=None, started=False):
    """What `rtrain hosts` says of autostop: {"enabled", "source", "idle_s", "command",
    "fires_in" or None, "why_not": [...], "monitor": running (or `started` just now) or not}."""
    now = time.time() if now is None else now
    rec = config(home)
    cfg = rec.get("config")
    if not cfg:
        return {"enabled": False, "source": rec.get("source")}
    st = state(home).get("autostop") or {}
    fresh = st and now - state(home).get("at", 0) < 3 * INTERVAL_S + 5
    return {"enabled": True, "source": rec.get("source"), "idle_s": cfg["idle"], "command": cfg["command"],
            "fires_in": autostop.fires_in(cfg, st, now) if fresh else None,
            "fired_ago": now - st["fired_at"] if fresh and st.get("fired_at") else None,
            "why_not": st.get("why_not", []) if fresh else [], "monitor": started or running(home)}
