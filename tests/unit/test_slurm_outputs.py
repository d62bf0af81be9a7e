"""The pure Slurm functions of the agent (launcher/agent/slurm.py) on real outputs of Slurm 22.05
captured by tests/fixtures/slurm/capture.py (index.json says which job is which scenario, and
holds what the wrapper had written at each snapshot), and the batch wrapper run with bash."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import agentpkg
from launcher.agent import paths, slurm, slurmjobs
from launcher.agent.protocol import AgentError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"
INDEX = json.loads((FIX / "index.json").read_text())
JOBS = INDEX["jobs"]


def fixture(name):
    return (FIX / name).read_text()


def stderr_of(name):
    """A captured command's stderr (the file's '# ...' lines say what ran)."""
    return "".join(x for x in fixture(name).splitlines(True) if not x.startswith("#"))


# -- sbatch argv

def test_sbatch_argv_golden_full():
    spec = {"wrapper": "/h/slurm/wrapper-X.sh", "folder": "/h/jobs/7", "output": "/h/jobs/7/log",
            "chdir": "/h/jobs/7/work", "name": "rtrain-7", "gpus": 2, "partition": "gpu",
            "account": "lab", "qos": "normal", "time": "1-00:00:00", "mem": "32G",
            "cpus_per_gpu": 8, "constraint": "a100&ib", "after_ok": ["12", "13_2"],
            "after_any": [14], "requeue": True,
            "sbatch_args": ["--mail-type=END", "--comment", "a b; $(rm -rf /)"]}
    assert slurm.sbatch_argv(spec) == [
        "sbatch", "--parsable", "--job-name=rtrain-7", "--output=/h/jobs/7/log",
        "--open-mode=append", "--chdir=/h/jobs/7/work", "--gres=gpu:2", "--partition=gpu",
        "--account=lab", "--qos=normal", "--time=1-00:00:00", "--mem=32G", "--cpus-per-gpu=8",
        "--constraint=a100&ib", "--dependency=afterok:12:13_2,afterany:14",
        "--kill-on-invalid-dep=yes", "--requeue", "--mail-type=END", "--comment",
        "a b; $(rm -rf /)", "/h/slurm/wrapper-X.sh", "/h/jobs/7"]


def test_sbatch_argv_golden_array_and_gpu_options():
    base = {"wrapper": "/w.sh", "folder": "/h/slurm/arrays/3-x", "output": "/h/slurm/arrays/3-x/%a/log",
            "chdir": "/h/slurm/arrays/3-x", "name": "sweep"}
    assert slurm.sbatch_argv(dict(base, array=10, array_limit=3, gpus=1, gpu_option="gpus",
                                  gpu_type="a100", requeue=False)) == [
        "sbatch", "--parsable", "--job-name=sweep", "--output=/h/slurm/arrays/3-x/%a/log",
        "--open-mode=append", "--chdir=/h/slurm/arrays/3-x", "--gpus=a100:1", "--array=0-9%3",
        "--no-requeue", "/w.sh", "/h/slurm/arrays/3-x"]
    assert slurm.sbatch_argv(dict(base, array=1))[-3] == "--array=0"
    assert "--gres=gpu:v100:4" in slurm.sbatch_argv(dict(base, gpus=4, gpu_type="v100"))
    assert "--gpus-per-node=2" in slurm.sbatch_argv(dict(base, gpus=2, gpu_option="gpus-per-node"))
    minimal = slurm.sbatch_argv(dict(base, gpus=0, partition="", requeue=None))
    assert minimal == ["sbatch", "--parsable", "--job-name=sweep",
                       "--output=/h/slurm/arrays/3-x/%a/log", "--open-mode=append",
                       "--chdir=/h/slurm/arrays/3-x", "/w.sh", "/h/slurm/arrays/3-x"]


@pytest.mark.parametrize("arg", ["--array=0-3", "-a1", "--output=x", "-o", "--chdir=/", "-D/x",
                                 "--job-name=x", "--wrap=true", "--dependency=afterok:1",
                                 "--open-mode=truncate", "--requeue"])
def test_sbatch_args_may_not_set_what_rtrain_sets(arg):
    spec = {"wrapper": "/w", "folder": "/f", "output": "/o", "chdir": "/c", "name": "n",
            "sbatch_args": [arg]}
    with pytest.raises(ValueError, match="rtrain sets it"):
        slurm.sbatch_argv(spec)


def test_sbatch_args_that_only_look_alike_pass():
    spec = {"wrapper": "/w", "folder": "/f", "output": "/o", "chdir": "/c", "name": "n",
            "sbatch_args": ["--account-x", "--dependency-free", "--exclusive", "-N1"]}
    assert slurm.sbatch_argv(spec)[-6:-2] == spec["sbatch_args"]


def test_bad_dependency_ids_and_gpu_counts_are_refused():
    spec = {"wrapper": "/w", "folder": "/f", "output": "/o", "chdir": "/c", "name": "n"}
    for bad in (["1,2"], ["1 2"], ["x"], ["-1"]):
        with pytest.raises(ValueError):
            slurm.sbatch_argv(dict(spec, after_ok=bad))
    with pytest.raises(ValueError):
        slurm.sbatch_argv(dict(spec, gpus=-1))
    with pytest.raises(ValueError):
        slurm.sbatch_argv(dict(spec, gpus=1, gpu_option="tpu"))


def test_parse_sbatch():
    assert slurm.parse_sbatch("123\n") == "123"
    assert slurm.parse_sbatch("\n4567;cluster2\n") == "4567"
    with pytest.raises(ValueError):
        slurm.parse_sbatch("Submitted batch job 12\n")


# -- sbatch refusals: one line, Slurm's own words

@pytest.mark.parametrize("name,line", [
    ("bad-partition", "Invalid partition name specified (invalid partition specified: nope)"),
    ("too-many-gpus", "Requested node configuration is not available"),
    ("gpus-too-many", "Requested node configuration is not available"),
    ("too-much-memory", "Requested node configuration is not available (Memory specification "
                        "can not be satisfied)"),
    ("bad-gres-name", "Invalid generic resource (gres) specification"),
    ("bad-constraint", "Invalid feature specification"),
    ("time-over-partition-limit", "Requested time limit is invalid (missing or exceeds some limit)"),
    ("bad-time-format", "Invalid --time specification"),
])
def test_sbatch_refusals_become_one_line(name, line):
    text = fixture("sbatch-%s.txt" % name)
    assert "-> exit 0" not in text.splitlines()[0]
    got = slurm.slurm_error(stderr_of("sbatch-%s.txt" % name))
    assert got == line
    assert "\n" not in got


def test_slurm_error_other_outputs():
    assert slurm.slurm_error("", "sbatch failed (exit 1)") == "sbatch failed (exit 1)"
    assert slurm.slurm_error(stderr_of("squeue-unknown-id.txt")) == \
        "slurm_load_jobs error: Invalid job id specified"
    assert slurm.slurm_error(stderr_of("scontrol-json-unsupported.txt")).startswith(
        "unrecognized option '--json'")
    assert slurm.slurm_error("sbatch: warning: x\nsbatch: error: Batch job submission failed: "
                             "Job violates accounting/QOS policy (job submit limit, user's size "
                             "and/or time limits)\n") == \
        "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)"


# -- squeue --json, squeue -o, scontrol show job

def test_squeue_json_snapshot_a():
    recs = slurm.parse_squeue_json(fixture("squeue-json-A.json"))
    by = {r["id"]: r for r in recs}
    assert set(by) == {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"}
    assert by["2"]["state"] == "FAILED" and by["2"]["exit_status"] == 3 << 8
    assert by["2"]["reason"] is None or by["2"]["reason"] == "NonZeroExitCode"
    assert by["3"]["exit_status"] == 137 << 8  # the wrapper exited 137: its command was killed
    assert by["7"]["state"] == "PENDING" and by["7"]["reason"] == "Resources"
    assert by["7"]["start"] is None and by["7"]["nodes"] is None
    arr = by["8"]
    assert arr["array_job_id"] == 8 and arr["array_task_id"] is None
    assert arr["pending_tasks"] == [0, 1, 2] and arr["reason"] == "Priority"
    assert by["9"]["state"] == "CANCELLED" and by["9"]["reason"] == "DependencyNeverSatisfied"
    assert by["10"]["reason"] == "Dependency"
    assert by["4"]["state"] == "RUNNING" and by["4"]["nodes"] == "node1" and by["4"]["start"]
    assert by["4"]["end"] is None
    assert all(r["name"].startswith("rtrain-") and r["user"] == INDEX["cluster"]["user"] for r in recs)


def test_squeue_json_array_tasks_that_started_have_their_own_records():
    recs = slurm.parse_squeue_json(fixture("squeue-json-B.json"))
    got = slurm.pick(recs, ["8_0", "8_1", "8_2", "99", "8"])
    assert set(got) == {"8_0", "8_1", "8_2"}  # "8" is not a job of its own; 99 is unknown
    assert got["8_0"]["state"] == "RUNNING" and got["8_0"]["array_task_id"] == 0
    assert got["8_1"]["state"] == got["8_2"]["state"] == "PENDING"
    assert got["8_1"]["reason"] == "JobArrayTaskLimit"  # the %1 throttle
    assert got["8_2"]["array_task_id"] == 2 and got["8_2"]["pending_tasks"] == []


@pytest.mark.parametrize("snap", "ABCD")
def test_text_format_agrees_with_json(snap):
    wanted = [j["slurm"] for j in JOBS.values()]
    js = slurm.pick(slurm.parse_squeue_json(fixture("squeue-json-%s.json" % snap)), wanted)
    tx = slurm.pick(slurm.parse_squeue_text(fixture("squeue-text-%s.txt" % snap)), wanted)
    assert set(js) == set(tx) and js
    for k in js:
        for f in ("state", "reason", "nodes", "array_job_id", "array_task_id", "name", "user"):
            assert js[k][f] == tx[k][f], (k, f)
        for f in ("start", "end"):
            assert (js[k][f] is None) == (tx[k][f] is None), (k, f)
            if js[k][f] is not None:  # local time as text vs epoch
                assert abs(js[k][f] - tx[k][f]) < 1, (k, f)
        assert tx[k]["exit_status"] is None


def test_text_format_collapsed_pending_array():
    recs = slurm.parse_squeue_text(fixture("squeue-text-collapsed-A.txt"))
    arr = [r for r in recs if r["array_job_id"] == 8]
    assert len(arr) == 1 and arr[0]["pending_tasks"] == [0, 1, 2]
    assert set(slurm.pick(recs, ["8_0", "8_2", "8_3"])) == {"8_0", "8_2"}


@pytest.mark.parametrize("name", ["scontrol-show-job-A.txt", "scontrol-show-job-D.txt",
                                  "scontrol-o-show-job-D.txt"])
def test_scontrol_show_job_agrees_with_squeue(name):
    recs = slurm.parse_scontrol(fixture(name))
    jobs = [slurm.job_from_scontrol(r) for r in recs]
    snap = name[-5]
    js = {r["id"]: r for r in slurm.parse_squeue_json(fixture("squeue-json-%s.json" % snap))}
    assert len(jobs) == len(js) and jobs
    for j in jobs:
        q = js[j["id"]]
        for f in ("job_id", "state", "reason", "nodes", "array_job_id", "array_task_id",
                  "pending_tasks", "name", "user", "exit_status", "restarts"):
            assert j[f] == q[f], (j["id"], f, j[f], q[f])


def test_scontrol_values_with_spaces_and_odd_keys():
    rec = slurm.parse_scontrol(fixture("scontrol-show-job-A.txt"))[0]
    assert rec["JobId"] == "1" and rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0"
    assert rec["Command"].endswith("/jobs/1") and " " in rec["Command"]  # wrapper + its argument
    assert rec["AllocNode:Sid"] == "localhost:20646" and rec["CPUs/Task"] == "1"
    assert rec["TresPerNode"] == "gres:gpu:2" and rec["Power"] == ""
    one = slurm.parse_scontrol(fixture("scontrol-o-show-job-D.txt"))
    multi = slurm.parse_scontrol(fixture("scontrol-show-job-D.txt"))
    assert [r["JobId"] for r in one] == [r["JobId"] for r in multi]
    assert one[0] == multi[0]


def test_expand_tasks():
    assert slurm.expand_tasks("0-4%2") == [0, 1, 2, 3, 4]
    assert slurm.expand_tasks("[1,3,5-7]") == [1, 3, 5, 6, 7]
    assert slurm.expand_tasks("0-9:3") == [0, 3, 6, 9]
    assert slurm.expand_tasks("") == []


# -- Slurm's state -> rtrain's, with the wrapper's records

def _views(snap, mode):
    recs = (slurm.parse_squeue_json(fixture("squeue-json-%s.json" % snap)) if mode == "json" else
            slurm.parse_squeue_text(fixture("squeue-text-%s.txt" % snap)))
    files = INDEX["snapshots"][snap]
    wanted = {json.loads(f["slurm.json"])["slurm_job_id"]: rid for rid, f in files.items()}
    got = slurm.pick(recs, wanted)
    names = {str(j["rtrain"]): n for n, j in JOBS.items()}
    out = {}
    for sid, rid in wanted.items():
        f = files[rid]
        out[names[rid]] = slurm.job_view(
            got.get(sid), json.loads(f["exit.json"]) if f["exit.json"] else None,
            json.loads(f["start.json"]) if f["start.json"] else None, f["cancel"] is not None)
    return out


# name: (state, reason, exit_code, signal) in snapshots A (submitted), B (two cancelled),
# C (time limit, preemption), D (node failure)
EXPECTED = {
    "A": {
        "exit0": ("succeeded", None, 0, None), "exit3": ("failed", "exit 3", 3, None),
        "sigkill": ("failed", "killed by SIGKILL", 137, "SIGKILL"),
        "timeout": ("running", None, None, None), "run_a": ("running", None, None, None),
        "pend_resources": ("queued", "Resources", None, None),
        "array_0": ("queued", "Priority", None, None), "array_2": ("queued", "Priority", None, None),
        "after_failed": ("cancelled", "DependencyNeverSatisfied", None, None),
        "after_running": ("queued", "Dependency", None, None),
    },
    "B": {
        "run_a": ("cancelled", None, 143, "SIGTERM"), "pend_resources": ("cancelled", None, None, None),
        "run_b": ("running", None, None, None), "array_0": ("running", None, None, None),
        "array_1": ("queued", "JobArrayTaskLimit", None, None),
        "afterany_running": ("succeeded", None, 0, None),
    },
    "C": {
        "timeout": ("failed", "time limit reached", 143, "SIGTERM"),
        "run_b": ("cancelled", None, 143, "SIGTERM"),
        "preempt_cancel": ("preempted", None, 143, "SIGTERM"),
        "preempt_requeue": ("requeued", "BeginTime", None, None),
        "preemptor": ("running", None, None, None),
        "array_1": ("cancelled", None, None, None),
    },
    "D": {
        "nodefail": ("failed", "node failure", 143, "SIGTERM"),
        "nodefail_requeue": ("requeued", "BeginTime", None, None),
        "exit3": ("failed", "exit 3", 3, None),
    },
}


@pytest.mark.parametrize("mode", ["json", "text"])
@pytest.mark.parametrize("snap", "ABCD")
def test_job_views_of_real_snapshots(snap, mode):
    views = _views(snap, mode)
    for name, want in EXPECTED[snap].items():
        v = views[name]
        assert (v["state"], v["reason"], v["exit_code"], v["signal"]) == want, (name, v)
        assert v["slurm_job_id"] == JOBS[name]["slurm"]
        if v["state"] in ("running", "succeeded", "failed", "preempted") or v["exit_code"] is not None:
            assert v["node"] == "node1" and v["started_at"], (name, v)
        if v["state"] in ("queued", "requeued"):
            assert v["node"] is None and v["started_at"] is None and v["ended_at"] is None
    if mode == "json":
        assert views.get("preempt_requeue", {}).get("restarts") in (None, 1)


def test_views_once_slurm_forgot_the_jobs():
    """After MinJobAge only the wrapper's records and the cancel mark are left."""
    files = INDEX["snapshots"]["D"]
    names = {str(j["rtrain"]): n for n, j in JOBS.items()}
    got = {}
    for rid, f in files.items():
        got[names[rid]] = slurm.job_view(
            None, json.loads(f["exit.json"]) if f["exit.json"] else None,
            json.loads(f["start.json"]) if f["start.json"] else None, f["cancel"] is not None)
    assert got["exit0"]["state"] == "succeeded" and got["exit0"]["slurm_job_id"] == "1"
    assert (got["exit3"]["state"], got["exit3"]["exit_code"]) == ("failed", 3)
    assert (got["run_a"]["state"], got["run_a"]["exit_code"]) == ("cancelled", 143)
    assert got["pend_resources"]["state"] == "cancelled"  # the mark: it never ran
    assert got["timeout"]["state"] == "failed" and got["timeout"]["reason"] == "killed by SIGTERM"
    assert got["after_running"]["state"] == "lost"  # no record of any kind


