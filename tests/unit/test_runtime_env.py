"""Job variables on the host: $VAR, ${VAR} and $$ (runtime.py), the same in Python and in the
login shell's assignments file, whatever the value holds."""
import subprocess

import pytest

from launcher.agent import runtime


@pytest.mark.parametrize("value,want", [
    ("/opt/x/bin:$PATH", "/opt/x/bin:/usr/bin"),
    ("${HOME}/data", "/home/u/data"),
    ("a$$b", "a$b"),
    ("cost: 5$", "cost: 5$"),
    ("$1 and $-", "$1 and $-"),
    ("$UNSET-x", "-x"),
    ("$HOMEx", ""),
    ("${HOME}x", "/home/ux"),
    ("$$HOME", "$HOME"),
])
def test_expand(value, want):
    assert runtime.expand(value, {"PATH": "/usr/bin", "HOME": "/home/u"}) == want


def test_each_value_expands_against_the_ones_before():
    env = runtime.environment({"PATH": "/usr/bin", "PYTHONHOME": "/x"},
                              [("PATH", "/a:$PATH"), ("PATH", "/b:$PATH"), ("P", "$PATH")])
    assert env["PATH"] == "/b:/a:/usr/bin" and env["P"] == env["PATH"] and "PYTHONHOME" not in env


@pytest.mark.parametrize("value", [
    "plain", "it's \"quoted\"", "`id` $(id) ;rm -rf x", "new\nline", "$PATH:/x", "a$$b$", "${HOME}'$'",
    "", "\\back\\slash",
])
def test_shell_assignment_means_the_same_as_expand(tmp_path, value):
    f = tmp_path / "env.sh"
    runtime.write_env_file(str(f), [("X", value)])
    out = subprocess.run(["/bin/sh", "-c", '. "$0"; printf %s "$X"', str(f)], capture_output=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": "/home/u"}, check=True).stdout.decode()
    assert out == runtime.expand(value, {"PATH": "/usr/bin:/bin", "HOME": "/home/u"})
    assert oct(f.stat().st_mode & 0o777) == "0o600"


def test_activation_and_argv():
    rt = {"activate": {"kind": "venv", "path": "/h/builds/env/k"}, "python_bin": None, "shell": None}
    env = runtime.environment({"PATH": "/usr/bin"}, runtime.variables(rt, {"A": "1"}, [("RTRAIN_JOB_ID", "7")]))
    assert env["PATH"] == "/h/builds/env/k/bin:/usr/bin" and env["VIRTUAL_ENV"] == "/h/builds/env/k"
    assert env["RTRAIN_JOB_ID"] == "7" and env["A"] == "1"
    assert runtime.argv(rt, "echo hi") == [runtime.SHELL, "-c", "echo hi"]
    login = runtime.argv({"shell": "login"}, "echo hi", "/j/login-env.sh")
    assert login[1:3] == ["-l", "-c"] and login[3] == ". /j/login-env.sh\necho hi"
