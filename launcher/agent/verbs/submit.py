"""`submit`: queue a job on its snapshot, atomically (docs/contracts.md "One-call submit").

Its steps, in order: answer a token already seen (lookup), check the request, take the blobs
the store lacks (the client sends them on the same stdin), check the room the job's copies will
need, write the job's folder in tmp/, and commit: insert the job and rename its folder into
jobs/N in one transaction, unless the client went away meanwhile (nobody would hear of the job:
queue nothing, docs/design.md "Atomic submit")."""
import fcntl
import json
import os
import re
import shutil
import uuid as uuidlib

from .. import (autostop, bases, batch, db, fsutil, gclock, gpus, inventory, jobcontainer, jobproject, notify,
               paths, store)
from ..manifest import ManifestError, check_changes, check_entries
from ..protocol import AgentError
from ..settings import env_problem
from . import watch


def submit(ctx):
    """A request's token names it: the same token again answers with the job already queued
    for it ("duplicate"), and with "lookup" nothing else is done (a client asking after a reply
    it lost: "did you queue this?")."""
    req = ctx.req
    token = req.get("token")
    if req.get("lookup"):
        return _lookup(ctx, token)
    known = _by_token(ctx, token)
    if known is not None:
        return known
    spec = _check_request(ctx)
    plan = batch.plan(ctx, spec)  # a sweep's or an array's points, dependencies (batch.py)
    gclock.hold_shared(ctx.home)  # prune deletes no blob this submit counts on (gclock.py)
    home = ctx.home
    claim = _claim(home, token)  # until this process is done: a lookup says "still working"
    try:
        # data: shared read-only per content, not copied per job
        entries, data, size = _receive_snapshot(ctx)
        project = jobproject.check(req.get("project"), data)
        container = jobcontainer.check(req.get("container"))  # runs in a container (jobcontainer.py)
        _check_room(home, size * plan.count, len(entries) * plan.count)
        _sweep_tmp(home)
        tmp = _job_folder(home, entries, req.get("env") or {}, data, project, spec.pop("notify"),
                          spec.pop("stall"))
        try:
            jobcontainer.write(tmp, container)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        spec["files"] = len(entries)
        spec["bytes"] = sum(int(e.get("size") or 0) for e in entries)
        job_id = _commit(ctx, spec, token, tmp, plan)
    finally:
        _unclaim(claim)
    # the next submit of this tree may send only what changed (bases.py)
    base = token if bases.save(ctx.home.store, token, home.job(job_id).manifest) else None
    try:
        ctx.poke()
    except OSError:
        pass  # the job is queued; the next call that finds no daemon starts one
    watch.push_autostop(ctx)
    return {"job": ctx.public(db.get(ctx.con, job_id)), "duplicate": False, "base": base}


def _lookup(ctx, token):
    """Did a submit with this token queue its job? The job if so; "still_pending" while an
    agent still works on it (waiting for the job database's lock, say: it may yet queue it,
    unless it finds its client gone); "not_queued" only once no agent works on it and none
    queued it: the verdict is final (docs/design.md "Atomic submit")."""
    if _claimed(ctx.home, token):
        raise AgentError("still_pending", "an agent on the host is still working on this submit "
                         "(the job database may be busy)", "check with `rtrain status` in a minute")
    known = _by_token(ctx, token)  # read after the claim was seen free: a commit is visible
    if known is not None:
        return known
    raise AgentError("not_queued", "no job was queued for this submit")


_TOKEN = re.compile(r"\A[0-9a-f]{8,64}\Z")


def _claim_path(home, token):
    if not isinstance(token, str) or not _TOKEN.match(token):
        return None
    return os.path.join(home.tmp, "submit-%s.pending" % token)


def _claim(home, token):
    """An fd holding an flock on tmp/submit-TOKEN.pending for as long as this submit runs
    (None without a token)."""
    path = _claim_path(home, token)
    if path is None:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(path)):
                return (fd, path)
        except OSError:
            pass
        os.close(fd)  # a sweep (_drop_stale_claim) took it for a dead one's: again


def _unclaim(claim):
    """Let go of the claim: unlinked first (a lookup finding no file sees the commit, if any)."""
    if claim is not None:
        try:
            os.unlink(claim[1])
        except OSError:
            pass
        os.close(claim[0])


def _claimed(home, token):
    path = _claim_path(home, token)
    return path is not None and fsutil.flock_held(path)


def _by_token(ctx, token):
    if not token:
        return None
    row = ctx.con.execute("SELECT id FROM tokens WHERE token=?", (token,)).fetchone()
    if row is None:
        return None
    return {"job": ctx.public(db.get(ctx.con, row["id"])), "duplicate": True}