def test_a_requeued_job_running_again_is_not_ended_by_its_old_exit_record():
    old = {"exit_code": 143, "signal": "SIGTERM", "started_at": 1000.0, "ended_at": 1010.0,
           "cancelled": False, "terminated": True, "restarts": 0, "node": "n1", "slurm_job_id": "5"}
    rec = {"id": "5", "state": "RUNNING", "reason": None, "nodes": "n2", "start": 1020.0,
           "end": None, "exit_status": 0, "restarts": 1}
    v = slurm.job_view(rec, old, {"started_at": 1000.0, "restarts": 0})
    assert v["state"] == "running" and v["exit_code"] is None and v["ended_at"] is None
    v = slurm.job_view(dict(rec, restarts=None), old, None)  # text format: by the start time
    assert v["state"] == "running"
    v = slurm.job_view(dict(rec, restarts=1), dict(old, restarts=1, exit_code=0, signal=None,
                                                   terminated=False), None)
    assert v["state"] == "succeeded"  # its command ended; Slurm has not caught up yet


@pytest.mark.parametrize("state,reason,want", [
    ("PENDING", "Priority", ("queued", "Priority")),
    ("PENDING", "QOSMaxGRESPerUser", ("queued", "QOSMaxGRESPerUser")),
    ("CONFIGURING", "None", ("queued", None)),
    ("RUNNING", "None", ("running", None)), ("COMPLETING", None, ("running", None)),
    ("SUSPENDED", "JobHeldAdmin", ("running", "suspended")),
    ("COMPLETED", "None", ("succeeded", None)),
    ("FAILED", "NonZeroExitCode", ("failed", None)),
    ("FAILED", "JobLaunchFailure", ("failed", "JobLaunchFailure")),
    ("OUT_OF_MEMORY", "OutOfMemory", ("failed", "out of memory")),
    ("TIMEOUT", "TimeLimit", ("failed", "time limit reached")),
    ("NODE_FAIL", "NodeDown", ("failed", "node failure")),
    ("BOOT_FAIL", None, ("failed", "node boot failure")),
    ("DEADLINE", None, ("failed", "deadline reached")),
    ("CANCELLED", "Resources", ("cancelled", None)),
    ("CANCELLED", "DependencyNeverSatisfied", ("cancelled", "DependencyNeverSatisfied")),
    ("PREEMPTED", "None", ("preempted", None)),
    ("REQUEUED", "None", ("requeued", None)), ("REQUEUE_HOLD", "JobHeldAdmin", ("requeued", "JobHeldAdmin")),
])
def test_map_state(state, reason, want):
    assert slurm.map_state(state, reason) == want


