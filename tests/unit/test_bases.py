"""Manifest bases (docs/design.md "Manifest bases"): a submit of a tree the host has seen sends
only the entries that changed, on the manifest the host kept from the last submit; the host
checks what changed as it checks any manifest, asks for the whole one where its base is gone,
and keeps no base that names a blob its store lacks."""
import hashlib
import io
import json
import os

import pytest

from doubles import StubClient, StubSession
from launcher import bases as client_bases
from launcher import submit
from launcher.agent import bases, paths, store
from launcher.agent.manifest import ManifestError, check_changes, check_entries
from launcher.agent.protocol import AgentError
from launcher.agent.verbs import submit as submit_verb
from launcher.agent.verbs.context import Context


def _file(path, data, exe=False):
    return {"path": path, "type": "file", "hash": hashlib.sha256(data).hexdigest(),
            "size": len(data), "exec": exe}


def _blobs(home, *datas):
    st = store.Store(os.path.join(home, "store"))
    st.receive(io.BytesIO(b"".join(b"%s %d\n%s" % (hashlib.sha256(d).hexdigest().encode(), len(d), d)
                                   for d in datas) + b"END\n"))
    return st


def _submit(home, manifest, token, stdin=b""):
    """Run the submit verb with stdin holding `stdin` (what the client answers), and the
    client still on the line. Returns (result, the frames the agent wrote before its reply)."""
    r, w = os.pipe()
    os.write(w, stdin)
    req = {"protocol": 1, "home": home, "command": "true", "upload": True, "token": token,
           "manifest": manifest}
    out = io.StringIO()
    ctx = Context(req, os.fdopen(r, "rb"), out, ["agent"])
    ctx.poke = lambda: None
    try:
        res = submit_verb.submit(ctx)
    finally:
        os.close(w)
    return res, [json.loads(x) for x in out.getvalue().splitlines()]


def _job_manifest(home, job_id):
    with open(paths.Home(home).job(job_id).manifest) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- the client's side

