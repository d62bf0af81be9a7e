"""A desktop notification on the laptop when a followed job ends (`--notify`): notify-send on
Linux, osascript on macOS; nothing (and no error) where neither is there."""
import shutil
import subprocess
import sys


def notify(fin):
    title = "rtrain: job %s %s" % (fin.get("id"), fin.get("state"))
    code = fin.get("exit_code")
    body = "on %s%s" % (fin.get("host"), "" if code is None else ", exit code %s" % code)
    if sys.platform == "darwin" and shutil.which("osascript"):
        argv = ["osascript", "-e", "display notification %s with title %s" % (_applescript(body), _applescript(title))]
    elif shutil.which("notify-send"):
        argv = ["notify-send", "--app-name=rtrain", title, body]
    else:
        return False
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return True


def _applescript(text):
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')
