"""Client-side pieces on their own: markup-safe rendering, options after the verb, the zipapp's
Python version check and its client mapping, the SSH channel's I/O timeout, the system known_hosts
files, hosts.yaml's io_timeout, and when a submit is (and is not) retried."""
import ast
import io
import json
import os
import socket
import types

import pytest

from launcher import agentclient, agentpkg, app, cli, config, render, ssh
from launcher.errors import HostError

MARKUP = ["[/]", "[red]red?[/red]", "a\\", "[bold", "x]", "back\\[/]", "[link=file:///etc]y[/link]"]


# ------------------------------------------------------------------ render: user text is not markup

def _job(**kw):
    j = {"id": "7", "name": "n", "host": "local", "state": "failed", "gpus": [], "exit_code": 3,
         "signal": None, "submitted_at": 1.0e9, "started_at": 1.0e9, "ended_at": 1.0e9 + 5,
         "command": "c", "message": None, "gpus_requested": 0, "retries": 0, "attempts": 1,
         "git_commit": None, "git_dirty": None, "log": "/l", "work_dir": "/w"}
    j.update(kw)
    return j


@pytest.mark.parametrize("text", MARKUP)
def test_render_prints_user_text_as_written(text, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    job = _job(name=text, command="echo %s" % text, message=text, host="h%s" % text)
    render.job_table([job])
    render.job_detail(job)
    render.gpu_table([
        ("g%s" % text, {"gpus": [{"index": 0, "name": "GPU %s" % text, "uuid": "GPU-%s" % text,
                                  "state": "busy", "holder": "job %s" % text, "memory_used": 1,
                                  "memory_total": 2, "utilization": 0}]}, None),
        ("e%s" % text, None, HostError("e%s" % text, "down %s" % text, "fix %s" % text))])
    render.doctor([("d%s" % text, [{"name": "python", "ok": False, "detail": "old %s" % text,
                                    "fix": "use %s" % text}])])
    out = capsys.readouterr().out
    for want in ("h" + text, "echo " + text, "failed - " + text, "GPU " + text, "GPU-" + text,
                 "job " + text, "down " + text, "fix " + text, "d" + text, "old " + text, "use " + text):
        assert want in out, (want, out)


def test_host_errors_keep_their_hint(capsys):
    render.host_errors([("h", HostError("h", "down", "try this"))])
    assert capsys.readouterr().err == "rtrain: error: h: down\n  hint: try this\n"


# ------------------------------------------------------------------ cli: options after the verb

@pytest.mark.parametrize("argv,want", [
    (["status"], (None, False, False)),
    (["--debug", "status"], (None, False, True)),
    (["status", "--debug"], (None, False, True)),
    (["--hosts", "a", "status"], ("a", False, False)),
    (["status", "--hosts", "b", "--accept-new-host-key"], ("b", True, False)),
    (["--hosts", "a", "--accept-new-host-key", "--debug", "logs", "3"], ("a", True, True)),
    (["--hosts", "a", "status", "--hosts", "b"], ("b", False, False)),
    (["submit", "--debug", "--", "x", "--hosts", "c"], (None, False, True)),
])
def test_common_options_before_or_after_the_verb(argv, want):
    args = cli.build_parser().parse_args(argv)
    assert (args.hosts, args.accept_new_host_key, args.debug) == want
    if args.verb == "submit":
        assert args.command == ["--", "x", "--hosts", "c"]  # the job's own arguments


# ------------------------------------------------------------------ the zipapp's version check

class _Exit(Exception):
    pass


def _run_main(version):
    """Exec the zipapp's __main__ source with a stand-in `sys` whose version_info is `version`.
    Returns (stdout text, exit code or None, the exception that ended it)."""
    out = io.StringIO()
    codes = []

    def exit_(code=0):
        codes.append(code)
        raise _Exit()

    fake = types.ModuleType("sys")
    fake.version_info = version
    fake.executable = "/opt/old/bin/python3"
    fake.stdout = out
    fake.exit = exit_
    fake.path = []
    import sys as real
    saved = real.modules["sys"]
    real.modules["sys"] = fake  # `import sys` in the source picks this up
    try:
        exec(compile(agentpkg._MAIN, "__main__.py", "exec"), {"__name__": "__main__",
                                                               "__file__": "/nonexistent/x.pyz/__main__.py"})
        ended = None
    except _Exit as e:
        ended = e
    except Exception as e:  # noqa: BLE001 - past the check: what fails next is not its business
        ended = e
    finally:
        real.modules["sys"] = saved
    return out.getvalue(), (codes[0] if codes else None), ended


@pytest.mark.parametrize("version", [(3, 6, 9, "final", 0), (3, 7, 17, "final", 0), (2, 7, 18, "final", 0)])
def test_zipapp_refuses_a_python_older_than_3_8_with_one_json_reply(version):
    out, code, _ = _run_main(version)
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 1, out
    reply = json.loads(lines[0])
    assert reply["protocol"] == 1 and reply["ok"] is False
    err = reply["error"]
    assert err["code"] == "python_too_old"
    assert "%d.%d" % version[:2] in err["message"] and "/opt/old/bin/python3" in err["message"]
    assert "3.8" in err["message"] and "python:" in err["hint"]


@pytest.mark.parametrize("version", [(3, 8, 0, "final", 0), (3, 13, 1, "final", 0)])
def test_zipapp_goes_on_with_python_3_8_and_later(version):
    out, code, ended = _run_main(version)
    assert out == "" and code is None
    assert isinstance(ended, ImportError)  # it went on to import the agent (not there: a test)


def test_zipapp_main_is_old_python_syntax():
    # the oldest grammar ast can check here; the check itself only uses what Python 3.0 had
    ast.parse(agentpkg._MAIN.decode(), feature_version=(3, 4))


class _Proc:
    def __init__(self, lines, write_error=None):
        self.lines = list(lines)
        self.write_error = write_error
        self.killed = False

    def write(self, data):
        if self.write_error:
            raise self.write_error

    def close_stdin(self):
        pass

    def readline(self):
        return self.lines.pop(0) if self.lines else b""

    def wait(self):
        return 1

    def stderr(self):
        return ""

    def kill(self):
        self.killed = True


class _Transport:
    name = "old"
    kind = "local"
    python = "python3"

    def __init__(self, proc):
        self.proc = proc

    def ensure_agent(self, blob, digest):
        return "/x/agent.pyz"

    def start(self, argv, env=None):
        return self.proc


TOO_OLD = (json.dumps({"protocol": 1, "ok": False, "error": {
    "code": "python_too_old", "message": "Python 3.6 at /usr/bin/python3 is too old for the rtrain "
                                         "agent, which needs 3.8 or newer", "hint": "h"}}) + "\n").encode()


@pytest.mark.parametrize("write_error", [None, BrokenPipeError(32, "Broken pipe")])
def test_client_maps_python_too_old_to_a_permanent_python_host_error(write_error):
    host = config.Host(name="old")
    c = agentclient.AgentClient(host, _Transport(_Proc([TOO_OLD], write_error)))
    with pytest.raises(HostError) as ei:
        c.call("status", {})
    e = ei.value
    assert e.check == "python" and e.permanent is True
    assert e.message == "old: Python 3.6 at /usr/bin/python3 is too old for the rtrain agent, which needs 3.8 or newer"
    assert "`python:`" in e.hint and "hosts.yaml" in e.hint


# ------------------------------------------------------------------ ssh: I/O timeout, known hosts

class _Chan:
    def __init__(self):
        self.timeout = None

    def settimeout(self, t):
        self.timeout = t

    def makefile(self, mode, bufsize=-1):
        class F:
            def readline(self):
                raise socket.timeout("timed out")
        return F()

    def sendall(self, data):
        raise socket.timeout("timed out")

    def shutdown_write(self):
        pass

    status_event = types.SimpleNamespace(wait=lambda t: False)


def test_an_exec_channel_that_hears_nothing_fails_with_no_answer():
    chan = _Chan()
    ch = ssh._Channel(chan, "tower", 60.0)
    assert chan.timeout == 60.0
    for op in (ch.readline, lambda: ch.write(b"x"), ch.wait):
        with pytest.raises(HostError) as ei:
            op()
        assert ei.value.message == "tower: no answer from the host for 60s"
        assert "io_timeout" in ei.value.hint and not ei.value.permanent


def test_io_timeout_in_hosts_yaml(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  a:\n    ssh: u@h\n    io_timeout: 2.5\n  b:\n    ssh: u@h\n")
    cfg = config.parse(str(p))
    assert cfg.hosts["a"].io_timeout == 2.5 and cfg.hosts["b"].io_timeout == 60
    assert "io_timeout" in config.HOST_KEYS
    for bad in ("0", "-1", "soon", "true"):
        p.write_text("hosts:\n  a:\n    ssh: u@h\n    io_timeout: %s\n" % bad)
        with pytest.raises(config.ConfigError, match="io_timeout"):
            config.parse(str(p))
    example = open(os.path.join(os.path.dirname(config.__file__), "..", "hosts.example.yaml")).read()
    assert "io_timeout:" in example


def test_the_local_host_takes_max_tree_mb(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  local: {kind: local, max_tree_mb: 1}\n")
    assert config.parse(str(p)).hosts["local"].max_tree_mb == 1


def test_system_known_hosts_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("RTRAIN_GLOBAL_KNOWN_HOSTS", raising=False)
    assert ssh._global_known_hosts_paths() == ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    assert ssh._global_known_hosts_paths("/a /b") == ["/a", "/b"]
    g = tmp_path / "global"
    monkeypatch.setenv("RTRAIN_GLOBAL_KNOWN_HOSTS", str(g))
    assert ssh._global_known_hosts_paths("/a") == [str(g)]
    monkeypatch.setenv("RTRAIN_GLOBAL_KNOWN_HOSTS", "")
    assert ssh._global_known_hosts_paths() == []  # set but empty: none


def test_global_known_hosts_file_from_ssh_config(tmp_path, monkeypatch):
    monkeypatch.delenv("RTRAIN_GLOBAL_KNOWN_HOSTS", raising=False)
    conf = tmp_path / "ssh_config"
    conf.write_text("Host tower\n  HostName 127.0.0.1\n  GlobalKnownHostsFile %s/g1 %s/g2\n" % (
        tmp_path, tmp_path))
    monkeypatch.setenv("RTRAIN_SSH_CONFIG", str(conf))
    r = ssh.Resolved(config.Host(name="tower", kind="ssh", ssh="tower"))
    assert r.global_known_hosts == [str(tmp_path / "g1"), str(tmp_path / "g2")]


# ------------------------------------------------------------------ app.submit: when to retry

class _Client:
    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = []

    def prestart(self, verb):
        pass

    def sched(self):
        return {}

    def exchange(self, verb, req, respond):
        self.calls.append(("exchange", req))
        raise self.errors.pop(0)

    def call(self, verb, req):
        self.calls.append(("call", req))
        e = self.errors.pop(0)
        if isinstance(e, Exception):
            raise e
        return e


class _Session:
    def __init__(self, client):
        self.cfg = config.Config(path=None, default="local", hosts={"local": config.LOCAL})
        self._client = client
        self.resets = 0

    def client(self, name):
        return self._client

    def reset(self, name):
        self.resets += 1

    def job_id(self, host, n):
        return str(n)


def _dropped(sent):
    e = HostError("local", "connection lost: EOF", "run the command again")
    e.request_sent = sent
    return e


def test_a_drop_before_the_whole_request_was_sent_is_not_retried(tmp_path):
    (tmp_path / "a.py").write_text("x\n")
    s = _Session(_Client([_dropped(False)]))
    events = []
    with pytest.raises(HostError, match="connection lost: EOF") as ei:
        app.submit(s, ["true"], root=str(tmp_path), events=lambda *a: events.append(a), sleep=lambda t: None)
    assert "run the command again" in ei.value.hint
    assert s.resets == 0 and not [e for e in events if e[0] == "retry"]


def test_a_drop_after_the_request_asks_again_with_the_same_token(tmp_path):
    (tmp_path / "a.py").write_text("x\n")
    job = {"id": 4, "state": "queued"}
    client = _Client([_dropped(True), _dropped(False), {"job": job, "duplicate": True}])
    s = _Session(client)
    events, slept = [], []
    got = app.submit(s, ["true"], root=str(tmp_path), events=lambda *a: events.append(a), sleep=slept.append)
    assert got["id"] == "4" and s.resets == 2 and slept == [1.0, 2.0]
    retries = [e[1] for e in events if e[0] == "retry"]
    assert [(r["attempt"], r["of"]) for r in retries] == [(1, 2), (2, 2)]
    tokens = {req["token"] for _, req in client.calls}
    assert len(tokens) == 1  # the same token every time
    assert all(not req.get("upload") for kind, req in client.calls if kind == "call")
