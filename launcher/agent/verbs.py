"""One function per agent verb. Each takes a Context and returns the reply's result."""
import base64
import json
import os
import platform
import shutil
import signal
import sys
import time
import uuid as uuidlib

from . import db, fsutil, gpus, inventory, leases, paths, protocol, runner, scheduler, store
from .protocol import AgentError

AGENT_VERSION = "0.1.0"
TERMINAL = ("succeeded", "failed", "cancelled", "lost")


class Context:
    def __init__(self, req, stdin, out, argv):
        self.req = req
        self.stdin = stdin
        self.out = out
        self.agent_argv = argv
        self.home_root = paths.resolve_home(req.get("home"))
        self._home = None
        self._con = None

    @property
    def home(self):
        if self._home is None:
            self._home = paths.Home(self.home_root).ensure()
        return self._home

    @property
    def con(self):
        if self._con is None:
            self._con = db.connect(self.home.db)
        return self._con

    def emit(self, frame):
        self.out.write(json.dumps(frame, separators=(",", ":")) + "\n")
        self.out.flush()

    def poke(self):
        scheduler.poke(self.home, self.agent_argv)


def _sched_cfg(req):
    s = req.get("sched") or {}
    return {
        "mem_busy_mib": int(s.get("mem_busy_mib", 1024)),
        "visible": s.get("visible"),
        "lock_dir": s.get("lock_dir"),
        "nvidia_smi": s.get("nvidia_smi") or "nvidia-smi",
    }


def _job(ctx, job_id):
    try:
        job_id = int(job_id)
    except (TypeError, ValueError):
        raise AgentError("no_such_job", "no job %r: job ids are numbers" % (job_id,))
    row = db.get(ctx.con, job_id)
    if row is None:
        raise AgentError("no_such_job", "no job %d on this host" % job_id,
                         "`rtrain status` lists your jobs")
    return row


def _public(ctx, row):
    d = db.to_public(row)
    d["log"] = ctx.home.log(row["id"])
    d["work_dir"] = ctx.home.work(row["id"])
    try:
        d["log_size"] = os.path.getsize(d["log"])
    except OSError:
        d["log_size"] = 0
    return d


# ------------------------------------------------------------------ verbs

def hello(ctx):
    home = ctx.home_root
    writable = True
    problem = ""
    try:
        ctx.home
        probe = os.path.join(home, "tmp", ".probe%d" % os.getpid())
        with open(probe, "w") as f:
            f.write("x")
        os.unlink(probe)
    except OSError as e:
        writable, problem = False, "%s" % e.strerror
    try:
        st = os.statvfs(home)
        disk_free = st.f_bavail * st.f_frsize
    except OSError:
        disk_free = None
    return {
        "agent_version": AGENT_VERSION, "protocol": protocol.PROTOCOL,
        "python": platform.python_version(), "executable": sys.executable,
        "platform": platform.platform(), "hostname": platform.node(),
        "user": _user(), "home": home, "home_writable": writable, "home_problem": problem,
        "disk_free": disk_free,
        "nvidia_smi": shutil.which(_sched_cfg(ctx.req)["nvidia_smi"]),
        "daemon_running": writable and scheduler.running(ctx.home),
    }


def _user():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "?")


def gpus_verb(ctx):
    cfg = _sched_cfg(ctx.req)
    lock_dir = paths.lock_dir(cfg["lock_dir"])
    error = None
    found = True
    try:
        snap = gpus.query(cfg["nvidia_smi"])
        units = gpus.classify(snap, mem_busy_mib=cfg["mem_busy_mib"], visible=cfg["visible"])
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
    return {"gpus": units, "error": error, "nvidia_smi_found": found, "lock_dir": lock_dir,
            "lock_dir_problem": leases.check_dir(lock_dir) if units else None}


def missing(ctx):
    hashes = ctx.req.get("hashes") or []
    return {"missing": store.Store(ctx.home.store).missing(hashes)}


def put(ctx):
    try:
        got = store.Store(ctx.home.store).receive(ctx.stdin)
    except store.StoreError as e:
        raise AgentError("bad_stream", str(e), "run the command again: blobs received so far are kept")
    return got


