"""`logs`: a job's log from a byte offset (or N lines back), following it as it grows."""
import base64
import os
import time

from .. import db, groups, logwatch
from .context import TERMINAL


def logs(ctx):
    """Frames {"o": offset, "d": base64} from byte `offset` on (or `tail_lines` lines back). While
    following, a heartbeat {"hb": offset, "state": ...} goes out at once and after every
    `heartbeat` seconds without data, so the client can tell a live stream from a dead network.
    The final reply says where the log ended and how the job ended. Following wakes on inotify
    (logwatch) where it can, so a line reaches the client as soon as the job writes it."""
    req = ctx.req
    if req.get("group") is not None:
        return _group_tails(ctx, req["group"], int(req.get("tail_lines") or 10))
    row = ctx.job_row(req.get("id"))
    job_id = row["id"]
    path = ctx.home.job(job_id).log
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
    watch = logwatch.Watch(ctx.home.job(job_id).dir, poll=float(req.get("poll", 0.01))) if follow else None
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
                row = ctx.backend.job_row(job_id)
                last_check = now
                check = False
                # a job that ended may have written more since the read above: one more pass
                done = not follow or row["state"] in TERMINAL
                if done:
                    continue
            if now - last_sent >= heartbeat:
                # a daemon that died (killed, or a reboot) is started again; it reconciles, and a
                # job whose process vanished becomes lost, which ends this stream
                ctx.backend.revive([row])
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


def _group_tails(ctx, gid, lines):
    """The last `lines` lines of every job's log in a group, in one reply (`logs g7 --tail N`):
    {"group": its summary, "jobs": [job, with "tail": base64]}."""
    g = groups.row(ctx.con, gid)
    ctx.backend.refresh()
    out = []
    for r in groups.member_rows(ctx.con, g["id"]):
        job = db.to_public(r)
        f = _open_log(ctx.home.job(r["id"]).log)
        data = b""
        if f is not None:
            with f:
                f.seek(_tail_offset(f, lines))
                data = f.read(1 << 20)
        job["tail"] = base64.b64encode(data).decode("ascii")
        out.append(job)
    return {"group": groups.summaries(ctx.con, ids=[g["id"]])[0], "jobs": out}


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
