"""Slurm, its states in rtrain's words: what a job on Slurm is (queued, running, succeeded...),
from what Slurm says and what the batch wrapper recorded (exit.json, start.json). Without
slurmdbd there is no sacct: after MinJobAge the wrapper's records are all that is left. Pure
functions, pinned by tests/unit/test_slurm_outputs.py. Standard library only, Python >= 3.8."""
import time

# -- Slurm's state -> rtrain's

STATES = {
    "PENDING": "queued", "CONFIGURING": "queued", "RESV_DEL_HOLD": "queued",
    "REQUEUED": "requeued", "REQUEUE_FED": "requeued", "REQUEUE_HOLD": "requeued",
    "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running", "STOPPED": "running",
    "SIGNALING": "running", "STAGE_OUT": "running", "RESIZING": "running",
    "COMPLETED": "succeeded",
    "FAILED": "failed", "OUT_OF_MEMORY": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "SPECIAL_EXIT": "failed",
    "CANCELLED": "cancelled", "REVOKED": "cancelled",
    "PREEMPTED": "preempted",
}
# Why a job that ended that way failed, in words.
FAILURES = {
    "OUT_OF_MEMORY": "out of memory", "TIMEOUT": "time limit reached", "NODE_FAIL": "node failure",
    "BOOT_FAIL": "node boot failure", "DEADLINE": "deadline reached",
    "SPECIAL_EXIT": "special exit",
}
ENDED = ("succeeded", "failed", "cancelled", "preempted", "lost")


def map_state(state, reason=None):
    """(rtrain state, reason) of a Slurm state and its reason, Slurm's own words where it has
    them: PENDING/Resources -> ("queued", "Resources"); TIMEOUT -> ("failed", "time limit
    reached"); CANCELLED/DependencyNeverSatisfied -> ("cancelled", "DependencyNeverSatisfied");
    a reason left over from the wait (a job cancelled while it waited for Resources) is dropped."""
    rt = STATES.get(state, "running" if state else "lost")
    reason = None if reason in (None, "", "None", "(null)") else reason
    if state in FAILURES:
        return rt, FAILURES[state]
    if state == "SUSPENDED":
        return rt, "suspended"
    if rt in ("queued", "requeued"):
        return rt, reason
    if rt == "failed" and reason != "NonZeroExitCode":
        return rt, reason
    if rt == "cancelled" and reason == "DependencyNeverSatisfied":
        return rt, reason
    return rt, None


def split_status(status):
    """A raw wait status -> (exit code, signal name): 768 -> (3, None); 9 -> (137, "SIGKILL")."""
    if status is None:
        return None, None
    sig = status & 0x7F
    if sig:
        return 128 + sig, "SIG" + _SIGNAMES.get(sig, str(sig))
    return (status >> 8) & 0xFF, None


_SIGNAMES = {1: "HUP", 2: "INT", 3: "QUIT", 4: "ILL", 5: "TRAP", 6: "ABRT", 7: "BUS", 8: "FPE",
             9: "KILL", 10: "USR1", 11: "SEGV", 12: "USR2", 13: "PIPE", 14: "ALRM", 15: "TERM"}


def _this_run(record, rec):
    """Whether the wrapper's record `rec` is of the run Slurm reports now (a requeued job runs
    again in the same folder; the wrapper removes the old exit.json as it starts, but Slurm says
    RUNNING a moment before that)."""
    if record.get("restarts") is not None and rec.get("restarts") is not None:
        return record["restarts"] == rec["restarts"]
    if record.get("start") and rec.get("started_at"):
        return rec["started_at"] >= record["start"] - 1
    return True


