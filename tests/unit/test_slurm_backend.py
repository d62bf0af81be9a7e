"""The Slurm backend's pure parts: a job's view in the job table's words, the sbatch options of a
host, the container argv of pyxis and apptainer (golden), hosts.yaml's Slurm keys, what
`rtrain hosts` says of a login node, which backend a request gets, and how a Slurm job looks in
`status JOB` and `rtrain gpus`. The whole path runs against a real Slurm in
tests/integration/test_slurm_cli.py."""
import io
import json
import os

import pytest

from launcher import config, render, slurmhost
from launcher.agent import backends, paths, slurmcontainer, slurmhandoff, slurmstate
from launcher.agent.protocol import AgentError
from launcher.agent.verbs.context import Context
from launcher.errors import ConfigError


def view(state, **kw):
    v = {"state": state, "reason": None, "slurm_state": None, "slurm_job_id": "41", "node": None,
         "gpus": [], "exit_code": None, "signal": None, "started_at": None, "ended_at": None,
         "restarts": None}
    v.update(kw)
    return v


def test_views_in_the_job_tables_words():
    rec = slurmstate.record(view("queued", reason="Resources"))
    assert (rec["state"], rec["message"], rec["gpus"], rec["attempts"]) == ("queued", "Pending: Resources", [], 0)
    rec = slurmstate.record(view("running", node="n3", gpus=["2", "3"], started_at=10.0, restarts=0))
    assert (rec["state"], rec["message"], rec["gpus"], rec["attempts"], rec["ended_at"]) == (
        "running", "", ["n3:2", "n3:3"], 1, None)
    rec = slurmstate.record(view("failed", reason="time limit reached", node="n3", gpus=["0"],
                                 started_at=10.0, ended_at=20.0, exit_code=143, signal="SIGTERM"))
    assert (rec["state"], rec["message"], rec["exit_code"], rec["ended_at"], rec["gpus"]) == (
        "failed", "time limit reached", 143, 20.0, ["n3:0"])
    rec = slurmstate.record(view("requeued", reason="BeginTime", restarts=1), requeue=True)
    assert rec["state"] == "queued" and rec["attempts"] == 1
    assert rec["message"] == "requeued by Slurm (after preemption or a node failure); Pending: BeginTime"
    # preempted: waits again where the job asked for requeues (--retries), else it has failed
    assert slurmstate.record(view("preempted"), requeue=True)["state"] == "queued"
    rec = slurmstate.record(view("preempted"), now=5.0)
    assert (rec["state"], rec["message"], rec["ended_at"]) == ("failed", "preempted by Slurm", 5.0)
    rec = slurmstate.record(view("lost", reason="Slurm no longer knows the job"), now=7.0)
    assert (rec["state"], rec["ended_at"]) == ("lost", 7.0)
    assert slurmstate.record(view("cancelled", reason="DependencyNeverSatisfied"))["message"] == \
        "DependencyNeverSatisfied"


def test_sbatch_options_of_a_host():
    row = {"id": 12, "gpus_requested": 2, "retries": 0}
    settings = {"partition": "gpu", "account": "lab", "time": "90", "mem": "", "gpu_option": "gpus",
                "sbatch_args": ["--exclusive"], "squeue_format": "text", "container_engine": "pyxis"}
    assert slurmhandoff.options(settings, row) == {
        "partition": "gpu", "account": "lab", "time": "90", "gpu_option": "gpus", "gpus": 2,
        "name": "rtrain-12", "sbatch_args": ["--exclusive"], "requeue": None}
    assert slurmhandoff.options({}, dict(row, retries=2))["requeue"] is True  # --retries