def test_no_record_sends_the_whole_manifest_and_a_record_makes_a_delta(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rest = [_file("m%d.py" % i, b"%d" % i) for i in range(6)]
    code = [_file("a.py", b"a"), _file("b.py", b"b"), _file("c.py", b"c"),
            {"path": "l", "type": "symlink", "target": "a.py"}] + rest
    sent, recs = client_bases.manifest_request(None, code, [], {"commit": None})
    assert sent["entries"] == code and "base" not in sent
    k = client_bases.key("tower", None, str(tmp_path))
    client_bases.keep(k, "tok1", recs)
    copy = client_bases.load(k)
    assert copy["id"] == "tok1" and len(copy["records"]) == 10

    changed = [_file("a.py", b"A"), _file("b.py", b"b"), _file("c.py", b"c"),
               {"path": "l", "type": "symlink", "target": "a.py"}] + rest + [_file("d.py", b"d")]
    sent, _ = client_bases.manifest_request(copy, changed, [], None)
    assert sent["base"] == "tok1" and "entries" not in sent
    assert sent["delta"]["entries"] == {"drop": [], "set": [changed[0], changed[-1]], "count": 11}
    assert sent["delta"]["data"] == {"drop": [], "set": [], "count": 0}

    # a file removed, another made executable, a symlink pointed elsewhere
    fewer = [_file("a.py", b"a"), _file("b.py", b"b", exe=True),
             {"path": "l", "type": "symlink", "target": "b.py"}] + rest
    sent, _ = client_bases.manifest_request(copy, fewer, [], None)
    assert sent["delta"]["entries"] == {"drop": ["c.py"], "set": [fewer[1], fewer[2]], "count": 9}

    # more changed than kept: the whole manifest is smaller
    other = [_file("x%d" % i, b"%d" % i) for i in range(4)]
    sent, _ = client_bases.manifest_request(copy, other, [], None)
    assert "base" not in sent and sent["entries"] == other


def test_an_entry_with_fields_the_record_cannot_hold_gets_no_delta(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    odd = [dict(_file("a.py", b"a"), mode="0755")]
    sent, recs = client_bases.manifest_request({"id": "t", "records": set()}, odd, [], None)
    assert recs is None and "base" not in sent


def test_a_damaged_record_is_no_record(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    k = client_bases.key("tower", None, str(tmp_path))
    client_bases.keep(k, "tok1", ([], []))
    path = client_bases._path(k)
    with open(path, "wb") as f:
        f.write(b"not a record\n")
    assert client_bases.load(k) is None


# ---------------------------------------------------------------------------- the host's side

def test_apply_makes_the_manifest_or_says_it_does_not_fit():
    base = {"entries": [_file("a", b"a"), _file("b", b"b")], "data": [_file("d/x", b"x")]}
    made = bases.apply(base, {"entries": {"drop": ["a"], "set": [_file("c", b"c")], "count": 2},
                              "data": {"drop": [], "set": [], "count": 1}})
    assert [e["path"] for e in bases.entries(made, 0)] == ["b", "c"]
    assert [e["path"] for e in bases.entries(made, 1)] == ["d/x"]
    assert made["changed"] == [(0, _file("c", b"c"))]
    # a path the base lacks, a count that differs: the client's copy is not the host's
    assert bases.apply(base, {"entries": {"drop": ["zz"], "set": [], "count": 1}}) is None
    assert bases.apply(base, {"entries": {"drop": [], "set": [], "count": 3},
                              "data": {"drop": [], "set": [], "count": 1}}) is None
    for bad in ({"entries": {"drop": [1], "set": [], "count": 2}},
                {"entries": {"drop": [], "set": ["x"], "count": 2}},
                {"entries": {"drop": [], "set": [_file("c", b"c"), _file("c", b"C")], "count": 3}},
                {"entries": {"drop": "a", "set": [], "count": 2}},
                {"entries": {"drop": [], "set": [], "count": True}},
                "not a mapping"):
        with pytest.raises(bases.DeltaError):
            bases.apply(base, bad)


@pytest.mark.parametrize("base, data, put, why", [
    # a file where the base has a folder, a folder where it has a file or a symlink
    ([_file("a/b", b"1")], [], [(0, _file("a", b"2"))], "appears twice"),
    ([_file("a", b"1")], [], [(0, _file("a/b", b"2"))], "would go through"),
    ([{"path": "a", "type": "symlink", "target": "b"}], [], [(0, _file("a/c", b"2"))], "would go through"),
    # the same path as code and as data
    ([_file("x", b"1")], [_file("d/y", b"2")], [(1, _file("x", b"3"))], "appears twice"),
    # entries of their own that are bad
    ([], [], [(0, _file("../up", b"1"))], "bad path"),
    ([], [], [(0, {"path": "l", "type": "symlink", "target": "/etc/passwd"})], "absolute"),
    # a symlink fine on its own, out of the tree through another of the base's
    ([{"path": "up", "type": "symlink", "target": ".."}], [],
     [(0, {"path": "w/l", "type": "symlink", "target": "../up/.."})], "leads outside"),
])
def test_what_a_delta_changes_is_checked_as_the_whole_manifest_would_be(base, data, put, why):
    lists = []
    for i, start in enumerate((base, data)):
        by_path = {e["path"]: e for e in start}
        for j, e in put:
            if j == i:
                by_path[e["path"]] = e
        lists.append((by_path, sorted(by_path)))
    with pytest.raises(ManifestError, match=why):
        check_changes(lists, put)
    # the whole manifest is refused just the same
    with pytest.raises(ManifestError):
        check_entries([e for by_path, _ in lists for e in by_path.values()])


def test_a_fitting_delta_passes_and_counts_the_code_size():
    code = {"a": _file("a", b"12345"), "s/b": _file("s/b", b"1"), "l": {"path": "l", "type": "symlink",
                                                                          "target": "s/b"}}
    data = {"d/x": _file("d/x", b"123")}
    lists = [(code, sorted(code)), (data, sorted(data))]
    assert check_changes(lists, [(0, code["s/b"])]) == 6


# ---------------------------------------------------------------------------- submit, end to end

def test_a_second_submit_sends_what_changed_and_the_job_gets_the_whole_tree(tmp_path):
    home = str(tmp_path / "home")
    a, b, c = b"print('a')\n", b"print('b')\n", b"print('c')\n"
    _blobs(home, a, b)
    first = [_file("a.py", a), _file("b.py", b)]
    res, frames = _submit(home, {"entries": first, "git": None}, "0" * 31 + "1")
    assert res["base"] == "0" * 31 + "1" and frames == []
    base_file = os.path.join(home, "store", "bases", res["base"] + ".json")
    assert os.path.samefile(base_file, paths.Home(home).job(res["job"]["id"]).manifest)

    # b.py changed, c.py new, a.py gone: only the new blobs are asked for
    delta = {"entries": {"drop": ["a.py"], "set": [_file("b.py", c), _file("c.py", c)], "count": 2}}
    blob = b"%s %d\n%s" % (hashlib.sha256(c).hexdigest().encode(), len(c), c) + b"END\n"
    res2, frames = _submit(home, {"base": res["base"], "delta": delta, "git": None}, "0" * 31 + "2",
                           stdin=blob)
    assert frames == [{"missing": [hashlib.sha256(c).hexdigest()]}]
    assert _job_manifest(home, res2["job"]["id"])["entries"] == [_file("b.py", c), _file("c.py", c)]
    assert res2["job"]["files"] == 2 and res2["base"] == "0" * 31 + "2"


def test_a_base_gone_asks_for_the_whole_manifest_on_the_same_call(tmp_path):
    home = str(tmp_path / "home")
    a = b"x = 1\n"
    _blobs(home, a)
    whole = {"entries": [_file("a.py", a)], "data": []}
    delta = {"entries": {"drop": [], "set": [], "count": 1}}
    res, frames = _submit(home, {"base": "f" * 32, "delta": delta, "git": None}, "0" * 31 + "3",
                          stdin=json.dumps(whole).encode() + b"\n")
    assert frames == [{"need_manifest": True}]
    assert _job_manifest(home, res["job"]["id"])["entries"] == whole["entries"]
    # a client that does not answer with a manifest gets one clear error, and no job
    with pytest.raises(AgentError) as e:
        _submit(home, {"base": "f" * 32, "delta": delta, "git": None}, "0" * 31 + "4", stdin=b"junk\n")
    assert e.value.code == "bad_stream"


def test_a_delta_that_breaks_the_rules_is_refused(tmp_path):
    home = str(tmp_path / "home")
    a = b"x = 1\n"
    _blobs(home, a)
    res, _ = _submit(home, {"entries": [_file("a", a)], "git": None}, "0" * 31 + "5")
    delta = {"entries": {"drop": [], "set": [_file("a/b", a)], "count": 2}}
    with pytest.raises(AgentError) as e:
        _submit(home, {"base": res["base"], "delta": delta, "git": None}, "0" * 31 + "6")
    assert e.value.code == "bad_manifest"


def test_no_base_outlives_a_blob_it_names(tmp_path):
    home = str(tmp_path / "home")
    a, b = b"one\n", b"two\n"
    st = _blobs(home, a, b)
    res, _ = _submit(home, {"entries": [_file("a", a)], "git": None}, "0" * 31 + "7")
    d = bases.directory(st.root)
    assert os.listdir(d) == [res["base"] + ".json"]
    st.gc({hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()})  # deletes nothing
    assert os.listdir(d) == [res["base"] + ".json"]
    st.gc({hashlib.sha256(a).hexdigest()})  # deletes b: every base goes
    assert os.listdir(d) == []
    res, _ = _submit(home, {"entries": [_file("a", a)], "git": None}, "0" * 31 + "8")
    assert os.listdir(d) == [res["base"] + ".json"]
    st.forget([(hashlib.sha256(a).hexdigest(), "a", "damaged", None)])
    assert os.listdir(d) == []


def test_only_the_newest_bases_are_kept(tmp_path):
    root = str(tmp_path / "store")
    os.makedirs(root)
    src = os.path.join(root, "m.json")
    with open(src, "w") as f:
        f.write("{}")
    for i in range(bases.KEEP + 3):
        other = os.path.join(root, "m%d.json" % i)
        with open(other, "w") as f:
            f.write("{}")
        os.utime(other, (1000 + i, 1000 + i))
        assert bases.save(root, "%032x" % i, other)
    kept = sorted(os.listdir(bases.directory(root)))
    assert kept == sorted("%032x.json" % i for i in range(3, bases.KEEP + 3))
    assert not bases.save(root, "../escape", src) and bases.load(root, "../escape") is None


# ---------------------------------------------------------------------------- submit's wiring

class _Agent(StubClient):
    """The agent's side of submit, from memory: keeps each manifest as a base when `keep`,
    asks for the whole manifest once when `lost`."""

    def __init__(self):
        self.requests, self.keep, self.lost, self.answers = [], True, False, []
        self.n = 0

    def exchange(self, verb, req, respond):
        assert verb == "submit"
        self.requests.append(req)
        if self.lost:
            self.answers.append(b"".join(respond({"need_manifest": True})))
        self.n += 1
        return {"job": {"id": self.n, "state": "queued"}, "duplicate": False,
                "base": req["token"] if self.keep else None}


def test_submit_sends_a_delta_on_the_base_the_host_said_it_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / ("f%d.py" % i)).write_text("print(%d)\n" % i)
    agent = _Agent()
    s = StubSession(agent, hosts=("local",), default="local")
    run = lambda: submit.submit(s, ["true"], root=str(src), sleep=lambda t: None)  # noqa: E731

    run()
    first = agent.requests[-1]
    assert "base" not in first["manifest"] and len(first["manifest"]["entries"]) == 6

    (src / "f0.py").write_text("print('changed')\n")
    run()
    second = agent.requests[-1]["manifest"]
    assert second["base"] == first["token"] and "entries" not in second
    assert [e["path"] for e in second["delta"]["entries"]["set"]] == ["f0.py"]
    assert second["delta"]["entries"]["count"] == 6

    # a reply that keeps no base leaves the record as it was: the next delta is on the last kept
    agent.keep = False
    (src / "f1.py").write_text("print('changed too')\n")
    run()
    assert agent.requests[-1]["manifest"]["base"] == agent.requests[-2]["token"]
    agent.keep = True

    # the host lost its base: the whole manifest goes on the same call, as one JSON line
    agent.lost = True
    run()
    whole = json.loads(agent.answers[-1])
    assert agent.answers[-1].endswith(b"\n") and sorted(whole) == ["data", "entries"]
    assert [e["path"] for e in whole["entries"]] == ["f%d.py" % i for i in range(6)]
