# The agent's bootstrap (docs/design.md "Stdlib agent", "A co-tenant is not trusted").
#
# The client never runs the agent file directly: a planted agent-HASH.pyz would run as the user
# before any check inside it could. It runs THIS fixed file instead, its text passed with
# `python3 -S -I -c` (agentpkg.boot_argv: comment lines left out, compressed), with the agent's
# full sha256, its path and the verb:
#     python3 -S -I -c 'import zlib,binascii;exec(...)' SHA256 HOME/agent/agent-HASH16.pyz VERB
# Before a byte of the agent runs, it checks that no other user can have written or swapped
# anything on the way to it (every directory above the home: owned by root or the user, and not
# writable by others unless sticky; the home, its agent/ folder and the agent file: owned by the
# user or root and writable by nobody else), then reads the agent and checks its full sha256.
# An agent file that is missing, or ours but with other bytes (a cut upload), is reported as
# missing (exit 2, the line below on stderr) after removing it, and the client ships it again.
# An unsafe path gets one JSON error reply naming the path and the fix. Then it runs the
# zipapp's own __main__ (agentpkg._MAIN), which checks its unpacked folder the same way.
#
# This file is read as text by the client (never imported). It must stay valid for any
# python3 (no f-strings), standard library only, and cheap: it runs on every agent call.
import os
import stat
import sys


def _reply(code, message, hint):
    import json
    sys.stdout.write(json.dumps({"protocol": 1, "ok": False, "error": {
        "code": code, "message": message, "hint": hint}}) + "\n")
    sys.stdout.flush()
    sys.exit(1)


if sys.version_info < (3, 8):
    _reply("python_too_old", "Python %d.%d at %s is too old for the rtrain agent, which needs "
           "3.8 or newer" % (sys.version_info[0], sys.version_info[1], sys.executable or "python3"),
           "set `python:` for this host in hosts.yaml to a Python >= 3.8 there")

_UID = os.geteuid()


def _who(uid):
    import pwd  # the bootstrap imports nothing of rtrain: it runs before anything is trusted
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def _private_group(st):
    """The file's group is the user's own private group (named after the user, no one else in
    it): group write is the user's alone."""
    try:
        import grp
        g = grp.getgrgid(st.st_gid)
        me = _who(_UID)
        return g.gr_name == me and set(g.gr_mem) <= set([me])
    except (ImportError, KeyError):
        return False


def _others_write(st):
    return bool(st.st_mode & 0o002) or (bool(st.st_mode & 0o020) and not _private_group(st))


def _unsafe(path, why, hint):
    _reply("unsafe_home", "%s %s: another user could make rtrain run their code as you" % (
        path, why), hint)


def _walk(path):
    """The real path of path, every directory on the way checked (symlinks followed, each
    checked too); None if some part of it does not exist (yet)."""
    parts = [p for p in path.split("/") if p]
    cur = "/"
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == ".":
            continue
        if name == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, name)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return None
        if st.st_uid not in (0, _UID):
            _unsafe(nxt, "belongs to %s" % _who(st.st_uid),
                    "set `home:` for this host in hosts.yaml to a folder of your own (the "
                    "default ~/.rtrain is), or have %s removed" % nxt)
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(nxt)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                cur = "/"
            continue
        if parts and stat.S_ISDIR(st.st_mode) and _others_write(st) and \
                not st.st_mode & stat.S_ISVTX:
            _unsafe(nxt, "can be written by other users (and is not sticky), who could "
                    "replace what is in it", "chmod go-w %s, or set `home:` for this host "
                    "in hosts.yaml to a folder only you can write to" % nxt)
        cur = nxt
    return cur


def _strict(path, what):
    st = os.lstat(path)
    if _others_write(st):
        _unsafe(path, "(%s) can be written by other users" % what,
                "chmod go-w %s (rtrain makes its homes 0700)" % path)
    return st


def _main():
    want, pyz = sys.argv[1], sys.argv[2]
    real = _walk(pyz)
    if real is None:
        sys.stderr.write("rtrain-agent-missing: can't open file '%s': the agent is not there "
                         "yet\n" % pyz)
        sys.exit(2)
    agent_dir = os.path.dirname(real)
    _strict(os.path.dirname(agent_dir), "RTRAIN_HOME")
    _strict(agent_dir, "the agent's folder")
    st = _strict(real, "the agent")
    if not stat.S_ISREG(st.st_mode):
        _unsafe(real, "is not a file", "remove it: rtrain puts the agent there again")
    try:
        from _sha256 import sha256  # hashlib costs ~3 ms more to import
    except ImportError:
        try:
            from _sha2 import sha256
        except ImportError:
            from hashlib import sha256
    with open(real, "rb") as f:
        data = f.read()
    if sha256(data).hexdigest() != want:
        if st.st_uid != _UID:
            _unsafe(real, "is not the agent rtrain sent, and is %s's" % _who(st.st_uid),
                    "have it removed: rtrain puts the agent there again")
        os.unlink(real)  # ours, cut short or damaged: shipped again
        sys.stderr.write("rtrain-agent-missing: can't open file '%s': its content is not the "
                         "agent's\n" % pyz)
        sys.exit(2)
    import zipimport
    code = zipimport.zipimporter(real).get_code("__main__")
    sys.argv = [real] + sys.argv[3:]
    exec(code, {"__name__": "__main__", "__file__": real + "/__main__.py",
                "__builtins__": __builtins__})


_main()
