"""hosts.yaml and rtrain.yaml as parsed by an earlier command (docs/design.md "Start-up"):
importing PyYAML alone costs about 20 ms of each command, so a file is parsed once and read
back from a pickle in the cache folder while its stat, its path and rtrain's code are the
same. A file changed in the last 2 s is not kept (its mtime may not show a second change
within the same tick, as git's "racy" index entries); anything odd means parsing again."""
import hashlib
import os
import pickle
import time

from .hashcache import default_cache_path

_RACY_S = 2.0


def _code_stamp(parse):
    import sys
    mod = sys.modules.get(parse.__module__)
    try:
        return (parse.__module__, parse.__name__, os.stat(mod.__file__).st_mtime_ns)
    except (AttributeError, OSError, TypeError):
        return None


def cached(path, parse, *args):
    """parse(path, *args), or what it returned before for the same file and args."""
    from . import __version__
    try:
        st = os.stat(path)
    except OSError:
        return parse(path, *args)
    code = _code_stamp(parse)
    if code is None:
        return parse(path, *args)
    stamp = (os.path.abspath(path), st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, args,
             code, __version__)
    name = hashlib.sha256(repr(stamp[:1] + stamp[5:7]).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    keep = os.path.join(os.path.dirname(default_cache_path()), "parsed", name + ".pickle")
    try:
        with open(keep, "rb") as f:
            saved = pickle.load(f)
        if saved[0] == stamp:
            return saved[1]
    except (OSError, EOFError, IndexError, TypeError, ValueError, AttributeError, ImportError,
            pickle.UnpicklingError):
        pass
    value = parse(path, *args)
    if time.time() - st.st_mtime >= _RACY_S:
        _write(keep, (stamp, value))
    return value


def _write(path, saved):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        d = os.path.dirname(path)
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
        with open(tmp, "wb") as f:
            pickle.dump(saved, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except (OSError, pickle.PicklingError, TypeError, AttributeError):
        try:
            os.unlink(tmp)
        except OSError:
            pass
