"""A job's container, from its folder to its end (docs/containers.md, docs/design.md
"Containers"):

- submit: the request's "container" checked (containers.settings) and kept in the job's folder
  as container.json, per job like its settings and project.json;
- the scheduler, before the lease (prepare): the engine chosen, a GPU job refused at once with
  one line where the engine cannot give GPUs, the image built from the project's Dockerfile
  once per key (imagebuild.py through builds.py); what it resolved goes into runtime.json;
- the wrapper (runner.py): the engine argv, with the job's data (read-only), outputs and mounts
  bound at the paths its work dir's links name, and its variables in a file its shell reads;
  after the engine's client, the container is gone before the leases are let go;
- reconcile (jobstate.py): a lost job's container stopped; containers left without their job
  stopped, said in the daemon log.
Standard library only, Python >= 3.8.
"""
import os
import shlex
import sys
import time

from . import containerhost, containers, db, fsutil, imagebuild, jobproject, jobstate, runtime
from .containers import ContainerError
from .protocol import AgentError

FILE = "container.json"
ENV_FILE = "container-env.sh"
USED = "containers.json"        # in RTRAIN_HOME: the engines this home's jobs use
SWEPT = "containers.swept"      # when (and in which boot) containers were last swept
SWEEP_EVERY_S = 3600.0
PROBE_TTL_S = 30.0
GONE_WAIT_S = 30.0
CANNOT_RUN = 125  # the engines' own exit code for "could not run the container"
_probes = {}   # what -> (at, value): engines and GPU support, asked at most every PROBE_TTL_S
_plans = {}    # (home, job id, attempts) -> its image build's plan
_next_sweep = {}  # home -> when this process may look at its containers again
_noted = set()    # (home, engine) written into the home's USED record by this process


# ---------------------------------------------------------------- submit

def check(raw):
    """The container.json record of a submit's "container" (None: a host job). Raises AgentError."""
    if raw is None:
        return None
    try:
        return containers.settings(raw)
    except ContainerError as e:
        raise AgentError("bad_request", "bad container settings: %s" % e.message, e.hint)


def write(folder, rec):
    """Into the job's folder being made (tmp/...): container.json."""
    if rec is not None:
        fsutil.write_json_atomic(os.path.join(folder, FILE), rec)


def _note_engine(home, engine):
    """The home's record of the engines its jobs use: reconcile lists only their containers
    (asking an engine nobody here uses could make its storage)."""
    path = os.path.join(home.root, USED)
    if (path, engine) in _noted:
        return
    rec = fsutil.read_json(path)
    engines = rec.get("engines") if isinstance(rec, dict) and isinstance(rec.get("engines"), list) else []
    if engine not in engines:
        fsutil.write_json_atomic(path, {"engines": sorted(set(engines) | {engine})}, durable=False)
    _noted.add((path, engine))


def read(home, job_id):
    rec = fsutil.read_json(os.path.join(home.job(job_id).dir, FILE))
    return rec if isinstance(rec, dict) else None


# ---------------------------------------------------------------- before the lease (prepare.py)

def _cached(what, fn):
    hit = _probes.get(what)
    if hit is None or time.monotonic() - hit[0] > PROBE_TTL_S:
        hit = _probes[what] = (time.monotonic(), fn())
    return hit[1]


def prepare(prep, row, rec):
    """True once the container job `row` can take its GPUs and start: its engine is there (and
    can give GPUs, for a GPU job), its image built. False while the image builds, or when the
    job failed here (one line in its log, its message in `status`)."""
    home, job_id = prep.home, row["id"]
    try:
        s = containers.settings(rec)
        facts = _cached("engines", lambda: containers.probe_engines(os.environ))
        engine = containers.choose_engine(s["engine"], facts)
        engine_bin = facts.get(engine) or engine
        if row["gpus_requested"]:
            problem = _cached(("gpus", engine), lambda: containerhost.probe_gpu_problem(
                engine, engine_bin, None, os.environ))
            if problem is not None:
                raise problem
        _note_engine(home, engine)
        resolved = {"engine": engine}
        if s["build"]:
            plan = _plan(home, row, s, engine)
            if not _image(prep, row, plan, engine, engine_bin, s):
                return False
            resolved.update(image=plan["tag"], pull="never")
    except ContainerError as e:
        fail(prep, row, e)
        return False
    fsutil.write_json_atomic(os.path.join(home.job(job_id).dir, "runtime.json"), {
        "activate": None, "shell": None, "python_bin": None, "container": resolved}, durable=False)
    _plans.pop((home.root, job_id, row["attempts"]), None)
    return True


