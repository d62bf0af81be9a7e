"""`logs -f` resumes by byte offset: a connection that drops mid-stream (here, a transport
that breaks after a few frames) yields every byte exactly once."""
import base64
import io
import random

from doubles import StubClient, StubSession
from launcher import logs
from launcher.agent.verbs import logs as agentlogs
from launcher.errors import HostError


class FlakyClient(StubClient):
    def __init__(self, data, breaks):
        self.data = data
        self.breaks = breaks
        self.requests = []

    def stream(self, verb, req):
        self.requests.append(dict(req))
        off = req.get("offset", 0)
        sent = 0
        while off < len(self.data):
            n = random.randint(1, 700)
            chunk = self.data[off:off + n]
            # re-send a little of what was already sent now and then, as a retried read could
            start = max(0, off - random.randint(0, 5)) if random.random() < 0.2 else off
            chunk = self.data[start:off + n]
            yield {"o": start, "d": base64.b64encode(chunk).decode()}
            off += n
            sent += 1
            if self.breaks and sent == self.breaks[0]:
                self.breaks.pop(0)
                raise HostError("tower", "connection lost")
        yield {"final": {"offset": len(self.data), "state": "succeeded", "exit_code": 0, "signal": None}}


def test_every_byte_once_across_drops():
    random.seed(4)
    data = b"".join(b"line %05d \xff\xfe tqdm 10%%\r20%%\r\n" % i for i in range(3000))
    client = FlakyClient(data, breaks=[3, 5, 1, 8, 2])
    s = StubSession(client)
    out = io.BytesIO()
    events = []
    for ev in logs.logs(s, "tower:7", follow=True, sleep=lambda d: None):
        events.append(ev[0])
        if ev[0] == "data":
            out.write(ev[1])
    assert out.getvalue() == data
    assert events.count("reconnecting") == 5 and events[-1] == "end"
    offsets = [r.get("offset") for r in client.requests]
    assert offsets[0] is None and all(o is not None for o in offsets[1:])
    assert s.resets == 5