def test_container_argv_golden():
    mounts = slurmcontainer.binds("/h/.rtrain", [["data/in", "/datasets/in"]],
                                  [{"source": "/scratch/x", "target": "/x", "readonly": True}])
    inner = ["/bin/sh", "-c", "python3 train.py"]
    assert slurmcontainer.argv("pyxis", "nvcr.io#nvidia/pytorch:24.01-py3", inner, "/h/.rtrain/jobs/3/work",
                               mounts, 2) == [
        "srun", "--ntasks=1", "--container-image=nvcr.io#nvidia/pytorch:24.01-py3",
        "--container-mounts=/h/.rtrain:/h/.rtrain,/datasets/in:/datasets/in,/scratch/x:/x:ro",
        "--container-workdir=/h/.rtrain/jobs/3/work", "/bin/sh", "-c", "python3 train.py"]
    assert slurmcontainer.argv("apptainer", "docker://python:3.12", inner, "/w", mounts[:1], 1) == [
        "apptainer", "exec", "--nv", "--bind", "/h/.rtrain:/h/.rtrain", "--pwd", "/w",
        "docker://python:3.12", "/bin/sh", "-c", "python3 train.py"]
    assert slurmcontainer.argv("singularity", "/img/a.sif", inner, "/w", mounts[:1], 0)[:4] == [
        "singularity", "exec", "--bind", "/h/.rtrain:/h/.rtrain"]  # no GPUs: no --nv
    got = slurmcontainer.command({"image": "docker://x", "mounts": ["/a:/b:ro"]},
                                 {"container_engine": "apptainer"}, "/w", "/h", [], 0, "true")
    assert got == ["apptainer", "exec", "--bind", "/h:/h,/a:/b:ro", "--pwd", "/w", "docker://x",
                   "/bin/sh", "-c", "true"]


@pytest.mark.parametrize("container,settings,needle", [
    ({"image": "x"}, {}, "names none"),
    ({"image": "x", "engine": "docker"}, {}, "docker is for towers"),
    ({"image": "-x"}, {"container_engine": "pyxis"}, "bad image name"),
    ({"image": "x", "mounts": ["/a,b:/c"]}, {"container_engine": "pyxis"}, "without commas"),
    ({"image": "x", "nope": 1}, {"container_engine": "pyxis"}, "unknown container setting"),
])
def test_container_jobs_refused_in_one_line(container, settings, needle):
    with pytest.raises(AgentError) as e:
        slurmcontainer.command(container, settings, "/w", "/h", [], 0, "true")
    assert needle in e.value.message


def _hosts(tmp_path, text):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  c:\n    ssh: me@login1\n" + text)
    return str(p)


def test_hosts_yaml_slurm_keys(tmp_path):
    h = config.parse(_hosts(tmp_path, "    scheduler: slurm\n    partition: gpu\n    time: 90\n"
                                      "    cpus_per_gpu: 8\n    sbatch_args: ['--exclusive']\n"
                                      "    squeue_format: text\n    container_engine: apptainer\n")).hosts["c"]
    assert h.slurm == {"partition": "gpu", "time": "90", "cpus_per_gpu": 8, "sbatch_args": ["--exclusive"],
                       "squeue_format": "text", "container_engine": "apptainer"}
    assert config.parse(_hosts(tmp_path, "    scheduler: slurm\n")).hosts["c"].slurm == {}
    assert config.parse(_hosts(tmp_path, "    gpus: all\n")).hosts["c"].slurm is None


