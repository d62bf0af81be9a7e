"""The `rtrain` command: its arguments, and the one place where errors become exit codes.
The CLI layer is this module, commands.py (one handler per verb) and render.py (how things
look): the only modules that print."""
import argparse
import sys

from . import __version__
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, RtrainError

EPILOG = """examples:
  rtrain submit --gpus 2 -- python3 train.py --lr 3e-4
  rtrain status
  rtrain logs 12 -f
  rtrain cancel 12
  rtrain gpus

Hosts come from --hosts FILE, $RTRAIN_HOSTS, ./hosts.yaml or ~/.config/rtrain/hosts.yaml;
with none, jobs run on this machine (host `local`). See hosts.example.yaml."""


def build_parser():
    p = argparse.ArgumentParser(
        prog="rtrain", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Queue training jobs on a GPU tower, a cloud VM or this machine; "
                    "each job runs on its own snapshot of your code, on free GPUs.")
    p.add_argument("--version", action="version", version="rtrain %s" % __version__)
    _add_common(p)
    # the same options after the verb (`rtrain status --debug`); SUPPRESS: given there, they
    # set the value, and not given there they leave the one from before the verb alone
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="verb", metavar="COMMAND")

    def verb(name, **kw):
        return sub.add_parser(name, parents=[common], **kw)

    s = verb("submit", help="sync this directory and queue a command",
                       description="Snapshot the current directory (the files git would take), send "
                                   "what the host lacks, and queue CMD there.")
    s.add_argument("--host", help="host from hosts.yaml (default: the default host, else the one "
                                  "where the job starts soonest)")
    s.add_argument("--gpus", type=_gpus, default=None, metavar="N",
                   help="GPUs the job needs (default: rtrain.yaml's gpus, else 0); 0.5, 0.33, 0.25: "
                        "a share of one GPU (its memory is not isolated)")
    s.add_argument("--sweep", action="append", default=[], metavar="NAME=VALUES",
                   help="one job per combination: lr=1e-3,3e-4 or seed=0..4; {NAME} in the command "
                        "is the value, and the job gets RTRAIN_SWEEP_NAME")
    s.add_argument("--array", metavar="N|A-B[%L]",
                   help="one job per index (RTRAIN_ARRAY_INDEX): 10, 0-9, 0-9%%3 (at most 3 at once)")
    s.add_argument("--after", action="append", default=[], metavar="JOB[,JOB...]",
                   help="start once these jobs (or groups: g7) all succeeded; cancelled if one fails")
    s.add_argument("--after-any", action="append", default=[], metavar="JOB[,JOB...]",
                   help="start once these jobs (or groups) all ended, whatever way")
    s.add_argument("--name", help="a name for the job (default: the script's name)")
    s.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    s.add_argument("--retries", type=int, default=0, metavar="N",
                   help="requeue a failed or lost job up to N times")
    s.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable for the job")
    s.add_argument("--image", metavar="IMAGE", help="run the job in this container image, through the "
                                                    "host's docker or podman (default: rtrain.yaml's image:)")
    s.add_argument("-C", "--dir", default=".", help="directory to sync (default: .)")
    s.add_argument("-f", "--follow", action="store_true",
                   help="stream the log, exit with the job's exit code")
    s.add_argument("--notify", action="store_true",
                   help="with --follow: a desktop notification when the job ends")
    s.add_argument("-q", "--quiet", action="store_true", help="print the job id (or group id) alone")
    s.add_argument("-y", "--yes", action="store_true",
                   help="send a large tree, or queue a sweep over max_points jobs, without asking")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                   help="the command; a single argument is run by the shell as written "
                        "(default: rtrain.yaml's run)")

    st = verb("status", help="list jobs, or show one job")
    st.add_argument("job", nargs="?", help="a job id (12 or host:12), or a group's (g7): its jobs")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--host", help="only this host")
    st.add_argument("--state", action="append", choices=["queued", "running", "succeeded", "failed",
                                                          "cancelled", "lost"], help="only these states")
    st.add_argument("-a", "--all", action="store_true", help="include jobs that ended over a day ago")
    st.add_argument("-w", "--watch", action="store_true", help="refresh every 2 s")
    st.add_argument("-n", "--limit", type=int, default=30, metavar="N",
                    help="show at most N finished jobs per host (default 30; --all shows every one)")

    lg = verb("logs", help="print or follow a job's log")
    lg.add_argument("job", help="a job id, or a group's (g7) with --tail: the end of each job's log")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="stream until the job ends; exit with its exit code; Ctrl-C detaches")
    lg.add_argument("-n", "--tail", type=int, metavar="N", help="start N lines from the end")
    lg.add_argument("--notify", action="store_true",
                    help="with -f: a desktop notification when the job ends")

    c = verb("cancel", help="cancel a queued or running job (a group: all its jobs)")
    c.add_argument("jobs", nargs="+", metavar="JOB")

    pl = verb("pull", help="copy files a job wrote to ./rtrain-out/JOB/")
    pl.add_argument("job")
    pl.add_argument("paths", nargs="*", metavar="PATH",
                    help="files or folders in the job's work dir (default: all it wrote)")
    pl.add_argument("-o", "--output", metavar="DIR",
                    help="where to put them (default ./rtrain-out/JOB, which submit never sends)")
    pl.add_argument("--pycache", action="store_true", help="bring __pycache__ folders too")

    i = verb("init", help="write a commented rtrain.yaml (the project file) here")
    i.add_argument("-C", "--dir", default=".", help="the project's root (default: .)")
    i.add_argument("--force", action="store_true", help="replace an existing rtrain.yaml")

    pr = verb("prune", help="free space on the hosts: old jobs' work dirs, unused environments "
                            "and data, unreferenced files")
    pr.add_argument("--host", help="only this host")
    pr.add_argument("--older-than", metavar="AGE",
                    help="remove the work dirs of jobs that ended longer ago than this: 14d, 12h, "
                         "30m (default: the host's prune_older_than, else 14d)")
    pr.add_argument("--keep", type=int, metavar="N",
                    help="always keep the N newest ended jobs' work dirs (default: the host's "
                         "prune_keep, else 10)")
    pr.add_argument("-n", "--dry-run", action="store_true", help="say what would go, remove nothing")

    h = verb("hosts", help="check each host: transport, ssh, python, agent, nvidia-smi, disk")
    h.add_argument("host", nargs="?")
    h.add_argument("--disconnect", action="store_true",
                   help="close the shared SSH connections (of HOST, or all) instead")

    a = verb("autostop", help="see or change when an idle host stops itself (a cloud VM)",
             description="What the host's autostop will do and when; or change it until autostop: in "
                         "hosts.yaml changes. Idle means no rtrain job queued or running, no busy GPU, "
                         "no terminal in use (README: Cloud VMs).")
    a.add_argument("host", help="host from hosts.yaml")
    a.add_argument("--idle", metavar="DURATION", help="stop after this long idle (45s, 30m, 2h)")
    a.add_argument("--command", help="the command that stops the host (default: hosts.yaml's)")
    a.add_argument("--cancel", action="store_true", help="turn autostop off on this host")

    fw = verb("forward", help="reach a running job's port from here (127.0.0.1)",
              description="Forward 127.0.0.1:LOCAL_PORT here to port PORT of a running job's host, "
                          "over its SSH connection, until Ctrl-C.")
    fw.add_argument("job")
    fw.add_argument("port", type=int, help="the port the job listens on (on 127.0.0.1 of its host)")
    fw.add_argument("local_port", type=int, nargs="?", help="the port here (default: the same, if free)")

    sh = verb("shell", help="a shell on the host, in a job's work dir with its environment",
              description="An interactive shell on the host: in JOB's work dir with its environment "
                          "(and its GPUs while it runs), or, without JOB, a login shell there.")
    sh.add_argument("job", nargs="?")
    sh.add_argument("--host", help="without JOB: this host (default: the default host)")

    jp = verb("jupyter", help="JupyterLab as a job on leased GPUs, its port forwarded here",
              description="Start JupyterLab as a job (in the project's environment, on --gpus GPUs), "
                          "forward its port and print its URL; Ctrl-C asks whether to stop it.")
    jp.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs to lease for it (default 0)")
    jp.add_argument("--host", help="host from hosts.yaml")
    jp.add_argument("--open", action="store_true", help="open the URL in a browser")
    jp.add_argument("--command", help="the server to start instead (it must print its URL)")
    jp.add_argument("-C", "--dir", default=".", help="project directory to sync (default: .)")

    tb = verb("tensorboard", help="TensorBoard on a job's outputs, its port forwarded here")
    tb.add_argument("job")
    tb.add_argument("--open", action="store_true", help="open the URL in a browser")
    tb.add_argument("--command", help="the server to start instead (it must print its URL)")
    tb.add_argument("-C", "--dir", default=".", help="project directory to sync (default: .)")

    g = verb("gpus", help="GPUs of every host: free, busy or unknown, and who holds them")
    g.add_argument("--host")
    g.add_argument("--json", action="store_true")

    u = verb("usage", help="GPU-hours of your jobs per host and project, with their cost")
    u.add_argument("--since", default="30d", metavar="AGE", help="jobs that ran in the last AGE (30d, 12h)")
    u.add_argument("--by", choices=["project", "user", "host"], help="one line per project, user or host")
    u.add_argument("--host", help="only this host")
    u.add_argument("--json", action="store_true")
    return p