def job_view(record, exit_rec=None, start_rec=None, cancel_requested=False):
    """What rtrain shows for one job on Slurm, from what Slurm says (a record, or None once it
    forgot the job: MinJobAge), what the wrapper wrote (exit.json, start.json), and whether
    rtrain was asked to cancel it:

    {"state", "reason", "slurm_state", "slurm_job_id", "node", "gpus", "exit_code", "signal",
     "started_at", "ended_at", "restarts"}   (gpus: CUDA_VISIBLE_DEVICES as the job saw it)

    Slurm tells the state (a time limit, a node failure, a preemption, a cancel are Slurm's to
    tell); the wrapper tells the exit code (Slurm's is the wrapper's own, and forgotten after
    MinJobAge). A job Slurm still shows running whose command has ended is shown ended. A job
    that waits again after it ran (preempted or its node failed, and --requeue) is "requeued"."""
    v = {"state": None, "reason": None, "slurm_state": None, "slurm_job_id": None, "node": None,
         "gpus": [], "exit_code": None, "signal": None, "started_at": None, "ended_at": None,
         "restarts": None}
    ran = exit_rec or start_rec or {}
    v.update(started_at=ran.get("started_at"), node=ran.get("node") or None,
             restarts=ran.get("restarts"), gpus=[g for g in str(ran.get("gpus") or "").split(",") if g])
    by_exit = None
    if exit_rec:
        v.update(exit_code=exit_rec.get("exit_code"), signal=exit_rec.get("signal"),
                 ended_at=exit_rec.get("ended_at"))
        if exit_rec.get("cancelled") or (cancel_requested and exit_rec.get("terminated")):
            by_exit = ("cancelled", None)
        elif exit_rec.get("exit_code") == 0:
            by_exit = ("succeeded", None)
        else:
            by_exit = ("failed", _exit_words(exit_rec.get("exit_code"), exit_rec.get("signal")))
    if record is None:
        v["slurm_job_id"] = ran.get("slurm_job_id") or None
        if by_exit:
            v["state"], v["reason"] = by_exit
        elif cancel_requested:
            v["state"] = "cancelled"
        else:
            v["state"] = "lost"
            v["reason"] = "Slurm no longer knows the job, and it left no exit record"
        return v
    v["slurm_job_id"] = record["id"]
    v["slurm_state"] = record["state"]
    if record.get("restarts") is not None:
        v["restarts"] = record["restarts"]
    state, why = map_state(record["state"], record.get("reason"))
    if state == "queued" and (record.get("restarts") or ran):
        state = "requeued"
    if state in ("queued", "requeued"):
        v.update(started_at=None, ended_at=None, exit_code=None, signal=None, node=None, gpus=[])
    elif state == "running":
        if by_exit and _this_run(record, exit_rec):
            state, why = by_exit
        else:
            v.update(ended_at=None, exit_code=None, signal=None)
            v["started_at"] = v["started_at"] or record.get("start")
            v["node"] = v["node"] or record.get("nodes")
    else:
        if record.get("nodes"):  # it ran (a job cancelled while it waited has no node)
            v["node"] = v["node"] or record["nodes"]
            v["started_at"] = v["started_at"] or record.get("start")
            if not exit_rec:
                v["exit_code"], v["signal"] = split_status(record.get("exit_status"))
                v["ended_at"] = record.get("end")
        if state == "failed" and why is None:
            why = _exit_words(v["exit_code"], v["signal"])
    v["state"], v["reason"] = state, why
    return v


def _exit_words(code, sig):
    if sig:
        return "killed by %s" % sig
    if code is None:
        return None
    return "exit %d" % code



# -- a view in the job table's words (rtrain's six states; Slurm's own in the message)

FINAL = ("succeeded", "failed", "cancelled", "lost")


def record(view, requeue=False, now=None):
    """The job table's fields for a job's view: {"state", "message", "exit_code", "signal",
    "started_at", "ended_at", "gpus", "attempts"}. A job Slurm requeued waits again ("queued",
    and the message says so); a preempted job that Slurm will not requeue has failed. GPUs are
    NODE:INDEX (Slurm names them per node; there are no UUIDs to be had on the login node)."""
    state, reason = view["state"], view.get("reason")
    rec = {"exit_code": view.get("exit_code"), "signal": view.get("signal"),
           "started_at": view.get("started_at"), "ended_at": view.get("ended_at"),
           "gpus": ["%s:%s" % (view.get("node") or "?", g) for g in view.get("gpus") or ()],
           "attempts": (view.get("restarts") or 0) + (1 if view.get("started_at") else 0)}
    if state == "preempted" and requeue:
        state, reason = "requeued", "preempted"
    if state in ("queued", "requeued"):
        wait = "Pending: %s" % reason if reason else "Pending"
        rec.update(state="queued", message=wait if state == "queued" else
                   "requeued by Slurm (after preemption or a node failure); %s" % wait,
                   exit_code=None, signal=None, started_at=None, ended_at=None, gpus=[])
    elif state == "running":
        rec.update(state="running", message="", ended_at=None)  # (status JOB: Slurm's id, node)
    else:
        if state == "preempted":
            state, reason = "failed", "preempted by Slurm"
        rec.update(state=state if state in FINAL else "lost", message=reason or "",
                   ended_at=rec["ended_at"] or (time.time() if now is None else now))
    return rec
