"""The agent as one zipapp file, named by its content hash, built from launcher/agent/."""
import hashlib
import io
import os
import zipfile

_PKG = "rtrain_agent"
# The zipapp's __main__. Python compiles what it imports from a zip on every start (it keeps no
# bytecode there): about 40 ms per agent call. So the first run unpacks the package next to the
# zip (agent-HASH.d/, atomically: temp dir + rename), where Python keeps its __pycache__, and
# every run imports from there. If that cannot be done (read-only home...), it runs from the zip.
# That folder is used only if it is ours (or root's) and nobody else can write it (else one
# `unsafe_home` reply), and it is unpacked with umask 077, its __pycache__ folders made first:
# Python would import anything planted there (docs/design.md "Stdlib agent").
# It first checks the Python version: this file must itself stay valid Python 3.0 syntax, so
# that an older python3 on a host answers with one JSON reply instead of failing somewhere odd.
_MAIN = b"""\
import sys

if sys.version_info < (3, 8):
    import json
    _v = "%d.%d" % tuple(sys.version_info[:2])
    sys.stdout.write(json.dumps({"protocol": 1, "ok": False, "error": {
        "code": "python_too_old",
        "message": "Python %s at %s is too old for the rtrain agent, which needs 3.8 or newer" % (
            _v, sys.executable or "python3"),
        "hint": "set `python:` for this host in hosts.yaml to a Python >= 3.8 there",
        "data": {"version": _v, "executable": sys.executable}}}) + "\\n")
    sys.stdout.flush()
    sys.exit(1)

import os  # noqa: E402
import stat  # noqa: E402


# True if d is there: a real folder of ours (or root's) that nobody else can write; False if
# it is not there. Anything else ends the call with one JSON error reply: Python would import
# whatever another user put in it (agentboot.py checked the path up to here).
def _checked(d):
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        import json
        sys.stdout.write(json.dumps({"protocol": 1, "ok": False, "error": {
            "code": "unsafe_home", "message": "%s (the unpacked agent) is not a folder of yours "
            "that only you can write: another user could make rtrain run their code as you" % d,
            "hint": "remove it (rm -rf %s): rtrain unpacks the agent again" % d}}) + "\\n")
        sys.stdout.flush()
        sys.exit(1)
    return True


def _unpacked(pyz):
    d = (pyz[:-4] if pyz.endswith(".pyz") else pyz) + ".d"
    if _checked(d) and _checked(os.path.join(d, "rtrain_agent")):
        return d
    old = os.umask(0o077)  # private, whatever the user's umask: files, folders, __pycache__
    try:
        import shutil
        import tempfile
        import zipfile
        tmp = tempfile.mkdtemp(prefix=".unpack-", dir=os.path.dirname(pyz))
        try:
            with zipfile.ZipFile(pyz) as z:
                for name in z.namelist():
                    if name.startswith("rtrain_agent/"):
                        z.extract(name, tmp)
                        cache = os.path.join(tmp, os.path.dirname(name), "__pycache__")
                        if not os.path.isdir(cache):
                            os.mkdir(cache, 0o700)
            os.rename(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except Exception:
        pass
    finally:
        os.umask(old)
    return d if _checked(d) and _checked(os.path.join(d, "rtrain_agent")) else None


_d = _unpacked(os.path.dirname(os.path.abspath(__file__)))
if _d:
    sys.path.insert(0, _d)
from rtrain_agent.main import main  # noqa: E402
main()
"""
_cache = {}
_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agentboot.py")


def boot_argv(python, path, verb):
    """How the client starts the agent at `path` on a host: through the fixed bootstrap
    (agentboot.py), which checks the path and the agent's full hash before it runs a byte of
    it. It travels in the command line of every call, so it is made small: its comment lines
    left out, compressed (2.4 KB instead of 6: on a slow link each call pays for its bytes),
    and one line, with no quote or newline for the host's login shell to trip on."""
    if "boot" not in _cache:
        import base64
        import zlib
        with open(_BOOT) as f:
            text = "\n".join(x for x in f.read().splitlines()
                             if x.strip() and not x.lstrip().startswith("#"))
        packed = base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")
        _cache["boot"] = "import zlib,binascii;exec(zlib.decompress(binascii.a2b_base64(%r)))" % packed
    return [python, "-S", "-I", "-c", _cache["boot"], build()[1], path, verb]


def _sources():
    """(path relative to launcher/agent, bytes) of every module of the agent, sorted."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent")
    found = []
    for d, dirs, names in os.walk(here):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(d, name), here).replace(os.sep, "/"))
    for rel in sorted(found):
        with open(os.path.join(here, rel), "rb") as f:
            yield rel, f.read()


def build():
    """(zip bytes, sha256 hex). Deterministic: same sources, same bytes, same name."""
    if "pyz" in _cache:
        return _cache["pyz"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name, data):
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
        add("__main__.py", _MAIN)
        for name, data in _sources():
            add("%s/%s" % (_PKG, name), data)
    blob = buf.getvalue()
    _cache["pyz"] = (blob, hashlib.sha256(blob).hexdigest())
    return _cache["pyz"]