def _gpus(text):
    """--gpus: a whole number, or a share of one GPU (0.5, 1/2)."""
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            value = float(a) / float(b)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError("%r is not a number of GPUs" % text)
    return int(value) if value == int(value) else value


def _add_common(p, default=None):
    """Options every verb takes, before or after the verb."""
    def d(value):
        return value if default is None else default
    p.add_argument("--hosts", metavar="FILE", default=d(None),
                   help="hosts file to use (default: search, see below)")
    p.add_argument("--accept-new-host-key", action="store_true", default=d(False),
                   help="trust an unknown SSH host key and add it to known_hosts "
                        "(like StrictHostKeyChecking=accept-new; a changed key is still refused)")
    p.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks")


def main(argv=None):
    from . import render
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    try:
        return int(_dispatch(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except RtrainError as e:
        if args.debug:
            import traceback
            traceback.print_exc()
        render.error(e.message, e.hint)
        return e.exit_code
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        render.error("unexpected error: %s: %s" % (type(e).__name__, e), "run again with --debug and report it")
        return EXIT_ERROR


def _session(args):
    from . import config, session
    cfg = config.load(args.hosts)
    return session.Session(cfg, accept_new_host_key=args.accept_new_host_key)


def _dispatch(args):
    from . import commands
    return commands.HANDLERS[args.verb](args, _session)
