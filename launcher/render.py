"""How things look: rich tables, progress, one-line messages. Imported only by the CLI."""
import datetime
import sys
import time

JOB_JSON_KEYS = ("id", "host", "name", "state", "gpus", "exit_code", "signal", "submitted_at",
                 "started_at", "ended_at", "command", "priority", "retries", "attempts",
                 "git_commit", "git_dirty", "log", "work_dir", "message", "gpus_requested",
                 "gpu_hours", "cost", "leftovers", "group", "share", "project", "slurm")

STATE_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red",
               "cancelled": "magenta", "lost": "red"}


def _console(stderr=False):
    """A rich Console. Piped to a file or another program, lines are never wrapped or cut (GPU
    names, UUIDs and commands come out whole); on a terminal, its width."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else 100000,
                   soft_wrap=not tty)


def error(message, hint=""):
    """`rtrain: error: MESSAGE` and its hint on stderr: how every error reaches the user."""
    sys.stderr.write("rtrain: error: %s\n" % message)
    if hint:
        sys.stderr.write("  hint: %s\n" % hint)


def job_json(job):
    return {k: job.get(k) for k in JOB_JSON_KEYS}


def when(ts):
    if not ts:
        return "-"
    t = datetime.datetime.fromtimestamp(ts)
    if t.date() == datetime.date.today():
        return t.strftime("%H:%M:%S")
    return t.strftime("%b %d %H:%M")


def duration(job, now=None):
    start = job.get("started_at")
    if not start:
        return "-"
    end = job.get("ended_at") or (now or time.time())
    s = int(max(0, end - start))
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    return "%dh%02dm" % (s // 3600, s % 3600 // 60)


def short_gpu(uuid):
    return uuid[:12] if uuid else ""


def gpus_text(job):
    """"2 GPUs", "1/2 of a GPU" (--gpus 0.5), or "" for a CPU job."""
    n, k = job.get("gpus_requested") or 0, job.get("share") or 1
    if not n:
        return ""
    return "1/%d of a GPU" % k if k > 1 else "%d GPU%s" % (n, "" if n == 1 else "s")


def submitted(job):
    where = job["host"]
    g = gpus_text(job)
    if job.get("points"):  # a sweep or an array: one group of jobs
        print("group %s queued on %s: %d jobs (%s %s), %s%s" % (
            job["group"], where, job["points"], job["group_kind"], job["group_label"], job["group_command"],
            " (%s each)" % g if g else ""))
        return
    print("job %s queued on %s: %s%s" % (job["id"], where, job["command"], " (%s)" % g if g else ""))


def job_table(jobs, failures=(), hidden=0):
    from rich.table import Table
    con = _console()
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("ID", "NAME", "HOST", "STATE", "GPUS", "SUBMITTED", "STARTED", "TIME", "EXIT"):
        t.add_column(col)
    now = time.time()
    for j in jobs:
        if "counts" in j:  # a sweep or an array: one line, its jobs counted per state
            t.add_row(_txt(j["id"]), _txt(_group_name(j)), _txt(j["host"]), _txt(counts_text(j["counts"])),
                      _txt(gpus_text(j) and gpus_text(j) + " each"), when(j["submitted_at"]),
                      when(j["started_at"]), "-", "-")
            continue
        style = STATE_STYLE.get(j["state"], "")
        gp = ",".join(short_gpu(g) for g in j["gpus"]) if j["gpus"] else (
            str(j.get("gpus_requested") or 0) if j["state"] == "queued" and j.get("gpus_requested") else "-")
        exit_text = "-" if j["exit_code"] is None else str(j["exit_code"])
        if j.get("signal"):
            exit_text += " (%s)" % j["signal"]
        t.add_row(_txt(j["id"]), _txt(j["name"]), _txt(j["host"]), _txt(j["state"], style),
                  _txt(gp), when(j["submitted_at"]), when(j["started_at"]), duration(j, now),
                  _txt(exit_text))
    if jobs:
        con.print(t)
    elif not failures:
        con.print("no jobs (rtrain status --all shows older ones)")
    if hidden:
        con.print("[dim]%d older finished job%s not shown (rtrain status --all)[/]" % (
            hidden, "" if hidden == 1 else "s"))
    host_errors(failures)


def _group_name(g):
    return "%s (%s %s)" % (g["name"], g["kind"], g["label"]) if g.get("label") else g["name"]


def counts_text(counts):
    order = ("running", "queued", "succeeded", "failed", "cancelled", "lost")
    return ", ".join("%d %s" % (counts[k], k) for k in order if counts.get(k))


def group_detail(g, jobs):
    """`rtrain status g7`: the group's line, then its jobs."""
    print("group %s on %s: %s; %d job%s: %s%s" % (
        g["id"], g["host"], _group_name(g), g["size"], "" if g["size"] == 1 else "s",
        counts_text(g["counts"]), "; at most %d at once" % g["max_running"] if g.get("max_running") else ""))
    job_table(jobs)


