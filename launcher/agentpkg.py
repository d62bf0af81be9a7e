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


def _unpacked(pyz):
    d = (pyz[:-4] if pyz.endswith(".pyz") else pyz) + ".d"
    if os.path.isdir(os.path.join(d, "rtrain_agent")):
        return d
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
            os.rename(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except Exception:
        pass
    return d if os.path.isdir(os.path.join(d, "rtrain_agent")) else None


_d = _unpacked(os.path.dirname(os.path.abspath(__file__)))
if _d:
    sys.path.insert(0, _d)
from rtrain_agent.main import main  # noqa: E402
main()
"""
_cache = {}


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