def test_job_state_as_a_list_and_oom_without_a_record_of_the_wrapper():
    # Slurm 23.02+ squeue --json: job_state is a list, numbers are {"set", "number"} objects
    text = json.dumps({"jobs": [{"job_id": 9, "array_job_id": {"set": True, "number": 0},
                                 "array_task_id": {"set": False, "number": 0},
                                 "job_state": ["OUT_OF_MEMORY"], "state_reason": "OutOfMemory",
                                 "exit_code": {"set": True, "number": 9}, "nodes": "g1",
                                 "start_time": {"set": True, "number": 100},
                                 "end_time": {"set": True, "number": 200}, "name": "x"}]})
    r = slurm.parse_squeue_json(text)[0]
    assert (r["id"], r["state"], r["exit_status"], r["start"], r["end"]) == \
        ("9", "OUT_OF_MEMORY", 9, 100.0, 200.0)
    v = slurm.job_view(r)
    assert (v["state"], v["reason"], v["exit_code"], v["signal"]) == \
        ("failed", "out of memory", 137, "SIGKILL")


def test_split_status():
    assert slurm.split_status(0) == (0, None)
    assert slurm.split_status(768) == (3, None)
    assert slurm.split_status(9) == (137, "SIGKILL")
    assert slurm.split_status(15) == (143, "SIGTERM")
    assert slurm.split_status(None) == (None, None)


