"""One function per verb. They return data (or yield events) and never print."""
import os
import shlex
import time
import uuid

from . import hosts as hostsmod
from .errors import AgentReplyError, HostError, RtrainError

HIDE_FINISHED_AFTER_S = 24 * 3600


class Session:
    """The configuration plus one open client per host, closed together."""

    def __init__(self, cfg, accept_new_host_key=False):
        self.cfg = cfg
        self.accept_new = accept_new_host_key
        self._clients = {}

    def client(self, name):
        if name not in self._clients:
            self._clients[name] = hostsmod.open_client(self.cfg.get(name), self.accept_new)
        return self._clients[name]

    def close(self):
        for c in self._clients.values():
            try:
                c.transport.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._clients.clear()

    def reset(self, name):
        """Drop a host's connection (after it broke); the next call opens a new one."""
        c = self._clients.pop(name, None)
        if c is not None:
            try:
                c.transport.close()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def job_id(self, host, n):
        return hostsmod.format_id(self.cfg, host, n)

    def locate(self, ref):
        """(host, numeric id) for a job reference: without a call when it names the host (or
        there is a default host), else by asking every host (find)."""
        host, n = hostsmod.parse_ref(self.cfg, ref)
        if host is not None:
            return host, n
        return self.find(ref)[:2]

    def find(self, ref):
        """(host, numeric id, job dict) for a job reference, asking every host if needed."""
        host, n = hostsmod.parse_ref(self.cfg, ref)
        if host is not None:
            try:
                jobs = self.client(host).call("status", {"ids": [n]})["jobs"]
            except AgentReplyError as e:
                if e.code == "no_such_job":
                    raise hostsmod.not_found(ref)
                raise
            return host, n, _decorate(self, host, jobs[0])
        found, errors = [], []
        for name, res, err in hostsmod.parallel(
                lambda h: self.client(h).call("status", {"ids": [n]}), list(self.cfg.hosts)):
            if err is None:
                found.append((name, res["jobs"][0]))
            elif not (isinstance(err, AgentReplyError) and err.code == "no_such_job"):
                errors.append(err)
        if len(found) == 1:
            return found[0][0], n, _decorate(self, found[0][0], found[0][1])
        if len(found) > 1:
            raise RtrainError("job %s exists on several hosts: %s" % (
                ref, ", ".join(h for h, _ in found)),
                "name it as HOST:%d, e.g. %s:%d" % (n, found[0][0], n))
        if errors:
            raise errors[0]
        raise hostsmod.not_found(ref)


def _decorate(session, host, job):
    job = dict(job)
    job["host"] = host
    job["num"] = job["id"]
    job["id"] = session.job_id(host, job["num"])
    return job


def command_string(argv):
    """The job's one shell string: a single argument is taken as written (it may use pipes,
    &&, globs); several are quoted so each stays one argument."""
    if not argv:
        raise RtrainError("no command to run", "put it after `--`: rtrain submit -- python train.py")
    if len(argv) == 1:
        return argv[0]
    return " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------ submit

SUBMIT_RETRIES = 2       # after a reply lost to a dropped connection, ask the host again this often
SUBMIT_RETRY_DELAY_S = 1.0  # then 2 s