def group_tails(g, tails):
    """`rtrain logs g7 --tail N`: a header per job, then the end of its log."""
    out = sys.stdout.buffer
    for job, data in tails:
        out.write(("==> job %s  %s  %s%s <==\n" % (
            job["id"], job["name"], job["state"], "" if job.get("exit_code") is None else
            " (exit %s)" % job["exit_code"])).encode("utf-8", "replace"))
        out.write(data if not data or data.endswith(b"\n") else data + b"\n")
    out.flush()


def usage_table(res):
    """`rtrain usage`: GPU-hours per host and project (or per --by), with costs."""
    from rich.table import Table
    con = _console()
    t = Table(box=None, pad_edge=False, header_style="bold")
    keys = [res["by"]] if res.get("by") else ["host", "user", "project"]
    for col in [k.upper() for k in keys] + ["JOBS", "RUNNING", "GPU-HOURS", "COST", "COMPARE"]:
        t.add_column(col, justify="right" if col in ("JOBS", "RUNNING", "GPU-HOURS", "COST", "COMPARE")
                     else "left")
    rows = res["rows"] + ([dict(res["totals"], **{keys[0]: "total"})] if len(res["rows"]) > 1 else [])
    for r in rows:
        t.add_row(*[_txt(r.get(k) or "-") for k in keys] + [
            str(r["jobs"]), str(r["running"]), "%.2f" % r["gpu_hours"],
            "-" if r["cost"] is None else "%.2f" % r["cost"],
            "-" if r["compare_cost"] is None else "%.2f" % r["compare_cost"]])
    if res["rows"]:
        con.print(t)
    else:
        con.print("no GPU jobs since %s" % _full(res["since"]))
    host_errors(res["failures"])


def host_errors(failures):
    """`rtrain: error: ...` and its hint on stderr for each (host, error)."""
    for _host, err in failures:
        error(err.message, err.hint)


def job_detail(job):
    from rich.text import Text
    con = _console()
    rows = [
        ("job", "%s on %s" % (job["id"], job["host"])), ("name", job["name"]),
        ("state", job["state"] + (" - %s" % job["message"] if job.get("message") else "")),
        ("command", job["command"]),
        ("gpus", _job_gpus(job)),
        ("git", "%s%s" % (job.get("git_commit") or "-", " (dirty)" if job.get("git_dirty") else "")),
        ("submitted", _full(job["submitted_at"])), ("started", _full(job["started_at"])),
        ("ended", _full(job["ended_at"])), ("duration", duration(job)),
        ("exit code", "-" if job["exit_code"] is None else "%s%s" % (
            job["exit_code"], " (%s)" % job["signal"] if job.get("signal") else "")),
        ("attempts", "%s of %s" % (job.get("attempts", 0), job.get("retries", 0) + 1)),
        ("gpu-hours", "%.2f%s" % (job.get("gpu_hours") or 0, "" if job.get("cost") is None else
                                  ", cost %.2f" % job["cost"])),
        ("log", job.get("log") or "-"), ("work dir", job.get("work_dir") or "-"),
    ]
    if job.get("group"):
        rows.insert(2, ("group", job["group"]))
    if job.get("slurm"):  # a job on a Slurm cluster: Slurm's id, state and node
        rows.insert(3, ("slurm", slurm_line(job["slurm"])))
    if job.get("leftovers"):  # it ended, but processes it daemonized still run (and hold its GPUs)
        rows.append(("left running", "%s (`rtrain cancel %s` ends them)" % (job["leftovers"], job["id"])))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        # values are the user's text (name, command, message) or the host's: never markup
        con.print(Text.assemble((k.ljust(w), "bold"), "  ", _txt(v)), soft_wrap=True)


def _job_gpus(job):
    if not job["gpus"]:
        return "%s requested" % (gpus_text(job) or "0 GPUs")
    share = job.get("share") or 1
    return ", ".join(job["gpus"]) + (" (1/%d of it, shared)" % share if share > 1 else "")