# -- sinfo

@pytest.mark.parametrize("name,state,used,free,usable", [
    ("idle", "idle", 0, 4, True), ("busy", "mixed", 4, 0, True),
    ("draining", "draining", 3, 0, False), ("down", "down", 0, 0, False)])
def test_sinfo_gres(name, state, used, free, usable):
    nodes = slurm.parse_sinfo_gres(fixture("sinfo-gres-%s.txt" % name))
    assert len(nodes) == 1  # printed once per partition
    n = nodes[0]
    assert n["node"] == "node1" and n["state"] == state
    assert n["partitions"] == ["gpu", "short", "low", "lowrq", "high"]
    assert (n["gpus_total"], n["gpus_used"], n["gpus_free"], n["usable"]) == (4, used, free, usable)
    assert n["types"] == {"": {"total": 4, "used": used}}


def test_gres_strings_with_types_and_indexes():
    assert slurm.gpu_counts("gpu:a100:2(S:0-1),gpu:v100:1(IDX:0,2),shard:8") == {"a100": 2, "v100": 1}
    assert slurm.gpu_counts("gpu:tesla:2(IDX:0-1)") == {"tesla": 2}
    assert slurm.gpu_counts("gpu:4") == {"": 4}
    assert slurm.gpu_counts("(null)") == {}
    assert slurm.split_gres("gpu:a:1(IDX:0,2),mps:100") == ["gpu:a:1(IDX:0,2)", "mps:100"]
    for st, ok in (("idle~", True), ("mixed", True), ("allocated", True), ("idle*", False),
                   ("drained", False), ("down*", False), ("maint", False), ("", False)):
        assert slurm.node_usable(st) is ok, st


