"""`rtrain submit`: snapshot the tree, send what the host lacks, queue the job, in one agent
call (docs/contracts.md "One-call submit"); and, with several hosts and none named, placing the
job where it starts soonest."""
import json
import os
import shlex
import time
import uuid

from . import hosts as hostsmod
from .errors import AgentReplyError, HostError, RtrainError


def command_string(argv):
    """The job's one shell string: a single argument is taken as written (it may use pipes,
    &&, globs); several are quoted so each stays one argument."""
    if not argv:
        raise RtrainError("no command to run", "put it after `--`: rtrain submit -- python3 train.py")
    if len(argv) == 1:
        return argv[0]
    return " ".join(shlex.quote(a) for a in argv)


SUBMIT_RETRIES = 2       # after a reply lost to a dropped connection, ask the host again this often
SUBMIT_RETRY_DELAY_S = 1.0  # then 2 s


def submit(session, argv, host=None, gpus=0, name=None, priority=0, retries=0, env=None,
           root=".", confirm_large=None, progress=None, events=None, sleep=time.sleep,
           project=None, image=None, many=None, after=(), after_any=(), yes=False):
    """Sync `root`, queue the command, return the job (decorated with host and id).
    confirm_large(manifest_info) -> bool is asked when the tree is larger than the host allows.
    progress(sent, total) reports upload bytes. events(kind, detail) reports steps, among them
    ("retry", {"attempt", "of", "error", "delay"}) when the connection dropped after the whole
    request was sent and the host is asked again (see _recover). project: the project file
    (project.py), whose data, environment and outputs go with the job (jobspec.py). image:
    --image, run the job in that container image (over the project's image: and build:). many: a
    sweep's or an array's points (sweep.plan): one job each, one snapshot sent once, one group;
    after, after_any: the jobs (ids, "gN") on that host it waits for (groups.dependencies)."""
    from . import jobspec, sweep, sync
    from .project import Project
    command = command_string(argv)
    events = events or (lambda *a: None)
    if host is None:
        host = hostsmod.default_host(session.cfg)
        if host is None:
            host = place(session, gpus, events)
    h = session.cfg.get(host)
    if many:
        sweep.check_count(many, h.max_points, yes)
    root = os.path.abspath(root)
    proj = (project or Project(root=root)).for_host(host)
    if image:
        proj = proj.with_image(image)
    if (proj.image or proj.build) and proj.host_env_keys():
        events("warning", "%s in %s is not used: the job runs in a container, whose image is its "
               "environment" % (", ".join(proj.host_env_keys()), proj.path or "rtrain.yaml"))
    client = session.client(host)
    client.prestart("submit")  # connect and start the agent while the tree is listed and hashed
    manifest = sync.build_manifest(root, extra=jobspec.data_files(root, proj))
    for w in manifest.get("warnings", []):
        events("warning", w)
    code, data = jobspec.split(manifest, proj)
    code_size = sum(e.get("size", 0) for e in code if e.get("type", "file") == "file")
    limit = int(getattr(h, "max_tree_mb", 100)) * 1024 * 1024
    if code_size > limit:  # data is meant to be big: no limit there
        info = {"total_size": code_size, "limit": limit,
                "largest": sync.largest_files({"entries": code}, 10), "files": len(code)}
        if confirm_large is None or not confirm_large(info):
            raise RtrainError("the tree to sync is %.0f MB, over the %d MB limit for %s" % (
                code_size / 1e6, limit // (1024 * 1024), host),
                "add large files to .gitignore or .rtrainignore, or pass --yes to send it anyway")
    # One agent call does it all (docs/contracts.md, verb submit with "upload"): the agent
    # answers with the hashes it lacks, we send those blobs on the same channel, and it queues
    # the job only once its snapshot is complete and we are still there to hear of it.
    # the manifest as a delta on the one this host kept from the last submit of this tree,
    # where there is one (bases.py)
    from . import bases
    token = uuid.uuid4().hex
    base_key = bases.key(host, h, root)
    sent, records = bases.manifest_request(bases.load(base_key), code, data, manifest.get("git"))
    req = {"manifest": sent,
           "command": command, "gpus": gpus, "name": name, "priority": int(priority),
           "retries": int(retries),
           "env": dict(dict(getattr(h, "env", ()) or ()), **dict(proj.env, **dict(env or {}))),
           "token": token, "upload": True,
           "settings": client.settings(), "autostop": h.autostop,
           "notify": _watch(proj, h, host)[0], "stall": _watch(proj, h, host)[1]}
    ctr = jobspec.container(proj, code, getattr(h, "container_engine", None))
    if ctr is not None:
        req["container"] = ctr
    req["project_name"] = proj.project
    if many:  # docs/contracts.md "Many jobs in one submit"
        req["points"] = [{"command": command_string(p["argv"]), "env": p["env"], "suffix": p["suffix"]}
                         for p in many["points"]]
        req["group"] = many["group"]
    if after:
        req["after"] = list(after)
    if after_any:
        req["after_any"] = list(after_any)
    spec = jobspec.request(proj, code, in_container=ctr is not None)
    if spec is not None:
        req["project"] = spec

    def respond(frame):
        if "building" in frame:  # a Slurm host builds what the job needs before sbatch
            events("building", frame["building"])
        if frame.get("need_manifest"):  # the base is gone there: the whole manifest, one line
            whole = {"entries": code, "data": data}
            return [json.dumps(whole, separators=(",", ":")).encode("ascii") + b"\n"]
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
    if res.get("base") == token:  # the host keeps this manifest for the next submit's delta
        bases.keep(base_key, token, records)
    job = session.decorate(host, res["job"])
    if many:
        job["points"] = len(many["points"])
        job["group_kind"], job["group_label"] = many["group"]["kind"], many["group"]["label"]
        job["group_command"] = command
    job["uploaded"] = manifest.get("_uploaded", 0)
    job["uploaded_files"] = manifest.get("_uploaded_files", 0)
    return job


def _watch(proj, h, host):
    """(notify, stall) of a job: rtrain.yaml's over hosts.yaml's."""
    notify = proj.notify or h.notify
    after = proj.stall_after if proj.stall_after is not None else h.stall_after
    stall = None if after is None else {"after": after, "util_busy": h.gpu_util_busy,
                                        "action": proj.on_stall or h.on_stall}
    return (dict(notify, host=host) if notify else None), stall


def _recover(session, host, req, err, events, sleep):
    """The connection dropped after the agent had the whole submit: it may have queued the job
    and its reply been lost, or not. Reconnect (with backoff, up to SUBMIT_RETRIES times) and
    ask the host with the SAME token: the agent answers with the job it queued for it
    ("duplicate"). What is never done is queue it anew: a job that was not queued stays so (the
    agent queues nothing for a client that went away), and the user is told to check."""
    lookup = {"token": req["token"], "lookup": True}
    last = err
    pending = False  # the last answer: an agent there still works on the submit
    for attempt in range(1, SUBMIT_RETRIES + 1):
        delay = SUBMIT_RETRY_DELAY_S * (2 ** (attempt - 1))
        events("retry", {"attempt": attempt, "of": SUBMIT_RETRIES, "error": last, "delay": delay})
        session.reset(host)
        sleep(delay)
        try:
            res = session.client(host).call("submit", lookup)
        except AgentReplyError as e:
            if e.code == "still_pending":  # e.g. waiting for the job database's lock
                pending, last = True, e
                continue
            if e.code != "not_queued":
                raise
            # final: no agent works on it any more, and none queued it
            raise HostError(host, "the connection dropped before the host answered (%s); the host "
                            "queued no job from this submit" % err.detail, "submit again")
        except HostError as e:
            if e.permanent:
                raise
            pending, last = False, e
            continue
        if res.get("duplicate"):
            return res
        raise HostError(host, "the host queued a second job (%s) when asked about the first" % (
            res["job"]["id"]), "check with `rtrain status` and cancel the one you do not want")
    if pending:
        raise HostError(host, "no answer from the host in time (%s); an agent there is still "
                        "working on this submit (its job database is busy), so the job may still "
                        "be queued" % err.detail, "check with `rtrain status` in a minute (not by "
                        "submitting again, which could queue it twice)")
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
    manifest["_uploaded_files"] = manifest.get("_uploaded_files", 0) + len(set(hashes))


_SEND_BATCH = 256 * 1024


def place(session, gpus, events):
    """Ask every host in parallel; pick where the job can start soonest."""
    names = [n for n in session.cfg.hosts if n != "local"] or ["local"]

    def probe(name):
        c = session.client(name)
        g = c.call("gpus", {"settings": c.settings()})
        st = c.call("status", {"states": ["queued", "running"]})
        return g, st

    best = None
    for name, res, err in hostsmod.parallel(probe, names):
        if err is not None:
            events("skip", "skipping %s" % err.message)
            continue
        g, st = res
        units = g["gpus"]
        total, free = len(units), sum(1 for u in units if u["state"] == "free")
        if g.get("slurm_nodes") is not None:  # a Slurm cluster: its nodes' GRES
            from .slurmhost import capacity
            total, free = capacity(g)
        if total < gpus:
            events("skip", "%s has %d GPU(s), the job needs %d" % (name, total, gpus))
            continue
        queued = sum(1 for j in st["jobs"] if j["state"] == "queued")
        score = (0 if free >= gpus and queued == 0 else 1, queued, -free)
        if best is None or score < best[0]:
            best = (score, name)
    if best is None:
        raise RtrainError("no host can take this job", "check them with `rtrain hosts`")
    events("placed", best[1])
    return best[1]
