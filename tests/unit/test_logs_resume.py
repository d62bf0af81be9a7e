"""`logs -f` resumes by byte offset: a connection that drops mid-stream (here, a transport
that breaks after a few frames) yields every byte exactly once."""
import base64
import io
import random

from launcher import app
from launcher.errors import HostError
from launcher.agent import verbs


class FlakyClient:
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


class FakeSession:
    def __init__(self, client):
        self.c = client
        self.resets = 0

    def find(self, ref):
        return "tower", 7, {}

    def client(self, host):
        return self.c

    def reset(self, host):
        self.resets += 1

    def job_id(self, host, n):
        return "tower:7"


def test_every_byte_once_across_drops():
    random.seed(4)
    data = b"".join(b"line %05d \xff\xfe tqdm 10%%\r20%%\r\n" % i for i in range(3000))
    client = FlakyClient(data, breaks=[3, 5, 1, 8, 2])
    s = FakeSession(client)
    out = io.BytesIO()
    events = []
    for ev in app.logs(s, "tower:7", follow=True, sleep=lambda d: None):
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
        assert verbs._tail_offset(f, 2) == 4
        assert verbs._tail_offset(f, 10) == 0
        assert verbs._tail_offset(f, 0) == 8
    p.write_bytes(b"a\nb\npartial")
    with open(p, "rb") as f:
        assert verbs._tail_offset(f, 1) == 4
