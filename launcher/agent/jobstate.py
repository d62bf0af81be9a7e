"""A job's state changes after it started: its exit recorded, a retry queued, a vanished job
marked lost. Safe from any agent process (the daemon, `status`, `logs`, `cancel`): each change
is one transaction that re-reads the row first."""
import os
import signal
import time

from . import db, fsutil, jobcontainer, jobprocs, notify, runner, workdirs


def finalize_exited(con, home):
    """Record the exit of every running job whose wrapper wrote exit.json. Safe from any process."""
    changed = 0
    for row in con.execute("SELECT id FROM jobs WHERE state='running'").fetchall():
        ex = runner.read_exit(home, row["id"])
        if ex is not None:
            changed += _finish(con, home, row["id"], ex)
    return changed


def _finish(con, home, job_id, ex):
    with db.Tx(con):
        row = db.get(con, job_id)
        if row is None or row["state"] != "running":
            return 0
        if ex.get("cancelled"):
            state = "cancelled"
        elif ex["exit_code"] == 0:
            state = "succeeded"
        else:
            state = "failed"
        if state == "failed" and row["attempts"] <= row["retries"]:
            _requeue(con, home, row, "exit code %s, retrying (attempt %d of %d)" % (
                ex["exit_code"], row["attempts"] + 1, row["retries"] + 1))
            return 1
        con.execute("UPDATE jobs SET state=?, exit_code=?, signal=?, ended_at=? WHERE id=?",
                    (state, ex["exit_code"], ex.get("signal"), ex.get("ended_at") or time.time(), job_id))
    ended(con, home, job_id)
    return 1


def ended(con, home, job_id):
    """After a job reached its final state: tell whoever it asked to be told (notify.py)."""
    notify.job_event(home, db.get(con, job_id))


def _requeue(con, home, row, why):
    job_id = row["id"]
    for p in (home.job(job_id).exit, home.job(job_id).pids):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    workdirs.retire(home, job_id)  # the next attempt gets a fresh copy of the snapshot
    append_log(home, job_id, "rtrain: %s\n" % why)
    con.execute("UPDATE jobs SET state='queued', gpus='[]', wrapper_pid=NULL, wrapper_start=NULL,"
                " message=? WHERE id=?", (why, job_id))


def end_leftovers(home, job_id, only_look=False):
    """The processes of a job whose wrapper is gone that still run (jobprocs.py): ended (or,
    with only_look, just found). Returns their pids."""
    pids = runner.read_pids(home, job_id)
    if not pids or pids.get("boot_id") != fsutil.boot_id():
        return set()
    job_tag = pids.get("tag") or jobprocs.tag(home.root, job_id)
    left = jobprocs.find(job_tag, pids)
    if left and not only_look:
        jobprocs.end_all(job_tag, pids)
    return left


def append_log(home, job_id, text):
    try:
        with open(home.job(job_id).log, "ab") as f:
            f.write(text.encode())
    except OSError:
        pass


NEVER_STARTED_AFTER_S = 10.0


def reconcile(con, home):
    """Daemon-only: exits, plus jobs whose wrapper vanished (killed, or a reboot) -> lost/requeued."""
    finalize_exited(con, home)
    for row in con.execute("SELECT * FROM jobs WHERE state='running'").fetchall():
        if not row["wrapper_pid"] and row["boot_id"] == fsutil.boot_id():
            # a daemon died between marking the job running and recording its wrapper
            if _adopt_or_requeue(con, home, row):
                continue
            row = db.get(con, row["id"])
        pid = row["wrapper_pid"]
        if pid and fsutil.alive(pid, row["wrapper_start"]) and row["boot_id"] == fsutil.boot_id():
            continue
        ex = runner.read_exit(home, row["id"])  # it may have finished just now
        if ex is not None:
            _finish(con, home, row["id"], ex)
            continue
        _lose(con, home, row)
    jobcontainer.sweep(con, home)  # containers left without their job (at most once per boot and hour)


def _adopt_or_requeue(con, home, row):
    """A running job with no wrapper pid. Its wrapper writes pid.json once the job runs: adopt
    those pids. With no pid.json long after the start, the wrapper never was: queue it again.
    True when there is nothing more to check for now."""
    pids = runner.read_pids(home, row["id"])
    if pids.get("wrapper_pid") and pids.get("boot_id") == row["boot_id"]:
        with db.Tx(con):
            con.execute("UPDATE jobs SET wrapper_pid=?, wrapper_start=? WHERE id=? AND state='running'"
                        " AND wrapper_pid IS NULL", (pids["wrapper_pid"], pids.get("wrapper_start"),
                                                     row["id"]))
        return False
    if runner.read_exit(home, row["id"]) is not None:
        return False
    if time.time() - (row["started_at"] or 0) < NEVER_STARTED_AFTER_S:
        return True  # its wrapper may be starting right now
    with db.Tx(con):
        con.execute("UPDATE jobs SET state='queued', gpus='[]', started_at=NULL, attempts=attempts-1,"
                    " message='' WHERE id=? AND state='running' AND wrapper_pid IS NULL", (row["id"],))
    return True


def _lose(con, home, row):
    jobcontainer.stop_left(home, row)  # a container job's container goes first (its leases with it)
    # The wrapper is gone. If processes of the job outlived it (this boot), end them all.
    end_leftovers(home, row["id"])
    with db.Tx(con):
        row = db.get(con, row["id"])
        if row["state"] != "running":
            return
        if row["attempts"] <= row["retries"]:
            _requeue(con, home, row, "job lost (its process vanished: host rebooted or killed); "
                     "retrying (attempt %d of %d)" % (row["attempts"] + 1, row["retries"] + 1))
        else:
            append_log(home, row["id"], "rtrain: job lost: its process vanished (host rebooted or killed)\n")
            con.execute("UPDATE jobs SET state='lost', ended_at=?, message=? WHERE id=?",
                        (time.time(), "its process vanished (host rebooted or killed)", row["id"]))
    if db.get(con, row["id"])["state"] == "lost":
        ended(con, home, row["id"])


def request_cancel(home, row):
    """Ask a running job to stop: the cancel mark its wrapper reads, and SIGTERM to the wrapper,
    which passes it on and ends every process of the job after their grace period (runner.py,
    jobprocs.py); with no wrapper left, end the job's processes here (the daemon then marks it
    lost). The exit is recorded as the wrapper ends."""
    job_id = row["id"]
    open(home.job(job_id).cancel, "w").close()
    if row["wrapper_pid"] and fsutil.alive(row["wrapper_pid"], row["wrapper_start"]):
        try:
            os.kill(row["wrapper_pid"], signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        end_leftovers(home, job_id)