def _full(ts):
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def gpu_table(results):
    from rich.table import Table
    from rich.text import Text
    con = _console()
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("HOST", "GPU", "NAME", "MEMORY", "UTIL", "STATE", "HELD BY", "UUID"):
        t.add_column(col)
    notes = []  # long messages go under the table, whole, rather than wrapped in a cell
    clusters = [(h, r) for h, r, e in results if e is None and r.get("slurm_nodes") is not None]
    for host, res, err in results:
        if err is None and res.get("slurm_nodes") is not None:
            continue  # a Slurm cluster: its nodes' GRES, in a table of their own below
        if err is not None:
            t.add_row(_txt(host), "-", "[red]unreachable[/]", "", "", "[red]unknown[/]", "see below", "")
            notes.append(Text.assemble(_txt(err.message, "red"),
                                       "" if not err.hint else _txt("\n  hint: %s" % err.hint)))
            continue
        if res.get("error"):
            t.add_row(_txt(host), "-", "[red]nvidia-smi failed[/]", "", "", "[red]unknown[/]", "see below", "")
            notes.append(_txt("%s: %s" % (host, res["error"]["message"]), "red"))
        elif not res["gpus"]:
            t.add_row(_txt(host), "-", "no GPUs", "", "", "", "", "")
            if not res.get("nvidia_smi_found", True):
                notes.append(_txt("%s: nvidia-smi not found, so no GPUs (CPU jobs run)" % host))
        for u in res["gpus"]:
            mem = "-" if u.get("memory_total") is None else "%s/%s MiB" % (
                "?" if u.get("memory_used") is None else u["memory_used"], u["memory_total"])
            util = "-" if u.get("utilization") is None else "%s%%" % u["utilization"]
            state = {"free": "[green]free[/]", "busy": "[yellow]busy[/]", "hidden": "[dim]hidden[/]",
                     "reserved": "[blue]reserved[/]"}.get(u["state"], "[red]unknown[/]")
            held = "; ".join(x for x in (u.get("holder") or u.get("reason") or "", u.get("policy") or "") if x)
            t.add_row(_txt(host), _txt(u["index"]), _txt(u["name"]), _txt(mem), _txt(util), state,
                      _txt(held), _txt(u["uuid"]))
    if len(clusters) < len(results):
        con.print(t)
    for n in notes:
        con.print(n, soft_wrap=True)
    if clusters:
        slurm_nodes_table(con, clusters)


def slurm_line(s):
    """`rtrain status JOB`'s line about Slurm: "job 123, RUNNING on node1"."""
    if not s.get("job_id"):
        return "not submitted to Slurm yet"
    state = s.get("state") or ""
    if s.get("reason"):
        state += " (%s)" % s["reason"]
    return "job %s%s%s" % (s["job_id"], ", " + state if state else "",
                           " on %s" % s["node"] if s.get("node") else "")


def slurm_nodes_table(con, clusters):
    """GPUs of Slurm clusters per node (sinfo's GRES): total, allocated, free."""
    from rich.table import Table
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("HOST", "NODE", "STATE", "PARTITIONS", "GPUS", "ALLOCATED", "FREE", "TYPES"):
        t.add_column(col)
    for host, res in clusters:
        if not res["slurm_nodes"]:
            t.add_row(_txt(host), "-", "no nodes", "", "", "", "", "")
        for n in res["slurm_nodes"]:
            kinds = ", ".join("%s %d/%d" % (k or "gpu", v["used"], v["total"]) for k, v in n["types"].items())
            t.add_row(_txt(host), _txt(n["node"]), _txt(n["state"], "" if n["usable"] else "red"),
                      _txt(",".join(n["partitions"])), str(n["gpus_total"]), str(n["gpus_used"]),
                      _txt(str(n["gpus_free"]), "green" if n["gpus_free"] else ""), _txt(kinds))
    con.print(t)


def _txt(value, style=""):
    """User or host text (job name, command, message, host, GPU name, error) as a rich Text:
    printed as written, never parsed as markup (`[/]` or `[red]` in it stays as it is)."""
    from rich.text import Text
    return Text("" if value is None else str(value), style=style)


def clear():
    sys.stdout.write("\x1b[H\x1b[2J")


