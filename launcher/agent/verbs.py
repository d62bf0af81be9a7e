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

from . import db, fsutil, gpus, leases, paths, protocol, runner, scheduler, store
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
    return {"gpus": units, "error": error, "nvidia_smi_found": found}


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
    req = ctx.req
    command = req.get("command")
    if not isinstance(command, str) or not command.strip():
        raise AgentError("bad_request", "no command to run", "put it after `--`: rtrain submit -- python train.py")
    n = int(req.get("gpus", 0))
    if n < 0:
        raise AgentError("bad_request", "--gpus must be 0 or more")
    cfg = _sched_cfg(req)
    token = req.get("token")
    if token:
        row = ctx.con.execute("SELECT id FROM tokens WHERE token=?", (token,)).fetchone()
        if row is not None:
            return {"job": _public(ctx, db.get(ctx.con, row["id"])), "duplicate": True}
    if n > 0:
        _check_gpu_count(cfg, n)
    manifest = req.get("manifest") or {"entries": []}
    entries = manifest.get("entries") or []
    st = store.Store(ctx.home.store)
    lacking = st.missing(sorted({e["hash"] for e in entries if e.get("type", "file") == "file"}))
    if lacking:
        raise AgentError("missing_blobs", "%d file(s) of the snapshot are not on the host" % len(lacking),
                         "", data=lacking)
    home = ctx.home
    tmp = os.path.join(home.tmp, "job-" + uuidlib.uuid4().hex)
    try:
        st.materialize(entries, os.path.join(tmp, "work"))
    except store.StoreError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AgentError("bad_manifest", str(e))
    fsutil.write_json_atomic(os.path.join(tmp, "manifest.json"), {"entries": entries})
    open(os.path.join(tmp, "log"), "ab").close()
    os.chmod(os.path.join(tmp, "log"), 0o600)
    git = manifest.get("git") or {}
    spec = {
        "name": req.get("name") or _default_name(command), "command": command, "gpus": n,
        "priority": int(req.get("priority", 0)), "retries": int(req.get("retries", 0)),
        "env": req.get("env") or {}, "grace": float(req.get("grace", 10)),
        "git_commit": git.get("commit"), "git_dirty": git.get("dirty") if git else None,
        "files": len(entries), "bytes": sum(int(e.get("size") or 0) for e in entries),
    }
    con = ctx.con
    try:
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
    _save_sched_cfg(home, cfg)
    ctx.poke()
    return {"job": _public(ctx, db.get(con, job_id)), "duplicate": False}


def _default_name(command):
    words = command.split()
    for w in words:
        base = os.path.basename(w)
        if base.endswith((".py", ".sh")):
            return base
    return os.path.basename(words[0]) if words else "job"


def _check_gpu_count(cfg, n):
    try:
        snap = gpus.query(cfg["nvidia_smi"])
        units = gpus.classify(snap, mem_busy_mib=cfg["mem_busy_mib"], visible=cfg["visible"])
    except gpus.NvidiaSmiError as e:
        if e.kind == "not_found":
            raise AgentError("too_many_gpus", "asked for %d GPU(s), but nvidia-smi was not found on this "
                             "host, so it has no GPUs to give" % n,
                             "use --gpus 0 for a CPU job, or install the NVIDIA driver")
        raise AgentError("nvidia_smi", "cannot read the GPUs: %s" % e.message,
                         "fix the driver on the host (`rtrain hosts` checks it); --gpus 0 still runs")
    if n > len(units):
        raise AgentError("too_many_gpus", "asked for %d GPUs, but this host has %d" % (n, len(units)),
                         "ask for at most %d (`rtrain gpus` lists them)" % len(units))


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
    """Frames {"o": offset, "d": base64} from byte `offset` on; a last frame says where it ended."""
    req = ctx.req
    row = _job(ctx, req.get("id"))
    job_id = row["id"]
    path = ctx.home.log(job_id)
    follow = bool(req.get("follow"))
    offset = req.get("offset")
    tail = req.get("tail_lines")
    chunk = 256 * 1024
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        f = None
    if offset is None:
        offset = _tail_offset(f, tail) if (tail is not None and f is not None) else 0
    offset = int(offset)
    heartbeat = float(req.get("heartbeat", 2.0))
    poll = float(req.get("poll", 0.02))
    last_sent = time.monotonic()
    con = ctx.con
    while True:
        data = b""
        if f is not None:
            f.seek(offset)
            data = f.read(chunk)
        if data:
            ctx.emit({"o": offset, "d": base64.b64encode(data).decode("ascii")})
            offset += len(data)
            last_sent = time.monotonic()
            continue
        scheduler.finalize_exited(con, ctx.home)
        row = db.get(con, job_id)
        if not follow or row["state"] in TERMINAL:
            if f is not None and row["state"] in TERMINAL:
                f.seek(offset)
                rest = f.read(chunk)
                if rest:
                    continue
            return {"offset": offset, "state": row["state"], "exit_code": row["exit_code"],
                    "signal": row["signal"]}
        if time.monotonic() - last_sent >= heartbeat:
            ctx.emit({"hb": offset, "state": row["state"]})
            last_sent = time.monotonic()
        if f is None and os.path.exists(path):
            f = open(path, "rb")
        time.sleep(poll)


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