def submit(session, argv, host=None, gpus=0, name=None, priority=0, retries=0, env=None,
           root=".", confirm_large=None, progress=None, events=None, sleep=time.sleep):
    """Sync `root`, queue the command, return the job (decorated with host and id).
    confirm_large(manifest_info) -> bool is asked when the tree is larger than the host allows.
    progress(sent, total) reports upload bytes. events(kind, detail) reports steps, among them
    ("retry", {"attempt", "of", "error", "delay"}) when the connection dropped after the whole
    request was sent and the host is asked again (see _recover)."""
    from . import sync
    command = command_string(argv)
    events = events or (lambda *a: None)
    if host is None:
        host = hostsmod.default_host(session.cfg)
        if host is None:
            host = place(session, gpus, events)
    h = session.cfg.get(host)
    root = os.path.abspath(root)
    client = session.client(host)
    client.prestart("submit")  # connect and start the agent while the tree is listed and hashed
    manifest = sync.build_manifest(root)
    for w in manifest.get("warnings", []):
        events("warning", w)
    limit = int(getattr(h, "max_tree_mb", 100)) * 1024 * 1024
    if manifest["total_size"] > limit:
        info = {"total_size": manifest["total_size"], "limit": limit,
                "largest": sync.largest_files(manifest, 10), "files": len(manifest["entries"])}
        if confirm_large is None or not confirm_large(info):
            raise RtrainError("the tree to sync is %.0f MB, over the %d MB limit for %s" % (
                manifest["total_size"] / 1e6, limit // (1024 * 1024), host),
                "add large files to .gitignore or .rtrainignore, or pass --yes to send it anyway")
    # One agent call does it all (docs/contracts.md, verb submit with "upload"): the agent
    # answers with the hashes it lacks, we send those blobs on the same channel, and it queues
    # the job only once its snapshot is complete and we are still there to hear of it.
    req = {"manifest": {"entries": manifest["entries"], "git": manifest.get("git")},
           "command": command, "gpus": int(gpus), "name": name, "priority": int(priority),
           "retries": int(retries), "env": dict(dict(getattr(h, "env", ()) or ()), **dict(env or {})),
           "token": uuid.uuid4().hex, "upload": True,
           "sched": client.sched()}

    def respond(frame):
        if "missing" not in frame:
            return ()
        return _upload(root, manifest, frame["missing"] or [], progress, events)

    try:
        res = client.exchange("submit", req, respond)
    except HostError as e:
        if e.permanent or not e.request_sent:
            # before the agent had the whole request (the request line, every blob asked for)
            # it cannot have queued the job: the error, with its "run the command again", stands
            raise
        res = _recover(session, host, req, e, events, sleep)
    job = _decorate(session, host, res["job"])
    job["uploaded"] = manifest.get("_uploaded", 0)
    return job


def _recover(session, host, req, err, events, sleep):
    """The connection dropped after the agent had the whole submit: it may have queued the job
    and its reply been lost, or not. Reconnect (with backoff, up to SUBMIT_RETRIES times) and
    ask the host with the SAME token: the agent answers with the job it queued for it
    ("duplicate"). What is never done is queue it anew: a job that was not queued stays so (the
    agent queues nothing for a client that went away), and the user is told to check."""
    lookup = {"token": req["token"], "lookup": True}
    last = err
    for attempt in range(1, SUBMIT_RETRIES + 1):
        delay = SUBMIT_RETRY_DELAY_S * (2 ** (attempt - 1))
        events("retry", {"attempt": attempt, "of": SUBMIT_RETRIES, "error": last, "delay": delay})
        session.reset(host)
        sleep(delay)
        try:
            res = session.client(host).call("submit", lookup)
        except AgentReplyError as e:
            if e.code != "not_queued":
                raise
            raise HostError(host, "the connection dropped before the host answered (%s); the host "
                            "holds no job from this submit, so it was most likely not queued" % err.detail,
                            "check with `rtrain status`, and submit again if the job is not there")
        except HostError as e:
            if e.permanent:
                raise
            last = e
            continue
        if res.get("duplicate"):
            return res
        raise HostError(host, "the host queued a second job (%s) when asked about the first" % (
            res["job"]["id"]), "check with `rtrain status` and cancel the one you do not want")
    raise HostError(host, "connection lost after the job was sent (%s); the job may or may not "
                    "be queued" % last.detail, "check with `rtrain status` (not by submitting "
                    "again, which could queue it twice) once the host can be reached")


def _upload(root, manifest, hashes, progress, events):
    """The blob stream (bytes chunks) for `hashes`, reporting progress as it goes."""
    from . import sync
    sizes = {}
    for e in manifest["entries"]:
        if e.get("type") == "file":
            sizes[e["hash"]] = e["size"]
    total = sum(sizes.get(x, 0) for x in set(hashes))
    events("upload", {"files": len(hashes), "bytes": total})
    sent = 0
    buf, held = [], 0
    for chunk in sync.iter_blob_frames(root, manifest, hashes):
        buf.append(chunk)
        held += len(chunk)
        if held >= _SEND_BATCH:  # many small files: one write (and SSH packets) per batch
            data = b"".join(buf)
            buf, held = [], 0
            yield data
            sent += len(data)
            if progress:
                progress(sent, total)
    if buf:
        data = b"".join(buf)
        yield data
        sent += len(data)
        if progress:
            progress(sent, total)
    manifest["_uploaded"] = manifest.get("_uploaded", 0) + total


_SEND_BATCH = 256 * 1024


def place(session, gpus, events):
    """Ask every host in parallel; pick where the job can start soonest."""
    names = [n for n in session.cfg.hosts if n != "local"] or ["local"]

    def probe(name):
        c = session.client(name)
        g = c.call("gpus", {"sched": c.sched()})
        st = c.call("status", {"states": ["queued", "running"]})
        return g, st

    best = None
    for name, res, err in hostsmod.parallel(probe, names):
        if err is not None:
            events("skip", "skipping %s" % err.message)
            continue
        g, st = res
        units = g["gpus"]
        if len(units) < gpus:
            events("skip", "%s has %d GPU(s), the job needs %d" % (name, len(units), gpus))
            continue
        free = sum(1 for u in units if u["state"] == "free")
        queued = sum(1 for j in st["jobs"] if j["state"] == "queued")
        score = (0 if free >= gpus and queued == 0 else 1, queued, -free)
        if best is None or score < best[0]:
            best = (score, name)
    if best is None:
        raise RtrainError("no host can take this job", "check them with `rtrain hosts`")
    events("placed", best[1])
    return best[1]


# ------------------------------------------------------------------ status

def status(session, host=None, states=None, show_all=False, limit=None):
    """(jobs newest first, [(host, error)], hidden count) across hosts, asked in parallel.
    Without show_all, finished jobs older than a day are hidden and so are all but the
    `limit` newest finished ones per host."""
    names = [host] if host else list(session.cfg.hosts)
    if host:
        session.cfg.get(host)
    req = {}
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
        jobs.extend(_decorate(session, name, j) for j in res["jobs"])
    jobs.sort(key=lambda j: j["submitted_at"], reverse=True)
    return jobs, failures, hidden


def job(session, ref):
    return session.find(ref)[2]


def cancel(session, ref):
    host, n = session.locate(ref)  # one call, not a lookup first: one round trip less
    try:
        res = session.client(host).call("cancel", {"id": n})
    except AgentReplyError as e:
        if e.code == "no_such_job":
            raise hostsmod.not_found(ref)
        raise
    out = _decorate(session, host, res["job"])
    out["was"] = res["was"]
    return out


def gpus(session, host=None):
    """[(host, result or None, error or None)] for every host, asked in parallel."""
    names = [host] if host else list(session.cfg.hosts)
    if host:
        session.cfg.get(host)

    def ask(name):
        c = session.client(name)
        return c.call("gpus", {"sched": c.sched()})

    return hostsmod.parallel(ask, names)


# ------------------------------------------------------------------ logs

LOGS_HEARTBEAT_S = 2.0   # the agent says "still here" this often while a followed log is quiet
LOGS_STALL_S = 15.0      # nothing at all for this long: the network died silently; reconnect
CONNECT_STALL_FACTOR = 4  # ... and this many times that before the first frame of a connection


def logs(session, ref, follow=False, tail=None, retry_for=None, sleep=time.sleep, stall_after=None):
    """Yield ("data", bytes), ("reconnecting", attempt, error, delay), ("resumed",) and last
    ("end", job) events. While following, a dropped connection is retried with backoff and the
    stream resumes from the byte offset reached: no byte twice, none missing. A connection that
    goes silent (no data and no heartbeat for `stall_after` seconds, RTRAIN_LOGS_STALL_S) counts
    as dropped: without a RST, TCP alone would wait many minutes to notice."""
    import base64
    host, n = session.locate(ref)  # the logs call itself says when there is no such job
    if stall_after is None:
        stall_after = float(os.environ.get("RTRAIN_LOGS_STALL_S") or LOGS_STALL_S)
    offset = None
    attempt = 0
    started = time.monotonic()
    watchdog = _Watchdog(stall_after)
    try:
        while True:
            req = {"id": n, "follow": bool(follow), "heartbeat": LOGS_HEARTBEAT_S}
            if offset is None:
                if tail is not None:
                    req["tail_lines"] = int(tail)
            else:
                req["offset"] = offset
            try:
                client = session.client(host)
                # until the first frame, the connection is still being made (SSH handshake, agent
                # start-up on a busy host): allow more, lest a slow start be taken for a dead one
                # abort(): the connection went silent, so a shared one is dead too (openssh.py)
                t = getattr(client, "transport", None)
                watchdog.arm(getattr(t, "abort", None) or getattr(t, "close", None),
                             limit=CONNECT_STALL_FACTOR * stall_after)
                for frame in client.stream("logs", req):
                    watchdog.pet()
                    if attempt:
                        attempt = 0
                        yield ("resumed",)
                    if "final" in frame:
                        fin = frame["final"]
                        yield ("end", {"id": session.job_id(host, n), "host": host, **fin})
                        return
                    if "d" in frame:
                        data = base64.b64decode(frame["d"])
                        o = frame["o"]
                        if offset is None:
                            offset = o
                        if o > offset:
                            raise RtrainError("log stream from %s skipped bytes %d-%d" % (host, offset, o),
                                              "run the command again; this is a bug worth reporting")
                        data = data[offset - o:]
                        if data:
                            offset += len(data)
                            watchdog.paused = True  # a slow terminal is not a dead network
                            try:
                                yield ("data", data)
                            finally:
                                watchdog.paused = False
                                watchdog.pet()
                    elif "hb" in frame:
                        if offset is None:
                            offset = frame["hb"]
            except AgentReplyError as err:
                if err.code == "no_such_job":
                    raise hostsmod.not_found(ref)
                raise
            except HostError as e:
                if watchdog.fired:
                    e = HostError(host, "no word from the host for %gs" % watchdog.fired,
                                  "check the network; RTRAIN_LOGS_STALL_S sets the limit")
                if not follow or e.permanent:
                    raise e
                attempt += 1
                if retry_for is not None and time.monotonic() - started > retry_for:
                    raise e
                if attempt > 3 and "authentication refused" in e.detail:
                    raise e  # once can be a drop mid-handshake; again and again is a refusal
                delay = min(10.0, 0.5 * (2 ** (attempt - 1)))
                yield ("reconnecting", attempt, e, delay)
                session.reset(host)
                sleep(delay)
            finally:
                watchdog.disarm()
    finally:
        watchdog.stop()


class _Watchdog:
    """Calls `closer` (the connection's close) when no frame came for `limit` seconds while
    armed (a longer limit, given to arm(), until the first frame); the blocked read then fails
    and logs() reconnects. Paused while the caller holds a yielded event (a slow terminal is
    not a dead network). `fired` is the limit that ran out, or False."""

    def __init__(self, limit):
        import threading
        self.limit = float(limit)
        self._limit = self.limit  # the limit now: longer until the first frame
        self._cv = threading.Condition()
        self._closer = None
        self._last = time.monotonic()
        self.paused = False   # set while the caller holds a yielded event
        self._stopped = False
        self.fired = False
        self._thread = None
        self._threading = threading

    def arm(self, closer, limit=None):
        with self._cv:
            self._closer = closer
            self._limit = self.limit if limit is None else max(self.limit, float(limit))
            self._last = time.monotonic()
            self.fired = False
            if closer is not None and self._thread is None and self.limit > 0:
                self._thread = self._threading.Thread(target=self._run, name="rtrain-logs-watchdog",
                                                      daemon=True)
                self._thread.start()

    def pet(self):
        self._last = time.monotonic()
        self._limit = self.limit

    def disarm(self):
        with self._cv:
            self._closer = None

    def stop(self):
        with self._cv:
            self._stopped = True
            self._closer = None
            self._cv.notify_all()

    def _run(self):
        tick = max(0.05, min(1.0, self.limit / 5))
        while True:
            with self._cv:
                if self._stopped:
                    return
                self._cv.wait(tick)
                closer = None
                if (self._closer is not None and not self.paused
                        and time.monotonic() - self._last > self._limit):
                    # fire again after another `limit` if this did not end the attempt (the
                    # connection was still being made, say)
                    closer, self._last = self._closer, time.monotonic()
                    self.fired = self._limit
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001 - closing a dead connection is best effort
                    pass


# ------------------------------------------------------------------ pull

def pull(session, ref, paths=(), dest=None, progress=None):
    """Copy files a job wrote to dest (default ./rtrain-out/JOB/). Returns [(path, size)].
    progress(path, done, total) is called as bytes arrive."""
    import base64
    host, n, job = session.find(ref)
    client = session.client(host)
    listing = client.call("outputs", {"id": n, "paths": list(paths)})
    dest = os.path.abspath(dest or os.path.join("rtrain-out", job["id"].replace(":", "-")))
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


# ------------------------------------------------------------------ hosts (doctor)

def doctor(session, host=None):
    """[(host, [check])] where a check is {"name", "ok": True/False/None, "detail", "fix"}."""
    names = [host] if host else list(session.cfg.hosts)
    if host:
        session.cfg.get(host)

    def check(name):
        h = session.cfg.get(name)
        c = session.client(name)
        from . import connections
        out = []
        before = connections.state(c.transport)
        t0 = time.monotonic()
        try:
            hello = c.call("hello", {"sched": c.sched()})
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
            "running" if hello.get("daemon_running") else "idle (starts on demand)"), "fix": ""})
        try:
            g = c.call("gpus", {"sched": c.sched()})
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
        free = hello.get("disk_free")
        writable = bool(hello.get("home_writable"))
        # not writable: nothing works; under 1 GiB free: works until a snapshot or log fills it
        low = writable and free is not None and free < 1 << 30
        out.append({"name": "disk", "ok": None if low else writable, "detail": "%s: %s%s" % (
            hello["home"], "not writable (%s)" % hello.get("home_problem") if not writable
            else "writable", "" if free is None else ", %.1f GB free" % (free / 1e9)),
            "fix": "make it writable by you, or set `home:` in hosts.yaml" if not writable else
            "free some space or set `home:` in hosts.yaml to a larger disk" if low else ""})
        return out

    return [(name, res if err is None else [{"name": "ssh" if session.cfg.get(name).kind == "ssh"
                                             else "agent", "ok": False, "detail": err.message,
                                             "fix": err.hint}])
            for name, res, err in hostsmod.parallel(check, names)]
