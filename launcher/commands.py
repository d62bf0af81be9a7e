"""The CLI's verb handlers (HANDLERS, at the end): call the verbs, hand their results to
render, choose the exit code. Part of the CLI layer (with cli.py and render.py): the only
modules that print."""
import json
import os
import sys
import time

from .errors import EXIT_INTERRUPTED, RtrainError


def _parse_env(pairs):
    env = {}
    for p in pairs:
        if "=" not in p:
            raise RtrainError("--env %r is not K=V" % p, "write it as --env NAME=value")
        k, v = p.split("=", 1)
        env[k] = v
    from .agent.settings import env_problem
    if env_problem(env):
        raise RtrainError("--env: %s" % env_problem(env), "write it as --env NAME=value")
    return env


def cmd_submit(args, session_factory):
    from . import groups, project, render, submit, sweep
    proj = project.load(args.dir)  # rtrain.yaml: the defaults; the command line wins
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd and proj.run:
        cmd = list(proj.run)
    if not cmd:
        raise RtrainError("no command to run", "put it after `--`: rtrain submit -- python3 train.py "
                          "(or set `run:` in rtrain.yaml)")
    gpus = args.gpus if args.gpus is not None else (proj.gpus or 0)
    # a sweep (--sweep, else rtrain.yaml's sweep:) or an array: one job per point (sweep.py)
    sweeps = sweep.parse_sweeps(args.sweep) if args.sweep else (
        sweep.from_project(proj.sweep, proj.path) if proj.sweep and args.array is None else None)
    many = sweep.plan(cmd, sweeps, args.array)
    if many and args.follow:
        raise RtrainError("--follow follows one job; this submit queues %d" % len(many["points"]),
                          "watch them with `rtrain status GROUP` and `rtrain logs GROUP --tail 20`")
    err = render.Stderr(quiet=args.quiet)
    with session_factory(args) as s:
        host, after, after_any = args.host or proj.host, (), ()
        if args.after or args.after_any:  # dependencies are on the job's own host
            host, after, after_any = groups.dependencies(s.cfg, args.after, args.after_any, host)
        job = submit.submit(
            s, cmd, host=host, gpus=gpus, name=args.name, priority=args.priority,
            retries=args.retries, env=_parse_env(args.env), root=args.dir,
            confirm_large=lambda info: args.yes or render.confirm_large(info),
            progress=err.progress, events=err.event, project=proj, image=args.image, many=many,
            after=after, after_any=after_any, yes=args.yes)
        err.done()
        if job.get("uploaded_files"):
            err.event("sent", {"files": job["uploaded_files"], "bytes": job["uploaded"]})
        if args.quiet:
            sys.stdout.write((job["group"] if many else job["id"]) + "\n")
        else:
            render.submitted(job)
        sys.stdout.flush()
        if args.follow:
            return _follow(s, job["id"], None, quiet=args.quiet, desktop=args.notify)
    return 0


def cmd_status(args, session_factory):
    from . import app, groups, render
    with session_factory(args) as s:
        if args.job and groups.is_group(args.job):  # a sweep's or an array's jobs
            g, jobs = groups.status(s, args.job)
            if args.json:
                print(json.dumps({"group": g, "jobs": [render.job_json(j) for j in jobs]}, indent=2))
            else:
                render.group_detail(g, jobs)
            return 0
        if args.job:
            job = app.job(s, args.job)
            if args.json:
                print(json.dumps(render.job_json(job), indent=2))
            else:
                render.job_detail(job)
            return 0
        while True:
            jobs, failures, hidden = app.status(
                s, host=args.host, states=args.state, show_all=args.all,
                limit=None if (args.all or args.json) else args.limit, fold_groups=not args.json)
            if args.json:
                print(json.dumps([render.job_json(j) for j in jobs], indent=2))
                sys.stdout.flush()
                render.host_errors(failures)  # stdout stays pure JSON; the why goes to stderr
                break
            if args.watch:
                render.clear()
            render.job_table(jobs, failures, hidden)
            if not args.watch:
                break
            time.sleep(2)
    return 1 if failures else 0


def cmd_logs(args, session_factory):
    from . import groups, render
    with session_factory(args) as s:
        if groups.is_group(args.job):  # the end of each job's log, in one call
            if args.follow:
                raise RtrainError("logs -f follows one job; %s is a group" % args.job,
                                  "rtrain logs %s --tail 20 shows the end of each job's log" % args.job)
            g, tails = groups.tails(s, args.job, args.tail if args.tail is not None else 10)
            render.group_tails(g, tails)
            return 0
        return _follow(s, args.job, args.tail, follow=args.follow, desktop=args.notify)


def _follow(session, ref, tail, follow=True, quiet=False, desktop=False):
    """Print a job's log as it comes, byte for byte. Following, return the job's exit code when
    it ends (1 when it has none: lost, or killed by a signal it reports none for), 130 on Ctrl-C
    (the job goes on)."""
    from . import logs
    out = sys.stdout.buffer
    try:
        for ev in logs.logs(session, ref, follow=follow, tail=tail):
            kind = ev[0]
            if kind == "data":
                out.write(ev[1])
                out.flush()
            elif kind == "reconnecting":
                _, attempt, e, delay = ev
                sys.stderr.write("rtrain: connection lost (%s); reconnecting in %.1fs (attempt %d)\n" % (
                    e.message, delay, attempt))
                sys.stderr.flush()
            elif kind == "resumed":
                sys.stderr.write("rtrain: reconnected\n")
                sys.stderr.flush()
            elif kind == "end":
                fin = ev[1]
                if not follow:
                    return 0
                if desktop:
                    from . import desktop as desk
                    desk.notify(fin)
                if not quiet and fin["state"] != "succeeded":
                    sys.stderr.write("rtrain: job %s %s%s\n" % (
                        fin["id"], fin["state"],
                        "" if fin.get("exit_code") is None else " (exit code %s)" % fin["exit_code"]))
                if fin["state"] == "succeeded":
                    return 0
                code = fin.get("exit_code")
                return code if isinstance(code, int) and 0 < code < 256 else 1
    except KeyboardInterrupt:
        try:
            out.flush()
        except (OSError, ValueError):
            pass
        sys.stderr.write("\nrtrain: detached; the job goes on (rtrain logs %s -f to resume)\n" % ref)
        return EXIT_INTERRUPTED
    return 0