def _check_request(ctx):
    """The job's row as db.insert_job takes it, from a request that makes sense."""
    req = ctx.req
    command = req.get("command")
    if not isinstance(command, str) or not command.strip():
        raise AgentError("bad_request", "no command to run", "put it after `--`: rtrain submit -- python3 train.py")
    n, share = batch.gpus(req.get("gpus", 0))
    settings = ctx.settings
    if n > 0 and ctx.backend.local_gpus:  # (on Slurm, sbatch says whether it can give them)
        _check_gpu_count(ctx.home, settings, n)
        batch.check_policy(settings, n, share)  # the tower's cap, hidden and reserved GPUs
    env = req.get("env") or {}
    if not isinstance(env, dict) or env_problem(env):
        raise AgentError("bad_request", "env: %s" % (env_problem(env) if isinstance(env, dict)
                                                     else "not a mapping of names to strings"),
                         "fix `env:` in hosts.yaml or --env")
    git = (req.get("manifest") or {}).get("git") or {}
    try:
        notify_cfg = notify.check(req.get("notify"))
    except notify.NotifyError as e:
        raise AgentError("bad_request", str(e), "fix `notify:` in hosts.yaml or rtrain.yaml")
    return {
        "name": req.get("name") or _default_name(command), "command": command, "gpus": n,
        "priority": int(req.get("priority", 0)), "retries": int(req.get("retries", 0)),
        "grace": float(req.get("grace", 10)),
        "git_commit": git.get("commit"), "git_dirty": git.get("dirty") if git else None,
        "settings": settings.to_dict(), "notify": notify_cfg, "stall": _check_stall(req.get("stall")),
        "share": share, "project": req.get("project_name") or (
            req["project"].get("name") if isinstance(req.get("project"), dict) else None),
    }


def _check_stall(cfg):
    """{"after": seconds, "util_busy": percent, "action": "notify" | "cancel"} or None."""
    if not cfg:
        return None
    try:
        after = autostop.seconds(cfg.get("after"), "stall_after")
    except autostop.AutostopError as e:
        raise AgentError("bad_request", str(e), "fix `stall_after:` in hosts.yaml or rtrain.yaml")
    busy = cfg.get("util_busy", 5)
    action = cfg.get("action") or "notify"
    if isinstance(busy, bool) or not isinstance(busy, (int, float)) or action not in ("notify", "cancel"):
        raise AgentError("bad_request", "bad stall settings %r" % (cfg,),
                         "on_stall is notify or cancel; gpu_util_busy a percent")
    return {"after": after, "util_busy": busy, "action": action}


def _receive_snapshot(ctx):
    """(entries, data entries, the entries' total size) of a manifest whose every blob is in
    the store. With "upload" the client stays on the line: if blobs are missing, one frame
    {"missing": [...]} asks for them and the client answers with the blob stream on the same
    stdin. It keeps stdin open until the reply, so a client that went away (connection cut)
    shows as EOF there."""
    req = ctx.req
    st = store.Store(ctx.home.store)
    upload = bool(req.get("upload"))
    entries, data, known, made = _manifest(ctx, st, upload)
    try:
        if not isinstance(entries, list) or not isinstance(data, list):
            raise ManifestError("the manifest's entries and data must be lists of entries")
        if made is not None:  # a base (checked when it came) and the entries set on it
            size = check_changes(made["lists"], made["changed"])
        elif data:  # data paths apart from the code's: one check of both
            check_entries(entries + data)
            size = sum(e["size"] for e in entries if e.get("type", "file") == "file"
                       and isinstance(e.get("size"), int) and e["size"] > 0)
        else:
            size = check_entries(entries)
        lacking = st.missing(sorted({e["hash"] for e in entries + data
                                     if e.get("type", "file") == "file"} - known))
    except (ManifestError, store.StoreError) as e:
        raise AgentError("bad_manifest", str(e))
    if lacking and upload:
        ctx.emit({"missing": lacking})
        try:
            st.receive(ctx.stdin)
        except store.StoreError as e:
            raise AgentError("bad_stream", str(e), "run the command again: blobs received so far are kept")
        lacking = st.missing(lacking)
    if lacking:
        raise AgentError("missing_blobs", "%d file(s) of the snapshot are not on the host" % len(lacking),
                         "", data=lacking)
    return entries, data, size


