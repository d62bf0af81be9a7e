"""agentpkg.py: the zipapp's own Python version check (an old python3 on the host gets one
JSON reply, not a traceback), and agentclient.py mapping that reply to a clear, permanent error."""
import ast
import io
import json
import types

import pytest

from launcher import agentclient, agentpkg, config
from launcher.errors import HostError


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