def confirm_large(info):
    """List the largest files of a tree over the limit; on a terminal ask whether to send it.
    Elsewhere (a script, CI) the answer is no: the error after the list says --yes."""
    sys.stderr.write("The tree to sync holds %d files, %.1f MB (limit %.0f MB). Largest:\n" % (
        info["files"], info["total_size"] / 1e6, info["limit"] / 1e6))
    for path, size in info["largest"]:
        sys.stderr.write("  %10.1f MB  %s\n" % (size / 1e6, path))
    if not sys.stdin.isatty():
        sys.stderr.flush()
        return False
    sys.stderr.write("Send it anyway? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


class Stderr:
    """Progress and notes on stderr during submit; a bar only for uploads over a second."""

    def __init__(self, quiet=False):
        self.quiet = quiet
        self.t0 = None
        self.bar = None

    def event(self, kind, detail):
        if kind == "warning" or kind == "skip":
            sys.stderr.write("rtrain: %s\n" % detail)
        elif kind == "placed" and not self.quiet:
            sys.stderr.write("rtrain: placing the job on %s\n" % detail)
        elif kind == "upload":
            self.t0 = time.monotonic()
        elif kind == "sent" and not self.quiet:
            self.done()
            sys.stderr.write("rtrain: sent %d file(s), %.1f MB\n" % (detail["files"], detail["bytes"] / 1e6))
        elif kind == "building" and not self.quiet and detail:
            # a Slurm host builds the job's environment before sbatch: each new line of it once
            import re
            said = re.sub(r", \d+ s\b", "", detail)
            if said != getattr(self, "said", None):
                self.said = said
                sys.stderr.write("rtrain: %s\n" % detail)
                sys.stderr.flush()
        elif kind == "retry":
            self.done()
            err = detail["error"]
            sys.stderr.write("rtrain: connection lost (%s); retrying in %gs (%d of %d)\n" % (
                getattr(err, "detail", err), detail["delay"], detail["attempt"], detail["of"]))
            sys.stderr.flush()

    def progress(self, sent, total):
        if self.quiet or not sys.stderr.isatty() or self.t0 is None:
            return
        if self.bar is None and time.monotonic() - self.t0 > 1.0:
            from rich.progress import Progress, BarColumn, DownloadColumn, TransferSpeedColumn
            self.bar = Progress("uploading", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                console=_console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("up", total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=sent)

    def done(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def doctor(results):
    from rich.text import Text
    con = _console()
    mark = {True: ("ok  ", "green"), False: ("FAIL", "red"), None: ("warn", "yellow")}
    for host, checks in results:
        bad = [c for c in checks if c["ok"] is False]
        con.print(Text.assemble((str(host), "bold"), ": ", ("not ready", "red") if bad else ("ready", "green")))
        for c in checks:
            con.print(Text.assemble("  ", mark[c["ok"]], " ", _txt(c["name"].ljust(10)), " ",
                                    _txt(c["detail"])), soft_wrap=True)
            if c["ok"] is not True and c.get("fix"):
                con.print(Text.assemble("             fix: ", _txt(c["fix"])), soft_wrap=True)


class FileProgress:
    """A progress bar for pulls, shown only for files over 8 MB and on a terminal."""

    def __init__(self):
        self.bar = None
        self.tasks = {}

    def update(self, path, done, total):
        if total < (8 << 20) or not sys.stderr.isatty():
            return
        if self.bar is None:
            from rich.progress import Progress, BarColumn, DownloadColumn, TransferSpeedColumn
            self.bar = Progress("{task.description}", BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), console=_console(stderr=True), transient=True)
            self.bar.start()
        if path not in self.tasks:
            self.tasks[path] = self.bar.add_task(path, total=total)
        self.bar.update(self.tasks[path], completed=done)

    def done(self):
        if self.bar is not None:
            self.bar.stop()


def pruned(results, dry_run):
    """One line per host: what prune removed (or would remove) and the space it frees."""
    verb = "would free" if dry_run else "freed"
    for host, res, err in results:
        if err is not None:
            error("%s: %s" % (host, err.message), err.hint)
            continue
        env_b = sum(b for _, b in res["envs"])
        data_b = sum(b for _, b in res["data"])
        blobs = res["blobs"]
        total = res["work_bytes"] + env_b + data_b + blobs["bytes"]
        print("%s: %s %.1f MB: work dirs of %d job(s) (%.1f MB), %d environment(s) (%.1f MB), "
              "%d data tree(s) (%.1f MB), %d stored file(s) no job uses (%.1f MB)%s" % (
                  host, verb, total / 1e6, len(res["jobs"]), res["work_bytes"] / 1e6,
                  len(res["envs"]), env_b / 1e6, len(res["data"]), data_b / 1e6, blobs["count"],
                  blobs["bytes"] / 1e6, "; store skipped: %s" % blobs["skipped"]
                  if blobs.get("skipped") else ""))
