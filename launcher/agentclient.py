"""Talking to an agent over any transport: JSON framing, protocol check, error mapping,
agent shipping. One AgentClient per host per command."""
import json
import threading

from . import agentpkg
from .errors import AgentReplyError, HostError

PROTOCOL = 1


class AgentClient:
    def __init__(self, host, transport):
        self.host = host            # config.Host
        self.transport = transport  # transport.Transport
        self._path = None
        self._lock = threading.Lock()

    @property
    def name(self):
        return self.host.name

    def base_request(self):
        req = {"protocol": PROTOCOL}
        if self.host.home:
            req["home"] = self.host.home
        return req

    def sched(self):
        gpus = self.host.gpus
        return {"mem_busy_mib": self.host.mem_busy_mib,
                "visible": None if gpus == "all" else list(gpus),
                "lock_dir": getattr(self.host, "lock_dir", None),
                "nvidia_smi": getattr(self.host, "nvidia_smi", None)}

    def agent_path(self):
        with self._lock:
            if self._path is None:
                blob, digest = agentpkg.build()
                self._path = self.transport.ensure_agent(blob, digest)
            return self._path

    def _start(self, verb, req):
        proc = self.transport.start([self.transport.python, self.agent_path(), verb])
        body = dict(self.base_request())
        body.update(req)
        proc.write(json.dumps(body).encode("utf-8") + b"\n")
        return proc

    def call(self, verb, req=None, payload=None):
        """Run one verb; return its result dict or raise AgentReplyError / HostError.
        `payload` is an iterable of bytes sent after the request line."""
        proc = self._start(verb, req or {})
        try:
            if payload is not None:
                for chunk in payload:
                    proc.write(chunk)
            proc.close_stdin()
            line = proc.readline()
        except BaseException:
            proc.kill()
            raise
        return self._reply(proc, line, verb)

    def stream(self, verb, req=None):
        """Yield frames of a streaming verb; the final reply's result is yielded last as
        {"final": result}. Raises AgentReplyError / HostError."""
        proc = self._start(verb, req or {})
        proc.close_stdin()
        try:
            while True:
                line = proc.readline()
                if not line:
                    self._reply(proc, line, verb)  # raises with what we know
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
            raise self._no_reply(rc, err, verb)
        try:
            reply = json.loads(line)
        except ValueError:
            proc.wait()
            raise HostError(self.name, "the agent answered %r instead of JSON" % line[:200],
                            "run `rtrain hosts` to check the host")
        if reply.get("protocol") != PROTOCOL:
            raise HostError(self.name, "agent speaks protocol %s, this rtrain speaks %s" % (
                reply.get("protocol"), PROTOCOL), "upgrade rtrain on this machine")
        if not reply.get("ok"):
            e = reply.get("error") or {}
            raise AgentReplyError(self.name, e.get("code", "error"), e.get("message", "agent error"),
                                  e.get("hint", ""), e.get("data"))
        return reply.get("result")

    def _no_reply(self, rc, err, verb):
        py = self.transport.python
        last = err.splitlines()[-1] if err else ""
        if rc == 127 or "not found" in last and py in last:
            return HostError(self.name, "%s not found on the host" % py,
                             "install Python >= 3.8 there, or set `python:` for this host in hosts.yaml")
        if "SyntaxError" in err or "ModuleNotFoundError" in err or "ImportError" in err:
            return HostError(self.name, "%s on the host cannot run the agent (%s)" % (py, last),
                             "rtrain needs Python >= 3.8 there; set `python:` in hosts.yaml")
        return HostError(self.name, "the agent's %s call ended without a reply (exit %s)%s" % (
            verb, rc, (": " + last) if last else ""), "run `rtrain hosts` to check the host; --debug shows more")