# -- scancel

def test_scancel():
    assert slurm.scancel_argv(["12", "13_4"]) == ["scancel", "12", "13_4"]
    assert slurm.scancel_argv(["5"], signal="USR1") == ["scancel", "--signal=USR1", "5"]
    with pytest.raises(ValueError):
        slurm.scancel_argv(["5;rm"])
    # 22.05: scancel of a finished or unknown job says nothing and exits 0
    for name in ("scancel-completed.txt", "scancel-unknown.txt"):
        assert "-> exit 0" in fixture(name) and slurm.parse_scancel(stderr_of(name)) == {}
    # older releases name the job
    assert slurm.parse_scancel("scancel: error: Kill job error on job id 5: Invalid job id "
                               "specified\n") == {"5": "Invalid job id specified"}


# -- the batch wrapper, run by bash as Slurm would (its environment faked)

def _wrapper_job(tmp_path, command, env=None, job_id=7, array_task=None):
    home = paths.Home(str(tmp_path / "home")).ensure()
    os.makedirs(home.job(job_id).work)
    slurmjobs.prepare(home, {"id": job_id, "command": command, "env": env or {}})
    wrapper = slurmjobs.ensure_wrapper(home)
    folder = home.job(job_id).dir
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_JOB_ID": "41",
         "SLURMD_NODENAME": "gpu-node-3", "CUDA_VISIBLE_DEVICES": "2,3", "SLURM_RESTART_COUNT": "1"}
    if array_task is not None:
        arr = tmp_path / "arr"
        arr.mkdir()
        os.symlink(folder, str(arr / str(array_task)))
        folder = str(arr)
        e.update(SLURM_ARRAY_JOB_ID="40", SLURM_ARRAY_TASK_ID=str(array_task))
    return home, wrapper, folder, e


