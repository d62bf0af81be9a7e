"""The CLI's handlers of the verbs that stay on the line (forward, shell, jupyter, tensorboard):
part of the CLI layer with commands.py, whose HANDLERS table names them."""
import sys
import time

from .errors import EXIT_INTERRUPTED


def cmd_forward(args, session_factory):
    from . import interactive
    with session_factory(args) as s:
        job, fwd = interactive.forward(s, args.job, args.port, args.local_port)
        print("forwarding http://127.0.0.1:%d -> port %d of job %s on %s (Ctrl-C stops)" % (
            fwd.local_port, args.port, job["id"], job["host"]))
        sys.stdout.flush()
        return _hold(s, job["id"], fwd)


def cmd_shell(args, session_factory):
    from . import interactive
    with session_factory(args) as s:
        return interactive.shell(s, args.job, host=args.host)


def cmd_jupyter(args, session_factory):
    from . import interactive, render
    import shlex
    argv = [args.command] if args.command else list(interactive.JUPYTER)
    with session_factory(args) as s:
        err = render.Stderr()
        job, url, fwd = interactive.serve(s, argv, host=args.host, gpus=args.gpus, name="jupyter",
                                          root=args.dir, events=err.event)
        return _serving(s, job, url, fwd, args.open, "jupyter (%s)" % " ".join(map(shlex.quote, argv)))


def cmd_tensorboard(args, session_factory):
    from . import app, interactive, render
    with session_factory(args) as s:
        target = app.job(s, args.job)
        argv = [args.command] if args.command else interactive.tensorboard_argv(target)
        err = render.Stderr()
        job, url, fwd = interactive.serve(s, argv, host=target["host"], name="tensorboard-%s" % target["num"],
                                          root=args.dir, events=err.event)
        return _serving(s, job, url, fwd, args.open, "tensorboard of job %s" % target["id"])


def _serving(session, job, url, fwd, open_it, what):
    print("%s: job %s on %s\n  %s" % (what, job["id"], job["host"], url))
    sys.stdout.flush()
    if open_it:
        import webbrowser
        webbrowser.open(url)
    code = _hold(session, job["id"], fwd)
    if code == EXIT_INTERRUPTED and _ask("stop job %s (its server)? [y/N] " % job["id"]):
        from . import app
        app.cancel(session, job["id"])
        print("cancelled job %s" % job["id"])
        return 0
    if code == EXIT_INTERRUPTED:
        print("job %s goes on: rtrain cancel %s stops it" % (job["id"], job["id"]))
    return code


def _hold(session, job_id, fwd):
    """Keep a forwarding up until Ctrl-C (130) or the job ends (0)."""
    from . import app
    try:
        while True:
            time.sleep(2)
            j = app.job(session, job_id)
            if j["state"] not in ("queued", "running"):
                print("job %s %s: forwarding stopped" % (job_id, j["state"]))
                return 0
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_INTERRUPTED
    finally:
        fwd.close()


def _ask(question):
    if not sys.stdin.isatty():
        return False
    sys.stdout.write(question)
    sys.stdout.flush()
    try:
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except KeyboardInterrupt:
        return False
