"""Tiny wheels made by the tests themselves (zip + metadata, no build tool, no network), served
to pip and uv with `--no-index --find-links DIR`."""
import base64
import hashlib
import os
import zipfile


def _digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder, name, version, source="VALUE = 1\n"):
    """Write NAME-VERSION-py3-none-any.whl into folder (a module NAME holding `source`);
    returns its path."""
    dist = "%s-%s.dist-info" % (name, version)
    files = {
        "%s/__init__.py" % name: source.encode(),
        "%s/METADATA" % dist: ("Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, version)).encode(),
        "%s/WHEEL" % dist: b"Wheel-Version: 1.0\nGenerator: rtrain-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "%s/top_level.txt" % dist: (name + "\n").encode(),
    }
    record = "".join("%s,%s,%d\n" % (p, _digest(d), len(d)) for p, d in files.items())
    record += "%s/RECORD,,\n" % dist
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "%s-%s-py3-none-any.whl" % (name, version))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr("%s/RECORD" % dist, record)
    return path