def _run(wrapper, folder, env, cwd):
    return subprocess.run(["bash", wrapper, folder], env=env, cwd=str(cwd), capture_output=True,
                          timeout=30)


def test_wrapper_runs_the_command_and_records_its_exit(tmp_path):
    home, wrapper, folder, env = _wrapper_job(tmp_path, "printf out; printf err >&2; exit 3")
    p = _run(wrapper, folder, env, tmp_path)
    assert p.returncode == 3 and p.stdout == b"out" and p.stderr == b"err"
    ex = json.loads(open(home.job(7).exit).read())
    assert ex["exit_code"] == 3 and ex["signal"] is None and ex["cancelled"] is False
    assert ex["terminated"] is False and ex["node"] == "gpu-node-3" and ex["slurm_job_id"] == "41"
    assert ex["restarts"] == 1 and ex["started_at"] <= ex["ended_at"]
    st = json.loads(open(os.path.join(home.job(7).dir, "start.json")).read())
    assert st["started_at"] == ex["started_at"] and st["node"] == "gpu-node-3"


def test_wrapper_stdout_goes_where_slurm_points_it(tmp_path):
    home, wrapper, folder, env = _wrapper_job(tmp_path, "true")
    env_extra = {"SECRET": "a b'\"$x;"}
    slurmjobs.prepare(home, {"id": 7, "command": "echo \"$PWD|$CUDA_VISIBLE_DEVICES|"
                             "$RTRAIN_JOB_ID|$SECRET|$PYTHONUNBUFFERED|$CUDA_DEVICE_ORDER\"",
                             "env": env_extra})
    p = _run(wrapper, folder, env, tmp_path)
    assert p.returncode == 0
    assert p.stdout.decode() == "%s|2,3|7|a b'\"$x;|1|PCI_BUS_ID\n" % home.job(7).work
    del env["CUDA_VISIBLE_DEVICES"]  # a job without GPUs sees none
    p = _run(wrapper, folder, env, tmp_path)
    assert p.stdout.decode().split("|")[1] == ""


def test_wrapper_records_a_signal_and_no_shell_notice(tmp_path):
    home, wrapper, folder, env = _wrapper_job(tmp_path, "echo before; kill -9 $$")
    p = _run(wrapper, folder, env, tmp_path)
    assert p.returncode == 137 and p.stdout == b"before\n" and p.stderr == b""
    ex = json.loads(open(home.job(7).exit).read())
    assert (ex["exit_code"], ex["signal"]) == (137, "SIGKILL")


