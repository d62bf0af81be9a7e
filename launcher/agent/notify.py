"""Job notifications: a webhook POSTed when a job ends, or stalls (docs/design.md
"Notifications"). Standard library only, Python >= 3.8.

A job's `notify` settings (url, format, the states to tell) live in its folder, 0600 (a webhook
URL is a secret), written at submit. When a job reaches a state it wants told, `job_event()`
queues the event as one small file under RTRAIN_HOME/notify/ (atomic) and starts the sender if
none runs: a detached process, one per home (a lock), that POSTs each queued event, retrying with
backoff (1 s doubling to 60 s) for up to RETRY_FOR_S, then drops it. A webhook that keeps failing
is said once in notify.log, not once per event. The scheduler never waits on the network.
"""
import fcntl
import json
import os
import time

from . import fsutil

FORMATS = ("json", "slack", "discord", "ntfy")
STATES = ("succeeded", "failed", "cancelled", "lost", "stalled")
DEFAULT_ON = ("failed", "succeeded", "stalled")
RETRY_FOR_S = float(os.environ.get("RTRAIN_NOTIFY_RETRY_FOR_S", "600"))
TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20


class NotifyError(ValueError):
    pass


def check(cfg):
    """The notify settings as stored, from what a client sent; raises NotifyError."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise NotifyError("notify must be a mapping with `url:`")
    url = cfg.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise NotifyError("notify.url must be an http:// or https:// URL, got %r" % (url,))
    fmt = cfg.get("format", "json")
    if fmt not in FORMATS:
        raise NotifyError("notify.format must be one of %s, got %r" % (", ".join(FORMATS), fmt))
    on = cfg.get("on", list(DEFAULT_ON))
    if isinstance(on, str):
        on = [on]
    if not isinstance(on, list) or not on or any(s not in STATES for s in on):
        raise NotifyError("notify.on must list states among %s, got %r" % (", ".join(STATES), on))
    return {"url": url, "format": fmt, "on": list(on), "host": str(cfg.get("host") or "")}


# ------------------------------------------------------------------ what is sent

def event(home, row, state=None, message=None):
    """The event of job `row` (a jobs row) reaching `state` (default: its own)."""
    started, ended = row["started_at"], row["ended_at"]
    return {"job": row["id"], "name": row["name"], "state": state or row["state"],
            "exit_code": row["exit_code"], "signal": row["signal"],
            "message": message if message is not None else row["message"],
            "command": row["command"],
            "duration_s": None if not started else round((ended or time.time()) - started, 1),
            "log_tail": _tail(home.job(row["id"]).log), "at": time.time()}


def _tail(path, lines=LOG_TAIL_LINES, limit=16384):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def summary(ev, host):
    """One line a person reads first."""
    where = " on %s" % host if host else ""
    how = ""
    if ev.get("exit_code") is not None:
        how = " (exit code %s%s)" % (ev["exit_code"], ", %s" % ev["signal"] if ev.get("signal") else "")
    elif ev.get("message"):
        how = " (%s)" % ev["message"]
    return "rtrain job %s %s%s %s%s" % (ev["job"], ev.get("name") or "", where, ev["state"], how)


def body(fmt, ev, host=""):
    """(bytes, headers) of the POST for format `fmt`."""
    line = summary(ev, host)
    tail = ev.get("log_tail") or ""
    if fmt == "slack":
        text = line + ("\n```\n%s\n```" % tail[-2800:] if tail else "")
        return json.dumps({"text": text}).encode(), {"Content-Type": "application/json"}
    if fmt == "discord":
        text = line + ("\n```\n%s\n```" % tail[-1800:] if tail else "")
        return json.dumps({"content": text}).encode(), {"Content-Type": "application/json"}
    if fmt == "ntfy":
        tags = {"succeeded": "white_check_mark", "failed": "x", "stalled": "warning"}.get(
            ev["state"], "information_source")
        return ((line + ("\n\n" + tail[-3000:] if tail else "")).encode("utf-8"),
                {"Title": line[:200].encode("ascii", "replace").decode(), "Tags": tags,
                 "Priority": "high" if ev["state"] in ("failed", "lost", "stalled") else "default"})
    d = dict(ev)
    d["host"] = host
    d["summary"] = line
    return json.dumps(d).encode(), {"Content-Type": "application/json"}


# ------------------------------------------------------------------ the queue

def _queue_dir(home):
    return os.path.join(home.root, "notify")


def job_event(home, row, state=None, message=None, argv=None):
    """Queue the event of `row` reaching `state` if its job asked to be told, and see that the
    sender runs. Never raises: a notification is never a reason for a job to fail."""
    try:
        cfg = fsutil.read_json(home.job(row["id"]).notify)
        state = state or row["state"]
        if not cfg or state not in cfg.get("on", ()):
            return False
        d = _queue_dir(home)
        os.makedirs(d, mode=0o700, exist_ok=True)
        ev = event(home, row, state, message)
        name = "%.6f-%d-%s.json" % (time.time(), row["id"], os.urandom(3).hex())
        fsutil.write_json_atomic(os.path.join(d, name), {"cfg": cfg, "event": ev, "tries": 0,
                                                         "first": time.time()}, durable=False)
        os.chmod(os.path.join(d, name), 0o600)
        start_sender(home, argv)
        return True
    except (OSError, ValueError, TypeError, KeyError):
        return False


def start_sender(home, argv=None):
    """Start the sender (`agent notify`, detached) unless one runs."""
    if _sender_running(home):
        return
    if argv is None:
        from .main import agent_argv
        argv = agent_argv()
    from . import detach
    detach.start(argv, "notify", home, os.path.join(home.root, "notify.log"))


def _lock_path(home):
    return os.path.join(home.root, "notify.lock")


def _sender_running(home):
    return fsutil.flock_held(_lock_path(home), create=True)


def _post(url, data, headers, timeout=TIMEOUT_S):
    import urllib.request  # here: the sender needs it, a submit's check of `notify:` does not
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status


def deliver(home, post=_post, sleep=time.sleep, now=time.time, say=None):
    """The sender's loop: send what is queued, oldest first, until the queue is empty. Returns
    the number sent. A failing URL is said once (say, default: print to notify.log)."""
    import urllib.error
    lock = os.open(_lock_path(home), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return 0  # another sender has the queue
    os.ftruncate(lock, 0)
    os.write(lock, json.dumps({"pid": os.getpid()}).encode())
    say = say or (lambda text: print(time.strftime("%Y-%m-%d %H:%M:%S"), text, flush=True))
    sent, failing = 0, set()
    try:
        while True:
            d = _queue_dir(home)
            try:
                names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
            except FileNotFoundError:
                names = []
            if not names:
                return sent
            wait = None
            for name in names:
                path = os.path.join(d, name)
                item = fsutil.read_json(path)
                if not isinstance(item, dict) or now() < item.get("next", 0):
                    if isinstance(item, dict):
                        wait = item["next"] - now() if wait is None else min(wait, item["next"] - now())
                    else:
                        _drop(path)
                    continue
                cfg, ev = item["cfg"], item["event"]
                data, headers = body(cfg["format"], ev, cfg.get("host", ""))
                try:
                    code = post(cfg["url"], data, headers)
                    ok, why = 200 <= int(code) < 300, "HTTP %s" % code
                except urllib.error.HTTPError as e:
                    ok, why = False, "HTTP %s" % e.code
                except (urllib.error.URLError, OSError, ValueError) as e:
                    ok, why = False, str(getattr(e, "reason", e))
                if ok:
                    _drop(path)
                    sent += 1
                    failing.discard(cfg["url"])
                    continue
                if cfg["url"] not in failing:
                    failing.add(cfg["url"])
                    say("notify: %s failed (%s); retrying for up to %ds" % (_safe(cfg["url"]), why, RETRY_FOR_S))
                tries = item.get("tries", 0) + 1
                if now() - item.get("first", now()) > RETRY_FOR_S:
                    say("notify: gave up on job %s's %s event for %s (%s)" % (
                        ev.get("job"), ev.get("state"), _safe(cfg["url"]), why))
                    _drop(path)
                    continue
                item.update(tries=tries, next=now() + min(60.0, 2.0 ** (tries - 1)))
                fsutil.write_json_atomic(path, item, durable=False)
                wait = item["next"] - now() if wait is None else min(wait, item["next"] - now())
            if wait is not None and wait > 0:
                sleep(min(wait, 60.0))
    finally:
        os.close(lock)


def _drop(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _safe(url):
    """A URL for a log line: its scheme, host and the first part of its path (tokens hidden)."""
    try:
        from urllib.parse import urlsplit
        u = urlsplit(url)
        return "%s://%s/..." % (u.scheme, u.hostname or "?")
    except ValueError:
        return "a webhook"