def submit(ctx):
    """Queue a job (docs/contracts.md "One-call submit"). A request's token names it: the same
    token again answers with the job already queued for it ("duplicate"), and with "lookup"
    nothing else is done (a client asking after a reply it lost: "did you queue this?")."""
    req = ctx.req
    token = req.get("token")
    if token:
        row = ctx.con.execute("SELECT id FROM tokens WHERE token=?", (token,)).fetchone()
        if row is not None:
            return {"job": _public(ctx, db.get(ctx.con, row["id"])), "duplicate": True}
    if req.get("lookup"):
        raise AgentError("not_queued", "no job was queued for this submit")
    command = req.get("command")
    if not isinstance(command, str) or not command.strip():
        raise AgentError("bad_request", "no command to run", "put it after `--`: rtrain submit -- python train.py")
    n = int(req.get("gpus", 0))
    if n < 0:
        raise AgentError("bad_request", "--gpus must be 0 or more")
    cfg = _sched_cfg(req)
    if n > 0:
        _check_gpu_count(ctx.home, cfg, n)
    manifest = req.get("manifest") or {"entries": []}
    entries = manifest.get("entries") or []
    st = store.Store(ctx.home.store)
    # "upload": the client stays on the line. If blobs are missing, one frame {"missing": [...]}
    # asks for them and the client answers with the blob stream (docs/contracts.md) on the same
    # stdin: a whole submit is one agent start and one exec channel. The client keeps stdin
    # open until the reply, so a client that went away (connection cut) shows as EOF there.
    upload = bool(req.get("upload"))
    try:
        size = store.check_entries(entries)
        lacking = st.missing(sorted({e.get("hash") for e in entries
                                     if isinstance(e, dict) and e.get("type", "file") == "file"}))
        if lacking and upload:
            ctx.emit({"missing": lacking})
            try:
                st.receive(ctx.stdin)
            except store.StoreError as e:
                raise AgentError("bad_stream", str(e), "run the command again: blobs received so far are kept")
            lacking = st.missing(lacking)
    except store.StoreError as e:
        raise AgentError("bad_manifest", str(e))
    if lacking:
        raise AgentError("missing_blobs", "%d file(s) of the snapshot are not on the host" % len(lacking),
                         "", data=lacking)
    home = ctx.home
    _check_room(home, size, len(entries))
    _sweep_tmp(home)
    # The job's folder holds its manifest and its log; the daemon builds its work dir (the
    # snapshot's private copies) in the background before it starts (workdirs.py): the
    # snapshot itself, the manifest and the verified blobs, is complete and immutable already.
    tmp = os.path.join(home.tmp, "job-%s-%d-%s" % (_node(), os.getpid(), uuidlib.uuid4().hex[:12]))
    try:
        os.mkdir(tmp, 0o700)
        _write_manifest(os.path.join(tmp, "manifest.json"), entries)
        open(os.path.join(tmp, "log"), "ab").close()
        os.chmod(os.path.join(tmp, "log"), 0o600)
        env = req.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise AgentError("bad_request", "env must map names to strings")
        # values may be secrets (tokens, keys): a 0600 file of the job's, not the job database
        fd = os.open(os.path.join(tmp, "env.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(env, f)
        _save_sched_cfg(home, cfg)  # before the job exists: a failure here leaves no job
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    git = manifest.get("git") or {}
    spec = {
        "name": req.get("name") or _default_name(command), "command": command, "gpus": n,
        "priority": int(req.get("priority", 0)), "retries": int(req.get("retries", 0)),
        "grace": float(req.get("grace", 10)),
        "git_commit": git.get("commit"), "git_dirty": git.get("dirty") if git else None,
        "files": len(entries), "bytes": sum(int(e.get("size") or 0) for e in entries),
    }
    con = ctx.con
    try:
        if upload and _client_gone(ctx.stdin):
            # nobody would hear of this job: queue nothing (DESIGN.md decision 3)
            raise AgentError("client_gone", "the client went away before the job was queued",
                             "submit again")
        with db.Tx(con):
            job_id = db.insert_job(con, spec)
            if token:
                con.execute("INSERT INTO tokens VALUES (?, ?)", (token, job_id))
            dest = home.job_dir(job_id)
            if os.path.exists(dest):  # left by a submit cut between rename and commit
                shutil.rmtree(dest)
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        ctx.poke()
    except OSError:
        pass  # the job is queued; the next call that finds no daemon starts one
    return {"job": _public(ctx, db.get(con, job_id)), "duplicate": False}


def _check_room(home, size, files):
    """Refuse a snapshot whose work dir would not fit: better now than when it is built."""
    try:
        st = os.statvfs(home.root)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    need = size + 4096 * files + (64 << 10)  # the copies, a block each at most, manifest and log
    if free < need:
        raise AgentError("disk_full", "no space left on the device holding %s: the job's snapshot "
                         "needs %.1f MB, %.1f MB are free" % (home.root, need / 1e6, free / 1e6),
                         "free some space there (old jobs live in %s/jobs), or set `home:` for this "
                         "host in hosts.yaml to a larger disk" % home.root)


def _write_manifest(path, entries):
    # the C encoder in one go (json.dump to a file streams through the pure-Python one)
    data = json.dumps({"entries": entries}, separators=(",", ":"))
    with open(path, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _client_gone(stdin):
    """True when the client's end of our stdin is closed (it sends nothing more after its
    request and blobs, and closes only once it has the reply)."""
    try:
        import select
        fd = stdin.fileno()
        ready, _, _ = select.select([fd], [], [], 0)
        return bool(ready) and os.read(fd, 1) == b""
    except (OSError, ValueError, AttributeError):
        return False


def _node():
    try:
        return "".join(c for c in os.uname().nodename if c.isalnum() or c in "-.")[:40] or "host"
    except (AttributeError, OSError):
        return "host"


def _sweep_tmp(home):
    """Remove job dirs left in tmp/ by submits on this machine whose agent died mid-way (they
    never become jobs: only the rename under a committed job id does that)."""
    try:
        names = os.listdir(home.tmp)
    except OSError:
        return
    prefix = "job-%s-" % _node()
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not fsutil.alive(pid):
            shutil.rmtree(os.path.join(home.tmp, name), ignore_errors=True)


def _default_name(command):
    words = command.split()
    for w in words:
        base = os.path.basename(w)
        if base.endswith((".py", ".sh")):
            return base
    return os.path.basename(words[0]) if words else "job"


def _check_gpu_count(home, cfg, n):
    """Refuse more GPUs than the host has (the count the daemon last saw, if recent)."""
    k = inventory.key(cfg)
    count = None if k["resolved"] is None else inventory.cached_count(home, k)
    if count is None:
        try:
            snap = gpus.query(cfg["nvidia_smi"])
            count = len(gpus.classify(snap, mem_busy_mib=cfg["mem_busy_mib"], visible=cfg["visible"]))
        except gpus.NvidiaSmiError as e:
            if e.kind == "not_found":
                raise AgentError("too_many_gpus", "asked for %d GPU(s), but nvidia-smi was not found on "
                                 "this host, so it has no GPUs to give" % n,
                                 "use --gpus 0 for a CPU job, or install the NVIDIA driver")
            raise AgentError("nvidia_smi", "cannot read the GPUs: %s" % e.message,
                             "fix the driver on the host (`rtrain hosts` checks it); --gpus 0 still runs")
        inventory.save(home, k, count)
    if n > count:
        if cfg["visible"] is None:
            raise AgentError("too_many_gpus", "asked for %d GPUs, but this host has %d" % (n, count),
                             "ask for at most %d (`rtrain gpus` lists them)" % count)
        raise AgentError("too_many_gpus", "asked for %d GPUs, but rtrain may use %d on this host "
                         "(`gpus:` in hosts.yaml)" % (n, count),
                         "ask for at most %d, or list more GPUs under `gpus:`" % count)


def _save_sched_cfg(home, cfg):
    if fsutil.read_json(home.config) != cfg:
        fsutil.write_json_atomic(home.config, cfg)


def status(ctx):
    """Jobs newest first. Filters: ids, states, since (finished before it are hidden, counted),
    limit (at most this many finished jobs; active ones always come)."""
    req = ctx.req
    con = ctx.con
    scheduler.finalize_exited(con, ctx.home)
    ids = req.get("ids")
    hidden = 0
    if ids:
        rows = [_job(ctx, i) for i in ids]
        jobs = [_public(ctx, r) for r in rows]
    else:
        where, args = [], []
        if req.get("states"):
            where.append("state IN (%s)" % ",".join("?" * len(req["states"])))
            args += list(req["states"])
        base = " AND ".join(where) if where else "1"
        finished = "state NOT IN ('queued','running')"
        shown = "(%s)" % base
        if req.get("since") is not None:
            shown += " AND (NOT %s OR COALESCE(ended_at, submitted_at) >= %r)" % (finished, float(req["since"]))
        sql = "SELECT * FROM jobs WHERE %s AND NOT %s ORDER BY id DESC" % (shown, finished)
        rows = con.execute(sql, args).fetchall()
        fin_sql = "SELECT * FROM jobs WHERE %s AND %s ORDER BY id DESC" % (shown, finished)
        if req.get("limit"):
            fin_sql += " LIMIT %d" % int(req["limit"])
        rows += con.execute(fin_sql, args).fetchall()
        rows.sort(key=lambda r: -r["id"])
        total = con.execute("SELECT COUNT(*) FROM jobs WHERE %s" % base, args).fetchone()[0]
        hidden = total - len(rows)
        jobs = [db.to_public(r) for r in rows]
    if any(j["state"] in ("queued", "running") for j in jobs) and not scheduler.running(ctx.home):
        ctx.poke()  # the daemon died (or the host rebooted): start it, it reconciles
    return {"jobs": jobs, "hidden": hidden, "now": time.time()}


def cancel(ctx):
    row = _job(ctx, ctx.req.get("id"))
    job_id = row["id"]
    con = ctx.con
    if row["state"] == "queued":
        with db.Tx(con):
            con.execute("UPDATE jobs SET state='cancelled', ended_at=? WHERE id=? AND state='queued'",
                        (time.time(), job_id))
        row = db.get(con, job_id)
        if row["state"] == "cancelled":
            return {"job": _public(ctx, row), "was": "queued"}
    if row["state"] != "running":
        return {"job": _public(ctx, row), "was": row["state"]}
    open(ctx.home.cancel_file(job_id), "w").close()
    pids = runner.read_pids(ctx.home, job_id)
    if row["wrapper_pid"] and fsutil.alive(row["wrapper_pid"], row["wrapper_start"]):
        _signal(row["wrapper_pid"], signal.SIGTERM, group=False)
    elif pids.get("pgid") and fsutil.alive(pids["pgid"], pids.get("pgid_start")):
        _signal(pids["pgid"], signal.SIGTERM, group=True)
    deadline = time.time() + float(ctx.req.get("wait", 3.0))
    while time.time() < deadline:
        if runner.read_exit(ctx.home, job_id) is not None:
            break
        time.sleep(0.02)
    scheduler.finalize_exited(con, ctx.home)
    return {"job": _public(ctx, db.get(con, job_id)), "was": "running"}


def _signal(pid, sig, group):
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def logs(ctx):
    """Frames {"o": offset, "d": base64} from byte `offset` on (or `tail_lines` lines back). While
    following, a heartbeat {"hb": offset, "state": ...} goes out at once and after every
    `heartbeat` seconds without data, so the client can tell a live stream from a dead network.
    The final reply says where the log ended and how the job ended. Following wakes on inotify
    (logwatch) where it can, so a line reaches the client as soon as the job writes it."""
    from . import logwatch
    req = ctx.req
    row = _job(ctx, req.get("id"))
    job_id = row["id"]
    path = ctx.home.log(job_id)
    follow = bool(req.get("follow"))
    offset = req.get("offset")
    tail = req.get("tail_lines")
    # frames stay small enough to cross a slow link well within the client's stall limit
    chunk = max(1024, int(req.get("chunk", 64 * 1024)))
    f = _open_log(path)
    if offset is None:
        offset = _tail_offset(f, int(tail)) if (tail is not None and f is not None) else 0
    offset = int(offset)
    heartbeat = float(req.get("heartbeat", 2.0))
    state_every = float(req.get("state_every", 0.25))  # re-read the job's state at least this often
    watch = logwatch.Watch(ctx.home.job_dir(job_id), poll=float(req.get("poll", 0.01))) if follow else None
    con = ctx.con
    now = time.monotonic()
    last_sent = now - heartbeat  # no data at once: say at once that the stream is up
    last_check = now
    check = False
    done = False
    try:
        while True:
            if f is None:
                f = _open_log(path)
            data = b""
            if f is not None:
                f.seek(offset)
                data = f.read(chunk)
            if data:
                ctx.emit({"o": offset, "d": base64.b64encode(data).decode("ascii")})
                offset += len(data)
                last_sent = time.monotonic()
                # a short read is the end of the file for now: inotify says when it grows
                if len(data) == chunk or done or watch is None or watch.kind != "inotify":
                    continue
            elif done:  # ended, and everything it wrote has been sent
                return {"offset": offset, "state": row["state"], "exit_code": row["exit_code"],
                        "signal": row["signal"]}
            now = time.monotonic()
            if not follow or check or now - last_check >= state_every:
                scheduler.finalize_exited(con, ctx.home)
                row = db.get(con, job_id)
                last_check = now
                check = False
                # a job that ended may have written more since the read above: one more pass
                done = not follow or row["state"] in TERMINAL
                if done:
                    continue
            if now - last_sent >= heartbeat:
                if row["state"] in ("queued", "running") and not scheduler.running(ctx.home):
                    # the daemon died (killed, or a reboot): start it; it reconciles, and a job
                    # whose process vanished becomes lost, which ends this stream
                    ctx.poke()
                ctx.emit({"hb": offset, "state": row["state"]})
                last_sent = now
            names = watch.wait(min(last_sent + heartbeat, last_check + state_every) - time.monotonic())
            # any change but the log's own (exit.json, pid.json, ...) may be the job's state
            if (names is None and watch.kind == "inotify") or (names and names != {"log"}):
                check = True
    finally:
        if watch is not None:
            watch.close()
        if f is not None:
            f.close()


def _open_log(path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _tail_offset(f, lines):
    """Byte offset where the last `lines` lines start."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if lines <= 0:
        return end
    pos = end
    count = 0
    block = 64 * 1024
    # a final line without a newline counts as a line; a trailing newline does not start one
    f.seek(max(0, end - 1))
    skip_last = f.read(1) == b"\n"
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        buf = f.read(pos - start)
        i = len(buf)
        while True:
            i = buf.rfind(b"\n", 0, i)
            if i < 0:
                break
            if skip_last and start + i == end - 1:
                continue
            count += 1
            if count == lines:
                return start + i + 1
        pos = start
    return 0


def outputs(ctx):
    """Files under a job's work dir: those named in `paths` (files or folders), or by default
    every file the job wrote (not in its snapshot, or changed since)."""
    row = _job(ctx, ctx.req.get("id"))
    work = os.path.realpath(ctx.home.work(row["id"]))
    wanted = ctx.req.get("paths") or []
    snap = {}
    if not wanted:
        manifest = fsutil.read_json(os.path.join(ctx.home.job_dir(row["id"]), "manifest.json")) or {}
        for e in manifest.get("entries", []):
            snap[e["path"]] = e
    roots = [_inside(work, p) for p in wanted] or [work]
    files = []
    for top in roots:
        if not os.path.lexists(top):
            raise AgentError("no_such_file", "job %d has no %s" % (row["id"], os.path.relpath(top, work)),
                             "`rtrain pull %d` without paths fetches everything it wrote" % row["id"])
        for full in _files_under(top):
            st = os.lstat(full)
            rel = os.path.relpath(full, work)
            old = snap.get(rel)
            if old is not None and old.get("size") == st.st_size and \
                    st.st_mtime <= (row["started_at"] or 0):
                continue
            files.append({"path": rel, "size": st.st_size, "mtime": st.st_mtime,
                          "exec": bool(st.st_mode & 0o111)})
    files.sort(key=lambda f: f["path"])
    return {"files": files, "work_dir": work}


def _files_under(top):
    if not os.path.isdir(top) or os.path.islink(top):
        if os.path.isfile(top) and not os.path.islink(top):
            yield top
        return
    for d, _dirs, names in os.walk(top):
        for name in names:
            full = os.path.join(d, name)
            if os.path.isfile(full) and not os.path.islink(full):
                yield full


def _inside(work, rel):
    if os.path.isabs(rel) or not rel:
        raise AgentError("bad_path", "%r: give a path relative to the job's work dir" % rel)
    full = os.path.realpath(os.path.join(work, rel))
    if full != work and not full.startswith(work + os.sep):
        raise AgentError("bad_path", "%r is outside the job's work dir" % rel)
    return full


def read(ctx):
    """Stream one file of a job's work dir from byte `offset`: frames {"o", "d"}, then its size."""
    row = _job(ctx, ctx.req.get("id"))
    work = os.path.realpath(ctx.home.work(row["id"]))
    path = _inside(work, ctx.req.get("path") or "")
    offset = int(ctx.req.get("offset") or 0)
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            data = f.read(256 * 1024)
            if not data:
                break
            ctx.emit({"o": offset, "d": base64.b64encode(data).decode("ascii")})
            offset += len(data)
    return {"size": offset}


def daemon(ctx):
    code = scheduler.Daemon(ctx.home, ctx.agent_argv).serve()
    sys.exit(code or 0)


def shutdown(ctx):
    """Stop this user's daemon (running jobs go on)."""
    home = ctx.home
    if not scheduler.running(home):
        return {"stopped": None}
    pid = scheduler.daemon_pid(home)
    if pid:
        _signal(pid, signal.SIGTERM, group=False)
    return {"stopped": pid}


VERBS = {
    "hello": hello, "gpus": gpus_verb, "missing": missing, "put": put, "submit": submit,
    "status": status, "cancel": cancel, "logs": logs, "daemon": daemon, "shutdown": shutdown,
    "outputs": outputs, "read": read,
}
