"""submit.py: when a submit whose connection dropped is asked about again (by its token), and
when it is not."""
import pytest

from doubles import StubClient, StubSession
from launcher import submit
from launcher.errors import HostError


class _Client(StubClient):
    """Fails each call with the next of `errors`, or answers with it when it is a reply."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = []

    def exchange(self, verb, req, respond):
        self.calls.append(("exchange", req))
        raise self.errors.pop(0)

    def call(self, verb, req=None):
        self.calls.append(("call", req))
        e = self.errors.pop(0)
        if isinstance(e, Exception):
            raise e
        return e


def _Session(client):
    return StubSession(client, hosts=("local",), default="local")


def _dropped(sent):
    e = HostError("local", "connection lost: EOF", "run the command again")
    e.request_sent = sent
    return e


def test_a_drop_before_the_whole_request_was_sent_is_not_retried(tmp_path):
    (tmp_path / "a.py").write_text("x\n")
    s = _Session(_Client([_dropped(False)]))
    events = []
    with pytest.raises(HostError, match="connection lost: EOF") as ei:
        submit.submit(s, ["true"], root=str(tmp_path), events=lambda *a: events.append(a), sleep=lambda t: None)
    assert "run the command again" in ei.value.hint
    assert s.resets == 0 and not [e for e in events if e[0] == "retry"]


def test_a_drop_after_the_request_asks_again_with_the_same_token(tmp_path):
    (tmp_path / "a.py").write_text("x\n")
    job = {"id": 4, "state": "queued"}
    client = _Client([_dropped(True), _dropped(False), {"job": job, "duplicate": True}])
    s = _Session(client)
    events, slept = [], []
    got = submit.submit(s, ["true"], root=str(tmp_path), events=lambda *a: events.append(a), sleep=slept.append)
    assert got["id"] == "4" and s.resets == 2 and slept == [1.0, 2.0]
    retries = [e[1] for e in events if e[0] == "retry"]
    assert [(r["attempt"], r["of"]) for r in retries] == [(1, 2), (2, 2)]
    tokens = {req["token"] for _, req in client.calls}
    assert len(tokens) == 1  # the same token every time
    assert all(not req.get("upload") for kind, req in client.calls if kind == "call")
