"""The agent as one zipapp file, named by its content hash, built from launcher/agent/."""
import hashlib
import io
import os
import zipfile

_PKG = "rtrain_agent"
_MAIN = b"from rtrain_agent.main import main\nmain()\n"
_cache = {}


def _sources():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent")
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                yield name, f.read()


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