def _plan(home, row, s, engine):
    """The job's image: its key (from the Dockerfile in its work dir and its manifest), tag and
    what the key hashes. Raises ContainerError."""
    k = (home.root, row["id"], row["attempts"])
    if k in _plans:
        return _plans[k]
    dockerfile = s["build"]["dockerfile"]
    try:
        with open(os.path.join(home.job(row["id"]).work, dockerfile), encoding="utf-8",
                  errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise ContainerError("build: cannot read %s in the job's snapshot: %s" % (dockerfile, e.strerror),
                             "name a Dockerfile rtrain sends (not ignored) in rtrain.yaml's build:")
    entries = (fsutil.read_json(home.job(row["id"]).manifest) or {}).get("entries") or []
    project = s["build"].get("project") or (jobproject.read(home, row["id"]) or {}).get("name") or "default"
    key, how = imagebuild.key_of(engine, project, dockerfile, text, entries)
    if len(_plans) > 1000:
        _plans.clear()
    _plans[k] = plan = {"key": key, "tag": imagebuild.tag(project, key), "how": how, "text": text,
                        "dockerfile": dockerfile, "project": project}
    return plan


def _image(prep, row, plan, engine, engine_bin, s):
    """True once the job's image is built (builds.py, kind image); see prep._have."""
    home, job_id, key = prep.home, row["id"], plan["key"]
    ready = prep.builds.ready("image", key)
    if ready is not None and containerhost.image_id(engine_bin, plan["tag"]) == "":
        jobstate.append_log(home, job_id, "rtrain: image %s is no longer in %s: building it again\n" % (
            plan["tag"], engine))
        prep.builds.remove("image", key)
        ready = None
    waited = ("image", key) in prep.waited.get(job_id, ())
    net = s["build_network"] or ((s["network"] or "host") if imagebuild.needs_network(plan["text"])
                                 else "none")

    def make():
        return imagebuild.build(engine, engine_bin, plan["tag"], plan["dockerfile"],
                                home.job(job_id).work, net,
                                [("rtrain.home", home.root)])

    if not prep._have(row, "image", key, make, "its image (%s build of %s)" % (engine, plan["dockerfile"])):
        return False
    if ready is not None and not waited:
        jobstate.append_log(home, job_id, "rtrain: image %s is built already (its key hashes %s): using it\n" % (
            plan["tag"], plan["how"]))
    return True


def fail(prep, row, e):
    """Fail a queued container job that cannot run here: its log says why (and what to install)."""
    jobstate.append_log(prep.home, row["id"], e.lines())
    with db.Tx(prep.con):
        prep.con.execute("UPDATE jobs SET state='failed', ended_at=?, message=? WHERE id=? AND "
                         "state='queued'", (time.time(), e.message, row["id"]))
    prep.plans.pop(row["id"], None)
    prep.waited.pop(row["id"], None)
    jobstate.ended(prep.con, prep.home, row["id"])


def spec(home, job_id):
    """The "container" of the wrapper's job spec (daemon.start): the job's settings with the
    engine and image prepare resolved; None for a host job."""
    rec = read(home, job_id)
    if rec is None:
        return None
    res = runtime.read(home, job_id).get("container") or {}
    out = dict(rec, build=None)
    for k in ("engine", "image", "pull"):
        if res.get(k):
            out[k] = res[k]
    return out


# ---------------------------------------------------------------- the wrapper (runner.py)

def link_mounts(home, job_id):
    """The binds that make the job's work-dir links work inside: its data tree read-only, its
    outputs and mounts read-write, each at its own path on the host (jobproject.worklinks)."""
    rec = jobproject.read(home, job_id)
    out = []
    root = jobproject.data_root(home, rec)
    if root and os.path.isdir(root):
        out.append({"source": root, "target": root, "readonly": True})
    for rel in rec.get("outputs") or []:
        d = jobproject.outputs_dir(home, rec["name"], rel)
        out.append({"source": d, "target": d, "readonly": False})
    for _rel, target in rec.get("mounts") or []:
        t = os.path.expanduser(target)
        out.append({"source": t, "target": t, "readonly": False})
    return out


def command(home, job, fixed, base_env=None):
    """(argv, env of the engine process, (engine binary, container name, env)) of the container
    job `job` (the wrapper's spec). The job's variables go into a 0600 file its shell reads
    first (runtime.shell_assignment lines: `$VAR` expands against the container's environment,
    and no value is on an argv); rtrain's own (`fixed`) also ride in the engine's environment.
    Raises ContainerError when it cannot start (no engine, no GPU support for these GPUs)."""
    base_env = dict(os.environ) if base_env is None else base_env
    s = containers.settings(job["container"])
    facts = containers.probe_engines(base_env)
    engine = containers.choose_engine(s["engine"], facts)
    engine_bin = facts.get(engine) or engine
    uid, gid = os.getuid(), os.getgid()
    user = _user(uid)
    jp = home.job(job["id"])
    env_file = os.path.join(jp.dir, ENV_FILE)
    user_vars = [(k, v) for k, v in (job.get("env") or {}).items() if runtime.valid_name(k)]
    runtime.write_env_file(env_file, user_vars + [(k, v.replace("$", "$$")) for k, v in fixed])
    literal = dict((k, v) for k, v in (job.get("env") or {}).items() if not runtime.valid_name(k))
    literal.update(fixed)
    words, values = containers.env_split(literal)
    s["mounts"] = s["mounts"] + link_mounts(home, job["id"]) + [
        {"source": env_file, "target": env_file, "readonly": True}]
    problem = containerhost.probe_gpu_problem(engine, engine_bin, job.get("gpus") or [], base_env)
    if problem is not None:
        raise problem
    argv = containers.run_argv(engine, s, job["id"], jp.work, ". %s\n%s" % (shlex.quote(env_file), job["command"]),
                               words, job.get("gpus") or [], uid, gid, user, home.root,
                               grace=job.get("grace", 10), engine_bin=engine_bin,
                               init_path=facts.get("init_path"))
    env = dict(base_env)
    env.update(values)
    return argv, env, (engine_bin, containers.container_name(user, home.root, job["id"]), env)


def gone(container, rc, cancelled, home=None, job_id=None):
    """After the engine's client ended, before the job's GPU leases are let go: the container is
    gone. Attached `run --rm` returns once it is (docker waits for the removal; podman removes
    it itself); when the client was killed (rc < 0), could not talk to the engine (125) or the
    job was cancelled, the container is removed here, and the engine must say it is gone."""
    if not (rc < 0 or rc == CANNOT_RUN or cancelled):
        return True
    engine_bin, name, env = container
    deadline = time.monotonic() + GONE_WAIT_S
    while True:
        containerhost.engine_call(containers.rm_argv(engine_bin, name), env, timeout=30)
        if containerhost.engine_is_running(engine_bin, name, env) is False:
            return True
        if time.monotonic() > deadline:
            if home is not None:
                jobstate.append_log(home, job_id, "rtrain: %s did not say that container %s is gone; "
                                    "its GPUs are let go anyway\n" % (engine_bin, name))
            return False
        time.sleep(0.5)


# ---------------------------------------------------------------- reconcile (jobstate.py)

def stop_left(home, row):
    """A container job whose wrapper is gone (killed, or the host rebooted): its container, if
    the engine still runs it, is stopped before the job is marked lost (its leases go with it)."""
    rec = read(home, row["id"])
    if rec is None or row["boot_id"] != fsutil.boot_id():
        return
    engine = (runtime.read(home, row["id"]).get("container") or {}).get("engine")
    facts = containers.probe_engines(os.environ)
    try:
        engine = engine or containers.choose_engine(rec.get("engine"), facts)
    except ContainerError:
        return
    name = containers.container_name(_user(os.getuid()), home.root, row["id"])
    engine_bin = facts.get(engine) or engine
    if containerhost.engine_is_running(engine_bin, name) is not False:
        containerhost.engine_stop(engine_bin, name, max(1, int(row["grace"] or 10)))
        _say("rtrain: job %d lost its wrapper: stopped its container %s\n" % (row["id"], name))


def sweep(con, home, force=False):
    """Containers of this home whose job is not running (a reboot, a wrapper and engine client
    both killed): stopped and removed, each said in the daemon log. At most once per boot and
    SWEEP_EVERY_S, and only with the engines this home's jobs used (USED)."""
    if not force and time.monotonic() < _next_sweep.get(home.root, 0):
        return []  # looked at in this process a minute ago: no file read on every pass
    _next_sweep[home.root] = time.monotonic() + 60
    used = fsutil.read_json(os.path.join(home.root, USED))
    engines = used.get("engines") if isinstance(used, dict) else None
    if not isinstance(engines, list) or not engines:
        return []
    stamp = os.path.join(home.root, SWEPT)
    last = fsutil.read_json(stamp) or {}
    if not force and isinstance(last, dict) and last.get("boot_id") == fsutil.boot_id() and \
            time.time() - float(last.get("at") or 0) < SWEEP_EVERY_S:
        return []
    fsutil.write_json_atomic(stamp, {"boot_id": fsutil.boot_id(), "at": time.time()}, durable=False)
    stopped = []
    facts = containers.probe_engines(os.environ)
    for engine in containers.ENGINES:
        engine_bin = facts.get(engine)
        if engine not in engines or not engine_bin:
            continue
        found = containerhost.engine_list(engine_bin, home.root, all_states=True)
        for job_id, name in sorted((found or {}).items()):
            row = db.get(con, job_id)
            if row is not None and row["state"] == "running" and row["wrapper_pid"] and \
                    fsutil.alive(row["wrapper_pid"], row["wrapper_start"]):
                continue
            containerhost.engine_stop(engine_bin, name, 2)
            stopped.append(name)
            _say("rtrain: stopped container %s (%s): its job %d is %s\n" % (
                name, engine, job_id, row["state"] if row is not None else "not in the job table"))
    return stopped


def _user(uid):
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _say(text):
    sys.stderr.write(text)
    sys.stderr.flush()
