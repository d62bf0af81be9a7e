"""The agent's bootstrap (launcher/agentboot.py) and the zipapp's check of its unpacked folder:
nothing another user wrote or could write runs, and the agent runs only with its full hash.
The bootstrap is run for real here (python3 -S -I -c), as the client starts it on a host."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from launcher import agentpkg

NOBODY = 65534


def _home(tmp_path, name="home"):
    """A home with the real agent in it, as shipping leaves it: (home, path of the agent)."""
    blob, digest = agentpkg.build()
    home = tmp_path / name
    (home / "agent").mkdir(parents=True, mode=0o700)
    os.chmod(home, 0o700)
    path = home / "agent" / ("agent-%s.pyz" % digest[:16])
    path.write_bytes(blob)
    os.chmod(path, 0o600)
    return home, path


def _call(path, verb="hello", home=None, argv=None):
    argv = argv or agentpkg.boot_argv(sys.executable, str(path), verb)
    env = dict(os.environ, RTRAIN_HOME=str(home or path.parent.parent))
    p = subprocess.run(argv, input=b'{"protocol": 1}\n', capture_output=True, env=env, timeout=60)
    lines = p.stdout.decode().splitlines()
    return p.returncode, (json.loads(lines[0]) if lines else None), p.stderr.decode()


def _refused(res, *needles):
    rc, reply, err = res
    assert rc == 1 and reply and reply["ok"] is False, (rc, reply, err)
    e = reply["error"]
    assert e["code"] == "unsafe_home" and e["hint"] and "\n" not in e["message"], e
    for n in needles:
        assert n in e["message"] + " " + e["hint"], (n, e)
    return e


def test_the_agent_runs_through_the_bootstrap_and_is_unpacked_privately(tmp_path):
    home, path = _home(tmp_path)
    old = os.umask(0o002)  # a careless umask: what the agent makes stays private anyway
    try:
        rc, reply, err = _call(path)
    finally:
        os.umask(old)
    assert rc == 0 and reply["ok"], err
    unpacked = path.with_suffix(".d")
    for d, dirs, _ in os.walk(str(unpacked)):
        assert os.stat(d).st_mode & 0o077 == 0, d
        if "rtrain_agent" in d:
            assert "__pycache__" in dirs or d.endswith("__pycache__"), d
    argv = agentpkg.boot_argv("python3", "~/.rtrain/agent/agent-x.pyz", "status")
    assert all("\n" not in a for a in argv) and argv[-2:] == ["~/.rtrain/agent/agent-x.pyz", "status"]


def test_a_missing_or_cut_agent_is_reported_missing_and_a_cut_one_removed(tmp_path):
    home, path = _home(tmp_path)
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])  # an upload cut short, under the right name
    rc, reply, err = _call(path)
    assert rc == 2 and reply is None and "can't open file" in err and "agent-" in err
    assert not path.exists()
    rc, reply, err = _call(path)
    assert rc == 2 and "can't open file" in err


def test_an_agent_with_other_bytes_never_runs(tmp_path):
    """Another program of the same size and name: the full hash stops it before it runs."""
    home, path = _home(tmp_path)
    marker = tmp_path / "ran"
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("__main__.py", "open(%r, 'w').write('x')\n" % str(marker))
    path.write_bytes(buf.getvalue())
    rc, _, err = _call(path)
    assert rc == 2 and not marker.exists()


@pytest.mark.parametrize("where", ["home", "agent_dir", "agent"])
def test_anything_on_the_way_that_others_can_write_is_refused(tmp_path, where):
    home, path = _home(tmp_path)
    target = {"home": home, "agent_dir": path.parent, "agent": path}[where]
    os.chmod(target, 0o777 if target.is_dir() else 0o666)
    _refused(_call(path), str(target), "can be written by other users", "chmod go-w")


def test_a_parent_that_others_can_write_is_refused_unless_sticky(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    home, path = _home(scratch)
    os.chmod(scratch, 0o777)
    _refused(_call(path), str(scratch), "not sticky")
    os.chmod(scratch, 0o1777)  # like /tmp or a /scratch set up for sharing: fine
    rc, reply, err = _call(path)
    assert rc == 0 and reply["ok"], err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
def test_a_home_another_user_made_is_refused_and_nothing_in_it_runs(tmp_path):
    """The co-tenant made the home first (the /scratch layout) and planted an unpacked agent
    folder: their code must not run."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o1777)
    os.chmod(scratch, 0o1777)
    home, path = _home(scratch)
    marker = tmp_path / "ran"
    planted = path.with_suffix(".d") / "rtrain_agent"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    (planted / "main.py").write_text("def main():\n    open(%r, 'w').write('x')\n" % str(marker))
    for d, _dirs, files in os.walk(str(home)):
        for n in [d] + [os.path.join(d, f) for f in files]:
            os.chown(n, NOBODY, NOBODY)
    e = _refused(_call(path), str(home), "belongs to nobody", "home:")
    assert not marker.exists(), e
    # the same planted folder in a home of ours that someone else made the .d of
    for d, _dirs, files in os.walk(str(home)):
        os.chown(d, 0, 0)
        for f in files:
            os.chown(os.path.join(d, f), 0, 0)
    os.chown(str(path.with_suffix(".d")), NOBODY, NOBODY)
    _refused(_call(path), str(path.with_suffix(".d")), "unpacked agent", "rm -rf")
    assert not marker.exists()
    shutil.rmtree(str(path.with_suffix(".d")))
    rc, reply, err = _call(path)
    assert rc == 0 and reply["ok"] and not marker.exists(), err


def test_the_bootstrap_is_old_python_syntax():
    import ast
    ast.parse(open(agentpkg._BOOT).read(), feature_version=(3, 4))