def _manifest(ctx, st, upload):
    """(entries, data, hashes known to be in the store, what bases.apply made or None) of the
    request's manifest: given whole, or as a delta on a base this host kept (bases.py). Where
    the base is gone (pruned, trimmed) or does not fit, one frame {"need_manifest": true} asks
    the client, still on the line, for the whole manifest, which it sends as one JSON line."""
    m = ctx.req.get("manifest") or {}
    if m.get("base") is None:
        return m.get("entries") or [], m.get("data") or [], frozenset(), None
    base = bases.load(st.root, m["base"])
    try:
        made = bases.apply(base, m.get("delta")) if base is not None else None
    except bases.DeltaError as e:
        raise AgentError("bad_manifest", str(e))
    if made is not None:
        known = {e.get("hash") for e in base["entries"] + base["data"]}
        return bases.entries(made, 0), bases.entries(made, 1), known, made
    if not upload:
        raise AgentError("bad_manifest", "this host no longer has the manifest the delta is on",
                         "submit again")
    ctx.emit({"need_manifest": True})
    line = ctx.stdin.readline()
    try:
        whole = json.loads(line.decode("utf-8"))
    except ValueError:
        whole = None
    if not isinstance(whole, dict):
        raise AgentError("bad_stream", "the client did not send the whole manifest it was asked for",
                         "run the command again")
    return whole.get("entries") or [], whole.get("data") or [], frozenset(), None


def _job_folder(home, entries, env, data=(), project=None, notify_cfg=None, stall=None):
    """The job's folder, complete, in tmp/: its manifest, an empty log, its env and where to
    notify (values may be secrets: 0600 files, never the job database). The daemon builds its
    work dir (the snapshot's private copies) before it starts it (workdirs.py)."""
    tmp = os.path.join(home.tmp, "job-%s-%d-%s" % (_node(), os.getpid(), uuidlib.uuid4().hex[:12]))
    try:
        os.mkdir(tmp, 0o700)
        job = paths.JobPaths(tmp)
        _write_manifest(job.manifest, entries, data)
        if project is not None:
            fsutil.write_json_atomic(os.path.join(tmp, "project.json"), project)
        open(job.log, "ab").close()
        os.chmod(job.log, 0o600)
        for path, value in ((job.env, env), (job.notify, notify_cfg), (job.stall, stall)):
            if value is not None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(value, f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _commit(ctx, spec, token, tmp, plan):
    con = ctx.con
    tmps = [tmp]
    try:
        tmps = batch.folders(tmp, plan)  # one per job of a group
        with db.Tx(con):
            # asked once the database is ours: a client that gave up while the lock was held
            # (longer than its io_timeout) is not there to hear of the job
            if ctx.req.get("upload") and _client_gone(ctx.stdin):
                raise AgentError("client_gone", "the client went away before the job was queued",
                                 "submit again")
            ids = batch.insert(con, spec, plan)
            if token:
                con.execute("INSERT INTO tokens VALUES (?, ?)", (token, ids[0]))
            for job_id, folder in zip(ids, tmps):
                dest = ctx.home.job(job_id).dir
                if os.path.exists(dest):  # left by a submit cut between rename and commit
                    shutil.rmtree(dest)
                os.rename(folder, dest)
    except BaseException:
        for folder in tmps:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return ids[0]


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


def _write_manifest(path, entries, data_entries=()):
    # the C encoder in one go (json.dump to a file streams through the pure-Python one)
    body = {"entries": entries}
    if data_entries:
        body["data"] = list(data_entries)
    data = json.dumps(body, separators=(",", ":"))
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
        if name.startswith("submit-") and name.endswith(".pending"):
            _drop_stale_claim(os.path.join(home.tmp, name))
            continue
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not fsutil.alive(pid):
            shutil.rmtree(os.path.join(home.tmp, name), ignore_errors=True)


def _drop_stale_claim(path):
    """A claim left by a submit whose agent died (nobody holds its flock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_name(command):
    words = command.split()
    for w in words:
        base = os.path.basename(w)
        if base.endswith((".py", ".sh")):
            return base
    return os.path.basename(words[0]) if words else "job"


def _check_gpu_count(home, settings, n):
    """Refuse more GPUs than the host has (the count the daemon last saw, if recent)."""
    k = settings.gpu_count_key()
    count = None if k["resolved"] is None else inventory.cached_count(home, k)
    if count is None:
        try:
            count = len(gpus.read(settings))
        except gpus.NvidiaSmiError as e:
            if e.kind == "not_found":
                raise AgentError("too_many_gpus", "asked for %d GPU(s), but nvidia-smi was not found on "
                                 "this host, so it has no GPUs to give" % n,
                                 "use --gpus 0 for a CPU job, or install the NVIDIA driver")
            raise AgentError("nvidia_smi", "cannot read the GPUs: %s" % e.message,
                             "fix the driver on the host (`rtrain hosts` checks it); --gpus 0 still runs")
        inventory.save(home, k, count)
    if n > count:
        if settings.visible is None:
            raise AgentError("too_many_gpus", "asked for %d GPUs, but this host has %d" % (n, count),
                             "ask for at most %d (`rtrain gpus` lists them)" % count)
        raise AgentError("too_many_gpus", "asked for %d GPUs, but rtrain may use %d on this host "
                         "(`gpus:` in hosts.yaml)" % (n, count),
                         "ask for at most %d, or list more GPUs under `gpus:`" % count)