def cmd_cancel(args, session_factory):
    from . import app, render
    from . import groups
    code = 0
    with session_factory(args) as s:
        for ref in args.jobs:
            try:
                if groups.is_group(ref):
                    g = groups.cancel(s, ref)
                    print("cancelled group %s: %d queued and %d running job(s)" % (
                        g["id"], g["cancelled_queued"], g["cancelled_running"]))
                    continue
                job = app.cancel(s, ref)
            except RtrainError as e:
                render.error(e.message, e.hint)
                code = 1
                continue
            if job["was"] in ("queued", "running"):
                print("cancelled job %s (%s, was %s)" % (job["id"], job["state"], job["was"]))
            else:
                print("job %s had already ended (%s)%s" % (job["id"], job["state"], (
                    "; ended %d process(es) it had left running" % job["ended_leftovers"])
                    if job.get("ended_leftovers") else ""))
    return code


def cmd_gpus(args, session_factory):
    from . import app, render
    with session_factory(args) as s:
        results = app.gpus(s, host=args.host)
    if args.json:
        out = []
        for host, res, err in results:
            if err is not None:
                out.append({"host": host, "error": err.message})
                continue
            for u in res["gpus"] + (res.get("slurm_nodes") or []):  # a Slurm host: its nodes
                d = dict(u)
                d["host"] = host
                out.append(d)
            if res.get("error"):
                out.append({"host": host, "error": res["error"]["message"]})
        print(json.dumps(out, indent=2))
        render.host_errors([(h, err) for h, _, err in results if err is not None])
    else:
        render.gpu_table(results)
    # an unreachable host or a failing nvidia-smi is an error; no nvidia-smi at all is not
    return 0 if all(err is None and not res.get("error") for _, res, err in results) else 1


def cmd_pull(args, session_factory):
    from . import app, render
    bar = render.FileProgress()
    with session_factory(args) as s:
        try:
            res = app.pull(s, args.job, args.paths, dest=args.output, progress=bar.update,
                           pycache=args.pycache)
        finally:
            bar.done()
    total = sum(n for _, n in res["files"])
    print("pulled %d file(s), %.1f MB, from job %s into %s" % (
        len(res["files"]), total / 1e6, res["job"]["id"], os.path.relpath(res["dest"])))
    return 0


def cmd_hosts(args, session_factory):
    from . import doctor, render
    if args.disconnect:
        from . import connections
        with session_factory(args) as s:
            closed, others = connections.disconnect(s.cfg, args.host)
        for host, what in closed:
            print("%s: %s" % (host, {"closed": "shared connection closed", "none": "no shared connection",
                                     "not shared": "no shared connection (not an openssh host)"}[what]))
        if others:
            print("closed %d other shared connection(s)" % others)
        return 0
    with session_factory(args) as s:
        results = doctor.doctor(s, args.host)
    render.doctor(results)
    return 0 if all(c["ok"] is not False for _, checks in results for c in checks) else 1


def cmd_init(args, session_factory):
    from . import project
    path = project.write_starter(args.dir, force=args.force)
    print("wrote %s: edit it, then `rtrain submit`" % os.path.relpath(path))
    return 0


def cmd_prune(args, session_factory):
    from . import prune, render
    with session_factory(args) as s:
        results = prune.prune(s, host=args.host, older_than=args.older_than, keep=args.keep,
                              dry_run=args.dry_run)
    render.pruned(results, args.dry_run)
    return 0 if all(err is None for _, _, err in results) else 1


def cmd_autostop(args, session_factory):
    from . import app, doctor, render
    change = None
    if args.cancel:
        change = {"cancel": True}
    elif args.idle or args.command:
        change = {"idle": args.idle, "command": args.command}
    with session_factory(args) as s:
        summary = app.autostop(s, args.host, change)
    render.doctor([(args.host, [doctor.autostop_check(summary)])])
    return 0


def cmd_usage(args, session_factory):
    from . import render, usage
    with session_factory(args) as s:
        res = usage.usage(s, since=args.since, by=args.by, host=args.host)
    if args.json:
        print(json.dumps({k: res[k] for k in ("rows", "totals", "since", "by")}, indent=2))
        render.host_errors(res["failures"])
    else:
        render.usage_table(res)
    return 1 if res["failures"] else 0


def _live():
    from . import commands_live as live
    return {"forward": live.cmd_forward, "shell": live.cmd_shell, "jupyter": live.cmd_jupyter,
            "tensorboard": live.cmd_tensorboard}


HANDLERS = {"submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "cancel": cmd_cancel,
            "pull": cmd_pull, "hosts": cmd_hosts, "gpus": cmd_gpus, "init": cmd_init,
            "prune": cmd_prune, "autostop": cmd_autostop, "usage": cmd_usage}
HANDLERS.update(_live())
