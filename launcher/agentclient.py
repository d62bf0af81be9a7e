"""Talking to an agent over any transport: JSON framing, protocol check, error mapping,
agent shipping. One AgentClient per host per command.

Shipping costs nothing on the hot path: where the transport can name the agent's path without
asking the host (SSH), the agent is started there at once; only if python answers that the file
is not there ("can't open file", exit 2) is it shipped (SFTP) and the call made again, which is
safe because an agent that never started did nothing."""
import json
import threading

from . import agentpkg
from .agent.protocol import PROTOCOL
from .errors import AgentReplyError, HostError

# Verbs whose small requests (no secrets in them) may travel as an argument: see _start
INLINE_VERBS = ("hello", "status", "gpus", "cancel", "logs", "outputs", "read", "shell")
INLINE_MAX = 16 << 10


class _AgentMissing(Exception):
    """The agent file is not on the host (yet): ship it and call again."""


class AgentClient:
    def __init__(self, host, transport):
        self.host = host            # config.Host
        self.transport = transport  # transport.Transport
        self._path = None
        self._unverified = False  # _path was named, not checked: it may not be there yet
        self._lock = threading.Lock()
        self._pre = None          # (verb, thread, [proc or None, error or None]): prestart()

    @property
    def name(self):
        return self.host.name

    def base_request(self):
        req = {"protocol": PROTOCOL}
        if self.host.home:
            req["home"] = self.host.home
        if getattr(self.host, "slurm", None) is not None:  # scheduler: slurm (agent/backends.py)
            req["slurm"] = self.host.slurm
        return req

    def settings(self):
        """This host's scheduling settings (agent/settings.py), as requests carry them."""
        from .agent.settings import Settings
        h = self.host
        return Settings(mem_busy_mib=h.mem_busy_mib, visible=None if h.gpus == "all" else tuple(h.gpus),
                        lock_dir=h.lock_dir, nvidia_smi=h.nvidia_smi or "nvidia-smi").to_dict()

    def agent_path(self):
        """Where the agent is on the host: named without asking it where the transport can
        (agent_path_unchecked: then unverified until a call shows it is there), else shipped."""
        with self._lock:
            if self._path is None:
                blob, digest = agentpkg.build()
                guess = getattr(self.transport, "agent_path_unchecked", None)
                if guess is not None:
                    self._path, self._unverified = guess(digest), True
                else:
                    self._path, self._unverified = self.transport.ensure_agent(blob, digest), False
            return self._path

    def _ship(self):
        with self._lock:
            blob, digest = agentpkg.build()
            self._path, self._unverified = self.transport.ensure_agent(blob, digest), False

    def _shipping(self, fn):
        """fn() once; if it found no agent on the host, ship it and fn() again."""
        try:
            return fn()
        except _AgentMissing:
            self._ship()
        try:
            return fn()
        except _AgentMissing:
            raise HostError(self.name, "the agent shipped to %s is still not found there, or not "
                            "whole" % self._path, "check RTRAIN_HOME there (`home:` in hosts.yaml) "
                            "and the disk; `rtrain hosts` checks them", check="home")

    def prestart(self, verb):
        """Start the agent for `verb` now, in the background: connecting, the exec and Python's
        start-up on the host then overlap with what the caller does meanwhile (submit hashes
        the tree); the agent waits for its request on stdin. The next call of `verb` uses it."""
        if self._pre is not None:
            return
        box = [None, None]

        def run():
            try:
                box[0] = self.transport.start(self._argv(verb))
            except BaseException as e:  # noqa: BLE001 - handed to the call that uses it
                box[1] = e

        t = threading.Thread(target=run, name="rtrain-prestart-%s" % self.name, daemon=True)
        self._pre = (verb, t, box)
        t.start()

    def _take_prestarted(self, verb):
        pre, self._pre = self._pre, None
        if pre is None:
            return None
        pre_verb, t, box = pre
        t.join()
        if box[1] is not None:
            raise box[1]
        if pre_verb != verb:
            box[0].kill()
            return None
        return box[0]

    def _argv(self, verb):
        # -S: no site-packages. The agent needs the standard library only, and `site` (every
        # .pth file of the host's Python, conda's above all) costs 20-30 ms or more per call.
        # The fixed bootstrap checks the path and the agent's full hash before it runs it
        # (agentboot.py): a planted agent file never runs.
        return agentpkg.boot_argv(self.transport.python, self.agent_path(), verb)

    def _start(self, verb, req, inline=False):
        proc = self._take_prestarted(verb)
        body = dict(self.base_request())
        body.update(req)
        if proc is None and inline and verb in INLINE_VERBS and \
                getattr(self.transport, "request_in_argv", False):
            line = json.dumps(body)
            if len(line) <= INLINE_MAX:
                # the request as an argument (docs/contracts.md): OpenSSH sends a session's
                # stdin only once its exec is confirmed, a round trip later
                proc = self.transport.start(self._argv(verb) + ["--request", line])
                proc.close_stdin()
                return proc
        if proc is None:
            proc = self.transport.start(self._argv(verb))
        try:
            proc.write(json.dumps(body).encode("utf-8") + b"\n")
        except (HostError, OSError) as e:
            # the process may be gone already (a prestarted one above all): say why if it can,
            # from its reply (an agent that refused to start: python too old) or its exit
            line = _readline_quietly(proc)
            if line.endswith(b"\n"):
                try:
                    self._reply(proc, line, verb)  # raises the agent's error
                except (HostError, AgentReplyError):
                    raise
                except Exception:  # noqa: BLE001 - not a reply: the write's error stands
                    raise e
            try:
                rc = proc.wait()
                err = proc.stderr().strip()
            except Exception:  # noqa: BLE001 - the write's error stands
                raise e
            if _missing_signature(rc, err, self._unverified):
                raise _AgentMissing()
            if rc is not None and rc >= 0:
                raise self._no_reply(rc, err, verb)
            raise
        return proc

    def call(self, verb, req=None):
        """Run one verb; return its result dict or raise AgentReplyError / HostError."""
        return self._shipping(lambda: self._call(verb, req))

    def interactive(self, verb, req=None):
        """Run a verb that takes this terminal over (`shell`): the host's process gets a pty.
        Returns its exit status. The agent must be on the host already (any call puts it there)."""
        body = dict(self.base_request())
        body.update(req or {})
        return self.transport.interactive(self._argv(verb) + ["--request", json.dumps(body)])

    def exchange(self, verb, req, respond):
        """Run a verb that may ask for more mid-way: each frame it writes before its reply (a
        JSON line without "protocol") goes to respond(frame), which returns an iterable of bytes
        to send back on its stdin. stdin stays open until the reply (the agent takes a closed
        one as the client having gone away). Returns the result, or raises like call().
        A HostError raised once the whole request was written (the request line and all that
        respond() returned) has `request_sent` True: the agent may have acted on it and its
        reply been lost. Before that (False) the agent cannot have had the whole request."""
        return self._shipping(lambda: self._exchange(verb, req, respond))

    def _exchange(self, verb, req, respond):
        proc = self._start(verb, req or {})
        sent = True  # the request line is written
        try:
            while True:
                line = proc.readline()
                if not line.endswith(b"\n"):  # EOF, or a line cut short by a dropped connection
                    return self._reply(proc, b"", verb)  # raises with what we know
                try:
                    frame = json.loads(line)
                except ValueError:
                    return self._reply(proc, line, verb)  # raises: not JSON
                if not isinstance(frame, dict) or "protocol" in frame:
                    break
                sent = False
                early = _send(proc, respond(frame))
                if early is not None:
                    return self._reply(proc, early, verb)
                sent = True
        except HostError as e:
            # an ssh child says whether its session ever opened (sshproc.py): if not, nothing
            # written reached the agent
            e.request_sent = sent and getattr(proc, "delivered", True)
            proc.kill()
            raise
        except BaseException:
            proc.kill()
            raise
        try:
            return self._reply(proc, line, verb)
        finally:
            proc.close_stdin()

    def _call(self, verb, req):
        proc = self._start(verb, req or {}, inline=True)
        try:
            proc.close_stdin()
            line = proc.readline()
        except BaseException:
            proc.kill()
            raise
        return self._reply(proc, line, verb)

    def stream(self, verb, req=None):
        """Yield frames of a streaming verb; the final reply's result is yielded last as
        {"final": result}. Raises AgentReplyError / HostError."""
        gen = self._stream(verb, req)
        try:
            try:
                first = next(gen)
            except _AgentMissing:  # nothing was yielded: calling again is safe
                gen.close()
                self._ship()
                gen = self._stream(verb, req)
                first = next(gen)
            yield first
            for frame in gen:
                yield frame
        except StopIteration:
            return
        finally:
            gen.close()

    def _stream(self, verb, req=None):
        proc = self._start(verb, req or {}, inline=True)
        proc.close_stdin()
        try:
            while True:
                line = proc.readline()
                if not line.endswith(b"\n"):  # EOF, or a frame cut short by a dropped connection
                    self._reply(proc, b"", verb)  # raises with what we know
                    return
                frame = json.loads(line)
                if "protocol" in frame:
                    yield {"final": self._reply(proc, line, verb)}
                    return
                yield frame
        finally:
            proc.kill()

    def _reply(self, proc, line, verb):
        if not line:
            rc = proc.wait()
            err = proc.stderr().strip()
            if _missing_signature(rc, err, self._unverified):
                raise _AgentMissing()
            raise self._no_reply(rc, err, verb)
        try:
            reply = json.loads(line)
        except ValueError:
            proc.wait()
            raise HostError(self.name, "the agent answered %r instead of JSON" % line[:200],
                            "run `rtrain hosts` to check the host", permanent=True)
        if reply.get("protocol") != PROTOCOL:
            raise HostError(self.name, "agent speaks protocol %s, this rtrain speaks %s" % (
                reply.get("protocol"), PROTOCOL), "upgrade rtrain on this machine", permanent=True)
        if not reply.get("ok"):
            e = reply.get("error") or {}
            if e.get("code") == "python_too_old":  # the zipapp's own check (agentpkg._MAIN)
                raise HostError(self.name, e.get("message") or "%s on the host is older than 3.8" % (
                    self.transport.python), "rtrain needs Python >= 3.8 there; set `python:` for this "
                    "host in hosts.yaml to one", check="python", permanent=True)
            if e.get("code") == "unsafe_home":  # agentboot.py, agentpkg._MAIN: nothing ran
                raise HostError(self.name, e.get("message") or "unsafe home", e.get("hint", ""),
                                check="home", permanent=True)
            raise AgentReplyError(self.name, e.get("code", "error"), e.get("message", "agent error"),
                                  e.get("hint", ""), e.get("data"))
        return reply.get("result")

    def _no_reply(self, rc, err, verb):
        py = self.transport.python
        last = err.splitlines()[-1] if err else ""
        if rc == 127 or "not found" in last and py in last:
            return HostError(self.name, "%s not found on the host" % py,
                             "install Python >= 3.8 there, or set `python:` for this host in hosts.yaml",
                             check="python", permanent=True)
        if "SyntaxError" in err or "ModuleNotFoundError" in err or "ImportError" in err:
            return HostError(self.name, "%s on the host cannot run the agent (%s)" % (py, last),
                             "rtrain needs Python >= 3.8 there; set `python:` in hosts.yaml",
                             check="python", permanent=True)
        return HostError(self.name, "the agent's %s call ended without a reply (exit %s)%s" % (
            verb, rc, (": " + last) if last else ""), "run `rtrain hosts` to check the host; --debug shows more")


def _send(proc, chunks):
    """Write chunks to the agent. None when all went; the agent's reply line if it stopped
    reading before the end (it failed: disk full...; its reply says why). Raises the write's
    error when there is no reply to read either (the connection is gone)."""
    for chunk in chunks:
        try:
            proc.write(chunk)
        except (HostError, OSError):
            line = _readline_quietly(proc)
            if not line:
                raise
            return line
    return None


def _readline_quietly(proc):
    try:
        return proc.readline()
    except (HostError, OSError):
        return b""


def _missing_signature(rc, err, unverified=True):
    """The agent is not on the host: the bootstrap (agentboot.py) says so, exit 2, as python3
    does for a script it cannot find. Where the path was checked when it was named (shipped
    already), only a file the bootstrap found wrong (and removed) counts."""
    if rc != 2 or "can't open file" not in err or "agent-" not in err:
        return False
    return unverified or "rtrain-agent-missing:" in err