def test_wrapper_outlives_slurms_sigterm_to_record_a_cancel(tmp_path):
    home, wrapper, folder, env = _wrapper_job(tmp_path, "echo up; sleep 30")
    p = subprocess.Popen(["bash", wrapper, folder], env=env, cwd=str(tmp_path),
                         stdout=subprocess.PIPE, start_new_session=True)
    assert p.stdout.readline() == b"up\n"
    open(home.job(7).cancel, "w").close()
    os.killpg(p.pid, signal.SIGTERM)  # Slurm signals every process of the job
    assert p.wait(10) == 143
    ex = json.loads(open(home.job(7).exit).read())
    assert (ex["exit_code"], ex["signal"], ex["cancelled"], ex["terminated"]) == (143, "SIGTERM", True, True)


def test_wrapper_of_an_array_task_finds_its_job_through_the_links(tmp_path):
    home, wrapper, folder, env = _wrapper_job(tmp_path, "echo task $RTRAIN_JOB_ID $PWD", job_id=12,
                                              array_task=3)
    p = _run(wrapper, folder, env, tmp_path)
    assert p.returncode == 0 and p.stdout.decode() == "task 12 %s\n" % home.job(12).work
    ex = json.loads(open(home.job(12).exit).read())
    assert ex["slurm_job_id"] == "40_3" and ex["exit_code"] == 0


def test_wrapper_removes_the_exit_record_of_a_previous_run(tmp_path):
    home, wrapper, folder, env = _wrapper_job(tmp_path, "cat ../exit.json 2>/dev/null || echo none")
    open(home.job(7).exit, "w").write('{"exit_code": 143}')
    p = _run(wrapper, folder, env, tmp_path)
    assert p.stdout == b"none\n"


def test_wrapper_without_its_work_dir(tmp_path):
    home, wrapper, folder, env = _wrapper_job(tmp_path, "true")
    os.rmdir(home.job(7).work)
    p = _run(wrapper, folder, env, tmp_path)
    assert p.returncode == 127 and b"rtrain: cannot start the job" in p.stderr
    assert json.loads(open(home.job(7).exit).read())["exit_code"] == 127


def test_env_script_quotes_values_and_refuses_names_the_shell_cannot_export(tmp_path):
    script = slurmjobs.env_script([("A", "1"), ("_b2", "x=y\n'q' $A ${A}x $$"), ("E", "")])
    assert script == (b"export A=1\nexport _b2='x=y\n'\"'\"'q'\"'\"' '\"${A}\"' '\"${A}\"'x '"
                      b"'$'\nexport E=''\n")
    # what bash makes of it: variables expand, nothing else is read as code
    p = subprocess.run(["bash", "-c", '. /dev/stdin; printf "%s|" "$A" "$_b2" "$E"'], input=script,
                       capture_output=True, timeout=10)
    assert p.stdout == b"1|x=y\n'q' 1 1x $||"
    for bad in ("1A", "A-B", "A B", "", "A=B"):
        with pytest.raises(AgentError):
            slurmjobs.env_script([(bad, "1")])
    with pytest.raises(AgentError):
        slurmjobs.env_script([("A", "nul\0")])


def test_wrapper_expands_vars_in_the_jobs_shell_and_keeps_its_own(tmp_path):
    """A job's variables named like the wrapper's own (d, rc, node) change nothing of it."""
    home, wrapper, folder, env = _wrapper_job(tmp_path, "true")
    slurmjobs.prepare(home, {"id": 7, "argv": ["/bin/sh", "-c", 'echo "$P|$d|$rc|$RTRAIN_JOB_ID"'],
                             "vars": [["P", "$HOME/x:$PATH"], ["d", "/nowhere"], ["rc", "5"]]})
    env["HOME"] = "/h"
    p = _run(wrapper, folder, env, tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == "/h/x:%s|/nowhere|5|7\n" % env["PATH"]
    ex = json.loads(open(home.job(7).exit).read())
    assert ex["exit_code"] == 0 and ex["gpus"] == "2,3" and ex["node"] == "gpu-node-3"


def test_slurm_modules_need_only_the_stdlib(tmp_path):
    """As shipped: from the zipapp under python3 -I -S."""
    blob, digest = agentpkg.build()
    pyz = tmp_path / ("agent-%s.pyz" % digest[:16])
    pyz.write_bytes(blob)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import rtrain_agent.slurmjobs; "
             "std = set(sys.stdlib_module_names) if hasattr(sys, 'stdlib_module_names') else None; "
             "print([m for m in sys.modules if std is not None and m.split('.')[0] not in std "
             "and not m.startswith('rtrain_agent') and m != '__main__'])")
    p = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(pyz)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


