"""systemd-logind and the user manager: where jobs live so that logging out does not end them.

logind with KillUserProcesses=yes ends every process of a session when it closes, and every
ssh command of rtrain is a session: a daemon started in one would die with it. Two answers:
  - `rtrain hosts` says so (state(), in `hello`), with the fix: `loginctl enable-linger USER`
    keeps the user's manager (user@UID.service) running without any session;
  - the daemon moves itself into a scope of that user manager where one runs
    (scope_argv: `systemd-run --user --scope -p Delegate=yes`), out of the session: it and its
    jobs then live as long as the manager does, and the scope's cgroup is delegated to the
    user, so every job gets a cgroup of its own (jobprocs.py).
Standard library only. Where there is no systemd (containers, other inits) nothing changes.
"""
import os
import shutil
import subprocess

IN_SCOPE_VAR = "RTRAIN_DAEMON_SCOPE"  # set in the daemon started through systemd-run


def _props(argv):
    """{key: value} of `loginctl show...` output, or None if it can't be had."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    out = {}
    for line in p.stdout.decode("utf-8", "replace").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def _yes(v):
    return None if v is None else v.lower() in ("yes", "true", "1")


def state(user):
    """{"linger", "kill_user_processes"}: True/False, or None where loginctl can't tell (no
    systemd). kill_user_processes is whether logind ends this user's processes at logout."""
    exe = shutil.which("loginctl")
    if exe is None:
        return {"linger": None, "kill_user_processes": None}
    manager = _props([exe, "show", "--property=KillUserProcesses", "--property=KillOnlyUsers",
                      "--property=KillExcludeUsers"]) or {}
    kill = _yes(manager.get("KillUserProcesses"))
    if kill:
        only = manager.get("KillOnlyUsers", "").split()
        if user in manager.get("KillExcludeUsers", "").split() or (only and user not in only):
            kill = False
    linger = _yes((_props([exe, "show-user", user, "--property=Linger"]) or {}).get("Linger"))
    return {"linger": linger, "kill_user_processes": kill}


def scope_argv(argv, name):
    """argv run in a new scope of this user's systemd manager (a unit named `name`, its cgroup
    delegated), or None where no user manager of ours answers (its private socket)."""
    if os.environ.get(IN_SCOPE_VAR) or os.environ.get("RTRAIN_NO_SCOPE"):
        return None
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    exe = shutil.which("systemd-run")
    if not runtime or exe is None:
        return None
    try:
        if os.stat(os.path.join(runtime, "systemd", "private")).st_uid != os.getuid():
            return None
    except OSError:
        return None
    return [exe, "--user", "--scope", "--quiet", "--collect", "--property=Delegate=yes",
            "--unit=%s" % name, "--"] + list(argv)