def test_tail_offset(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\nc\nd\n")
    with open(p, "rb") as f:
        assert agentlogs._tail_offset(f, 2) == 4
        assert agentlogs._tail_offset(f, 10) == 0
        assert agentlogs._tail_offset(f, 0) == 8
    p.write_bytes(b"a\nb\npartial")
    with open(p, "rb") as f:
        assert agentlogs._tail_offset(f, 1) == 4


def test_tail_offset_long_lines_and_block_edges(tmp_path):
    p = tmp_path / "log"
    lines = [b"x" * 70000 + b"\n", b"short\n", b"y" * 140000 + b"\n", b"\n", b"z" * 65535 + b"\n"]
    p.write_bytes(b"".join(lines))
    with open(p, "rb") as f:
        for n in range(0, len(lines) + 2):
            want = b"".join(lines[max(0, len(lines) - n):]) if n else b""
            off = agentlogs._tail_offset(f, n)
            assert p.read_bytes()[off:] == want, n
    p.write_bytes(b"")
    with open(p, "rb") as f:
        assert agentlogs._tail_offset(f, 3) == 0
    p.write_bytes(b"only, no newline")
    with open(p, "rb") as f:
        assert agentlogs._tail_offset(f, 1) == 0
        assert agentlogs._tail_offset(f, 0) == len(b"only, no newline")


class _Transport:
    def __init__(self):
        import threading
        self.closed = threading.Event()

    def close(self):
        self.closed.set()


class SilentClient(StubClient):
    """The first connection sends some frames and then goes silent (no data, no heartbeat, no
    RST) until its transport is closed; the next one sends the rest."""

    def __init__(self, data, cut):
        self.data = data
        self.cut = cut
        self.transport = _Transport()
        self.requests = []

    def stream(self, verb, req):
        self.requests.append(dict(req))
        off = req.get("offset", 0)
        if len(self.requests) == 1:
            yield {"hb": 0, "state": "running"}
            yield {"o": 0, "d": base64.b64encode(self.data[:self.cut]).decode()}
            assert self.transport.closed.wait(30), "the watchdog never closed the silent connection"
            raise HostError("tower", "the agent's logs call ended without a reply (exit -1)")
        yield {"hb": off, "state": "running"}
        yield {"o": off, "d": base64.b64encode(self.data[off:]).decode()}
        yield {"final": {"offset": len(self.data), "state": "failed", "exit_code": 3, "signal": None}}


def test_a_silent_connection_becomes_a_reconnect():
    data = bytes(range(256)) * 100
    client = SilentClient(data, 1000)
    s = StubSession(client)
    out, events = b"", []
    for ev in logs.logs(s, "tower:7", follow=True, sleep=lambda d: None, stall_after=0.3):
        events.append(ev)
        if ev[0] == "data":
            out += ev[1]
    assert out == data
    kinds = [e[0] for e in events]
    assert kinds.count("reconnecting") == 1 and "resumed" in kinds and kinds[-1] == "end"
    rec = [e for e in events if e[0] == "reconnecting"][0]
    assert "no word from the host" in rec[2].message
    assert client.requests[1]["offset"] == 1000
    assert events[-1][1]["exit_code"] == 3


class SlowConsumerClient(StubClient):
    def __init__(self):
        self.transport = _Transport()

    def stream(self, verb, req):
        for i in range(3):
            yield {"o": i, "d": base64.b64encode(b"x").decode()}
        yield {"final": {"offset": 3, "state": "succeeded", "exit_code": 0, "signal": None}}


def test_a_slow_terminal_is_not_a_dead_network():
    import time
    client = SlowConsumerClient()
    events = []
    for ev in logs.logs(StubSession(client), "tower:7", follow=True, stall_after=0.2):
        events.append(ev[0])
        if ev[0] == "data":
            time.sleep(0.5)  # the caller holds the event longer than the stall limit
    assert events == ["data", "data", "data", "end"]
    assert not client.transport.closed.is_set()


class GapClient(StubClient):
    def stream(self, verb, req):
        yield {"o": 0, "d": base64.b64encode(b"abc").decode()}
        yield {"o": 10, "d": base64.b64encode(b"xyz").decode()}


def test_a_gap_in_the_stream_is_an_error_not_silence():
    import pytest
    from launcher.errors import RtrainError
    with pytest.raises(RtrainError, match="skipped bytes 3-10"):
        list(logs.logs(StubSession(GapClient()), "tower:7", follow=True))


def test_watch_sees_the_log_and_the_exit_file(tmp_path):
    import os
    from launcher.agent import logwatch
    w = logwatch.Watch(str(tmp_path))
    try:
        if w.kind != "inotify":
            import pytest
            pytest.skip("no inotify here")
        assert w.wait(0.05) == set()
        with open(tmp_path / "log", "ab") as f:
            f.write(b"x")
        assert w.wait(5) == {"log"}
        (tmp_path / "exit.json.tmp1").write_text("{}")
        os.replace(tmp_path / "exit.json.tmp1", tmp_path / "exit.json")
        names = w.wait(5)
        assert "exit.json" in names
    finally:
        w.close()
    p = logwatch.Watch(str(tmp_path / "missing"))  # no such folder: polls instead
    assert p.kind == "poll" and p.wait(0.01) is None


def _follow_with(events):
    from launcher import commands
    orig = logs.logs
    logs.logs = lambda *a, **k: iter(events)
    try:
        return commands._follow(StubSession(None), "tower:7", None, follow=True)
    finally:
        logs.logs = orig


def test_follow_exit_codes_and_messages(capsysbinary):
    err = HostError("tower", "connection lost")
    fin = {"id": "tower:7", "host": "tower", "state": "failed", "exit_code": 3, "signal": None}
    assert _follow_with([("data", b"a\xff\r"), ("reconnecting", 1, err, 0.5), ("resumed",),
                         ("data", b"b\n"), ("end", fin)]) == 3
    out = capsysbinary.readouterr()
    assert out.out == b"a\xff\rb\n"
    assert b"reconnecting in 0.5s" in out.err and b"reconnected" in out.err and b"exit code 3" in out.err
    assert _follow_with([("end", dict(fin, state="succeeded", exit_code=0))]) == 0
    assert _follow_with([("end", dict(fin, state="lost", exit_code=None))]) == 1

    def interrupted():
        yield ("data", b"partial")
        raise KeyboardInterrupt

    assert _follow_with(interrupted()) == 130
    out = capsysbinary.readouterr()
    assert out.out.endswith(b"partial") and b"detached; the job goes on" in out.err


def test_a_frame_cut_short_is_a_dropped_connection():
    """paramiko hands back what it had when the connection died: half a JSON line is a drop
    (HostError, so logs -f reconnects), not a crash on bad JSON."""
    import pytest
    from launcher.agentclient import AgentClient

    class Proc:
        lines = [b'{"o":0,"d":"YQ=="}\n', b'{"o":1,"d":"Y']

        def write(self, data):
            pass

        def close_stdin(self):
            pass

        def readline(self):
            return self.lines.pop(0) if self.lines else b""

        def wait(self):
            return -1

        def stderr(self):
            return ""

        def kill(self):
            pass

    class Transport:
        python = "python3"

        def ensure_agent(self, blob, digest):
            return "/agent.pyz"

        def start(self, argv, env=None):
            return Proc()

    class Host:
        name = "tower"
        home = None

    frames = []
    with pytest.raises(HostError):
        for fr in AgentClient(Host(), Transport()).stream("logs", {"id": 1}):
            frames.append(fr)
    assert frames == [{"o": 0, "d": "YQ=="}]


class RefusingClient(StubClient):
    """Every connection fails with the same error."""

    def __init__(self, err):
        self.err = err
        self.calls = 0

    def stream(self, verb, req):
        self.calls += 1
        raise self.err
        yield  # a generator, like the real one


def test_errors_that_cannot_heal_end_the_follow_at_once():
    import pytest
    for err in (HostError("tower", "HOST KEY CHANGED for [127.0.0.1]:22", permanent=True),
                HostError("tower", "python3 not found on the host", check="python", permanent=True)):
        c = RefusingClient(err)
        with pytest.raises(HostError) as got:
            list(logs.logs(StubSession(c), "tower:7", follow=True, sleep=lambda d: None))
        assert got.value is err and c.calls == 1
    # a refused key may be a drop mid-handshake once; again and again, it is a refusal
    c = RefusingClient(HostError("tower", "authentication refused for alice@tower"))
    events = []
    with pytest.raises(HostError):
        for ev in logs.logs(StubSession(c), "tower:7", follow=True, sleep=lambda d: None):
            events.append(ev[0])
    assert events == ["reconnecting"] * 3 and c.calls == 4