# -- slurmjobs with stand-in Slurm commands (what they print: the real captures)

def _fake(bin_dir, name, script):
    p = bin_dir / name
    p.write_text("#!/bin/sh\necho \"$0 $*\" >> %s/calls\n%s" % (bin_dir, script))
    p.chmod(0o755)


def _calls(bin_dir):
    try:
        return (bin_dir / "calls").read_text().splitlines()
    except OSError:
        return []


def test_status_falls_back_to_the_text_format_once(tmp_path):
    """A squeue without --json: one failed try, remembered; then the text format only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "squeue", 'case "$*" in *--json*) echo "squeue: unrecognized option \'--json\'"'
                             ' >&2; exit 1;; esac\ncat %s\n' % (FIX / "squeue-text-A.txt"))
    env = {"PATH": "%s:/usr/bin:/bin" % bin_dir}
    home = paths.Home(str(tmp_path / "home")).ensure()
    snap = INDEX["snapshots"]["A"]
    for rid, f in snap.items():
        os.makedirs(home.job(rid).dir)
        for name in ("slurm.json", "exit.json", "start.json"):
            if f[name] is not None:
                open(os.path.join(home.job(rid).dir, name), "w").write(f[name])
    ids = sorted(int(r) for r in snap)
    first = slurmjobs.status(home, ids, env=env)
    assert [c.split(" ", 1)[1].startswith("--json") for c in _calls(bin_dir)] == [True, False]
    again = slurmjobs.status(home, ids, env=env)
    assert len(_calls(bin_dir)) == 3 and "--json" not in _calls(bin_dir)[2]
    assert first == again
    want = _views("A", "text")
    names = {str(j["rtrain"]): n for n, j in JOBS.items()}
    assert {names[str(k)]: v for k, v in first.items()} == want


def test_a_refused_array_leaves_no_folder_and_no_slurm_id(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "sbatch", "cat %s | grep -v '^#' >&2; exit 1\n" % (FIX / "sbatch-bad-partition.txt"))
    home = paths.Home(str(tmp_path / "home")).ensure()
    for i in (1, 2):
        os.makedirs(home.job(i).work)
    with pytest.raises(AgentError) as e:
        slurmjobs.submit(home, [{"id": 1, "command": "true"}, {"id": 2, "command": "true"}],
                         {"partition": "nope", "array_limit": 1},
                         env={"PATH": "%s:/usr/bin:/bin" % bin_dir})
    assert e.value.code == "sbatch_refused"
    assert e.value.message == "Invalid partition name specified (invalid partition specified: nope)"
    assert os.listdir(os.path.join(home.root, "slurm", "arrays")) == []
    assert slurmjobs.slurm_id(home, 1) is None
    argv = _calls(bin_dir)[0].split(" ")
    assert "--partition=nope" in argv and "--array=0-1%1" in argv


def test_no_slurm_on_path(tmp_path):
    home = paths.Home(str(tmp_path / "home")).ensure()
    os.makedirs(home.job(1).work)
    with pytest.raises(AgentError) as e:
        slurmjobs.submit(home, [{"id": 1, "command": "true"}], {}, env={"PATH": str(tmp_path)})
    assert e.value.code == "no_slurm" and "sbatch is not on PATH" in e.value.message
    with pytest.raises(AgentError) as e:
        slurmjobs.gpus(env={"PATH": str(tmp_path)})
    assert e.value.code == "no_slurm"


def test_wrapper_runs_a_login_shell_job_with_its_variables_set_after_the_profiles(tmp_path):
    """shell: login (runtime.argv): the login shell's profiles run, then the job's variables are
    set again from env.sh, so PATH extends the login's PATH."""
    from launcher.agent import runtime
    home, wrapper, folder, env = _wrapper_job(tmp_path, "true")
    env_file = os.path.join(home.job(7).dir, "env.sh")
    argv = runtime.argv({"shell": "login"}, 'echo "$P|$RTRAIN_JOB_ID"', env_file)
    slurmjobs.prepare(home, {"id": 7, "argv": argv, "vars": [["P", "/x:$PATH"]]})
    p = _run(wrapper, folder, env, tmp_path)
    assert p.returncode == 0, p.stderr
    got, job = p.stdout.decode().strip().splitlines()[-1].split("|")
    assert got.startswith("/x:") and len(got) > 3 and job == "7"