@pytest.mark.parametrize("text,needle", [
    ("    partition: gpu\n", "'partition' must be set only on a host with `scheduler: slurm`"),
    ("    scheduler: pbs\n", "'scheduler' must be rtrain or slurm"),
    ("    scheduler: slurm\n    sbatch_args: ['--chdir=/x']\n", "free of --chdir (rtrain sets it)"),
    ("    scheduler: slurm\n    sbatch_args: --exclusive\n", "a list of sbatch options"),
    ("    scheduler: slurm\n    squeue_format: xml\n", "auto or json or text"),
    ("    scheduler: slurm\n    cpus_per_gpu: 0\n", "1 or more"),
    ("    scheduler: slurm\n    container_engine: docker\n", "pyxis or apptainer or singularity"),
    ("    scheduler: slurm\n    autostop: {idle: 30m, command: x}\n", "rtrain does not stop a cluster"),
])
def test_hosts_yaml_slurm_mistakes_name_the_line(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        config.parse(_hosts(tmp_path, text))
    assert needle in e.value.message and "hosts.yaml:" in e.value.message


def _report(**kw):
    rep = {"commands": {n: "/usr/bin/" + n for n in ("sbatch", "squeue", "scancel", "sinfo", "scontrol")},
           "path": "/usr/bin", "version": "slurm 22.05.8", "error": None,
           "nodes": [{"node": "n1", "gpus_total": 4, "gpus_free": 3, "partitions": ["gpu"]}],
           "squeue": {"setting": "auto", "json": False},
           "fscheck": {"ok": True, "detail": "compute node n1 sees /h (check job 5)"}, "container": None}
    rep.update(kw)
    return rep


def test_what_rtrain_hosts_says_of_a_login_node():
    by = {c["name"]: c for c in slurmhost.checks(_report())}
    assert [c["ok"] for c in by.values()] == [True, True, True, True]
    assert by["cluster"]["detail"] == "1 node(s), 4 GPU(s), 3 free; partitions gpu"
    assert by["squeue"]["detail"] == "status reads squeue's text format (squeue_format: auto)"
    (only,) = slurmhost.checks(_report(commands={"sbatch": None, "squeue": "/b/squeue"}))
    assert only["ok"] is False and only["detail"] == "sbatch not found on PATH (/usr/bin)"
    by = {c["name"]: c for c in slurmhost.checks(_report(fscheck={"ok": None, "detail": "waits"}))}
    assert by["shared fs"]["ok"] is None and "again" in by["shared fs"]["fix"]
    by = {c["name"]: c for c in slurmhost.checks(_report(fscheck={"ok": False, "detail": "no"}))}
    assert by["shared fs"]["ok"] is False and "home:" in by["shared fs"]["fix"]
    by = {c["name"]: c for c in slurmhost.checks(_report(error="Invalid account"))}
    assert by["cluster"]["ok"] is False and by["cluster"]["detail"] == "Invalid account"
    c = slurmhost.checks(_report(container={"engine": "pyxis", "found": False, "what": "srun (pyxis)"}))
    assert c[-1]["name"] == "containers" and c[-1]["ok"] is False


def _ctx(tmp_path, **req):
    req.setdefault("home", str(tmp_path / "home"))
    return Context(req, io.BytesIO(), io.StringIO(), [])


def test_the_backend_of_a_request(tmp_path):
    assert backends.of(_ctx(tmp_path)).kind == "rtrain"
    assert backends.of(_ctx(tmp_path, slurm={})).kind == "slurm"
    home = paths.Home(str(tmp_path / "home")).ensure()
    os.makedirs(os.path.join(home.root, "slurm"))
    assert backends.of(_ctx(tmp_path)).kind == "slurm"  # the agent's own helpers send only the home
    open(home.daemon_log, "w").close()  # rtrain's daemon ran in this home
    with pytest.raises(AgentError) as e:
        backends.of(_ctx(tmp_path, slurm={}))
    assert e.value.code == "home_in_use" and "home:" in e.value.hint


def test_a_slurm_job_in_status_and_gpus(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    job = {"id": "7", "name": "n", "host": "c", "state": "queued", "gpus": [], "exit_code": None,
           "signal": None, "submitted_at": 1.0e9, "started_at": None, "ended_at": None, "command": "c",
           "message": "Pending: Resources", "gpus_requested": 2, "retries": 0, "attempts": 0,
           "git_commit": None, "git_dirty": None, "log": "/l", "work_dir": "/w",
           "slurm": {"job_id": "41", "state": "PENDING", "reason": "Resources", "node": None}}
    render.job_detail(job)
    assert render.job_json(job)["slurm"]["job_id"] == "41"
    node = {"node": "n1", "state": "mixed", "partitions": ["gpu", "short"], "usable": True,
            "gpus_total": 4, "gpus_used": 3, "gpus_free": 1, "types": {"a100": {"total": 4, "used": 3}}}
    render.gpu_table([("c", {"gpus": [], "slurm_nodes": [node]}, None)])
    out = capsys.readouterr().out
    assert "state      queued - Pending: Resources" in out
    assert "slurm      job 41, PENDING (Resources)" in out
    assert ["c", "n1", "mixed", "gpu,short", "4", "3", "1", "a100", "3/4"] in [x.split() for x in out.splitlines()]
    assert "GPU " not in out  # no nvidia-smi table for a cluster alone
    assert render.slurm_line({"job_id": "41", "state": "RUNNING", "node": "n1"}) == "job 41, RUNNING on n1"
    assert render.slurm_line({"job_id": None}) == "not submitted to Slurm yet"
    json.dumps(job)


def test_refresh_saves_what_slurm_says_and_a_job_that_never_reached_slurm_is_lost(tmp_path, monkeypatch):
    """One squeue (a stand-in printing the text format) for the home's jobs; running, then final
    at once; a job queued long ago with no Slurm id and no agent handing it on is lost."""
    from launcher.agent import db
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "squeue.out"
    (bin_dir / "squeue").write_text("#!/bin/sh\necho x >> %s/calls\ncat %s\n" % (bin_dir, out))
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bin_dir, os.environ["PATH"]))
    ctx = _ctx(tmp_path, slurm={"squeue_format": "text"})
    con, home = ctx.con, ctx.home
    spec = {"name": "t", "command": "true", "gpus": 2, "priority": 0, "retries": 0}
    ran, orphan, handing = (db.insert_job(con, spec) for _ in range(3))
    con.execute("UPDATE jobs SET submitted_at=? WHERE id IN (?, ?)", (1.0, orphan, handing))
    for j in (ran, orphan, handing):
        os.makedirs(home.job(j).work)
    with open(os.path.join(home.job(ran).dir, "slurm.json"), "w") as f:
        json.dump({"slurm_job_id": "41", "requeue": None}, f)
    with open(os.path.join(home.job(ran).dir, "start.json"), "w") as f:
        json.dump({"started_at": 100.0, "node": "node1", "slurm_job_id": "41", "restarts": 0,
                   "gpus": "0,1"}, f)
    import fcntl
    lock = open(os.path.join(home.job(handing).dir, "handoff.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # an agent hands this one on right now
    out.write_text("41|41|N/A|RUNNING|None|node1|2026-11-29T23:30:06|N/A|u|rtrain-1\n")
    backend = ctx.backend
    backend.refresh()
    row = db.get(con, ran)
    assert (row["state"], row["message"], json.loads(row["gpus"]), row["attempts"]) == (
        "running", "", ["node1:0", "node1:1"], 1)
    jobs = [db.to_public(db.get(con, j)) for j in (orphan, handing)]
    backend.revive(jobs)
    assert [j["state"] for j in jobs] == ["lost", "queued"]
    assert db.get(con, orphan)["message"].startswith("it never reached Slurm")
    with open(home.job(ran).exit, "w") as f:
        json.dump({"exit_code": 3, "signal": None, "ended_at": 105.0, "cancelled": False,
                   "terminated": False, "started_at": 100.0, "node": "node1", "gpus": "0,1"}, f)
    out.write_text("41|41|N/A|FAILED|NonZeroExitCode|node1|2026-11-29T23:30:06|N/A|u|rtrain-1\n")
    assert backend.job_row(ran)["state"] == "running"  # asked a moment ago: not again yet
    backend.asked_at -= 1.0  # its exit record is there: Slurm is asked at once (0.25 s apart)
    row = backend.job_row(ran)
    assert (row["state"], row["exit_code"], row["message"], row["ended_at"]) == ("failed", 3, "exit 3", 105.0)
    assert len((bin_dir / "calls").read_text().splitlines()) == 2  # one squeue per look
    assert ctx.public(row)["slurm"] == {"job_id": "41", "state": "FAILED", "reason": None,
                                        "node": "node1", "partition": None}
    lock.close()
