"""Agent entry point: `python3 AGENT VERB`, one JSON request on stdin, one JSON reply on stdout."""
import errno
import json
import os
import sys
import traceback

from . import protocol
from .protocol import AgentError

def agent_argv():
    """How to start this agent again (for the daemon): the zipapp, or the package in a checkout."""
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    flags = ["-S"] if sys.flags.no_site else []
    if argv0.endswith(".pyz"):
        return [sys.executable] + flags + [argv0]
    return [sys.executable, "-m", __package__]


def _read_request(stream, argv=()):
    """The request: `--request JSON` after the verb (small requests, docs/contracts.md), else
    the first line of stdin."""
    if len(argv) >= 3 and argv[1] == "--request":
        line = argv[2].encode("utf-8")
    else:
        line = stream.readline()
    if not line:
        raise AgentError("bad_request", "no request on stdin (the connection may have dropped)")
    try:
        req = json.loads(line.decode("utf-8"))
    except ValueError as e:
        raise AgentError("bad_request", "request is not JSON: %s" % e)
    if not isinstance(req, dict):
        raise AgentError("bad_request", "request must be a JSON object")
    want = req.get("protocol", protocol.PROTOCOL)
    if want != protocol.PROTOCOL:
        raise AgentError("protocol", "client speaks protocol %s, this agent speaks %s" % (
            want, protocol.PROTOCOL), "upgrade rtrain on the laptop or let it re-ship the agent")
    return req


def _os_error(e, home):
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return AgentError("disk_full", "no space left on the device holding %s" % home,
                          "free some space there (old jobs live in %s/jobs)" % home)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AgentError("not_writable", "cannot write under %s: %s" % (home, e.strerror),
                          "make it writable, or set `home:` for this host in hosts.yaml")
    return None


def _db_error(e, home):
    """SQLite reports a full disk or a read-only home as its own errors, not OSError."""
    import sqlite3
    if not isinstance(e, sqlite3.Error):
        return None
    text = str(e).lower()
    if "disk is full" in text:
        return _os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), home)
    if "readonly database" in text or "unable to open database" in text:
        return _os_error(OSError(errno.EACCES, "the job database %s/jobs.sqlite cannot be written"
                                 % home), home)
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.stderr.write("usage: agent VERB < request.json\n")
        sys.exit(2)
    verb = argv[0]
    out = sys.stdout
    from . import verbs
    from .verbs.context import Context
    home = None
    code = 0
    try:
        fn = verbs.VERBS.get(verb)
        if fn is None:
            raise AgentError("bad_verb", "unknown verb %r (agent %s); known: %s" % (
                verb, protocol.VERSION, ", ".join(sorted(verbs.VERBS))))
        stdin = sys.stdin.buffer
        req = _read_request(stdin, argv)
        ctx = Context(req, stdin, out, agent_argv())
        home = ctx.home_root
        result = fn(ctx)
        if result is not None:
            out.write(protocol.dumps(protocol.ok(result)))
    except AgentError as e:
        out.write(protocol.dumps(protocol.fail(e)))
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001 - the client gets one line, stderr the traceback
        mapped = (_os_error if isinstance(e, OSError) else _db_error)(e, home or "RTRAIN_HOME")
        if mapped is None:
            traceback.print_exc()
            mapped = AgentError("internal", "agent failed: %s" % (e if isinstance(e, OSError) else repr(e)))
        out.write(protocol.dumps(protocol.fail(mapped)))
        code = 1
    try:
        out.flush()
    except (OSError, ValueError):
        pass
    sys.exit(code)
