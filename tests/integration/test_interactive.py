"""rtrain forward, shell and jupyter over the real sshd (each on both transports) and on the local
host: a job's web server fetched through the forwarded port, a shell in a job's work dir with its
variables and GPU through a real pty, and a Jupyter-style server (a stand-in that prints the URL
line JupyterLab prints: no jupyterlab is installed here) started, forwarded and reached."""
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import urllib.request

from support import ALICE, REPO

SERVE = r'''import http.server, os, socketserver, sys
port = int(sys.argv[1])
os.makedirs("api", exist_ok=True)
open("api/status", "w").write('{"started": "yes"}')
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass
with socketserver.TCPServer(("127.0.0.1", port), H) as s:
    print("[I ServerApp] Jupyter Server is running at:", flush=True)
    print("[I ServerApp] http://127.0.0.1:%d/lab?token=%s" % (port, "c0ffee"), flush=True)
    s.serve_forever()
'''


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(sshd, hosts, *args, cwd):
    return subprocess.Popen([sys.executable, "-m", "launcher", "--hosts", str(hosts)] + [str(a) for a in args],
                            cwd=str(cwd), env=sshd.env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def rt(sshd, hosts, *args, cwd):
    p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(hosts)] + [str(a) for a in args],
                       cwd=str(cwd), env=sshd.env(), capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def wait_running(sshd, hosts, job, cwd):
    deadline = time.time() + 60
    while time.time() < deadline:
        j = json.loads(rt(sshd, hosts, "status", "--json", job, cwd=cwd))
        if j["state"] == "running":
            return j
        time.sleep(0.2)
    raise AssertionError("job %s not running" % job)


def fetch(url, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5).read()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def line_of(proc, word, timeout=60):
    """The first line of proc's stdout holding `word` (read by a thread: a buffered reader and
    select() on its pipe do not mix)."""
    import queue
    import threading
    if not hasattr(proc, "lines"):
        proc.lines = queue.Queue()
        threading.Thread(target=lambda: [proc.lines.put(x) for x in iter(proc.stdout.readline, "")],
                         daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = proc.lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        proc.seen = getattr(proc, "seen", "") + line
        if word in line:
            return line
    raise AssertionError("no %r from rtrain: %s" % (word, proc.stderr.read() if proc.poll() is not None else ""))


def tower(sshd, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello through the tunnel\n")
    (src / "serve.py").write_text(SERVE)
    return src, sshd.hosts_yaml(src / "hosts.yaml", {"tower": (ALICE, sshd.port)})


def test_forward_a_jobs_port(sshd, tmp_path):
    src, hosts = tower(sshd, tmp_path)
    port, here = free_port(), free_port()
    job = rt(sshd, hosts, "submit", "-q", "--", "python3", "serve.py", port, cwd=src).strip()
    wait_running(sshd, hosts, job, src)
    fwd = start(sshd, hosts, "forward", job, port, here, cwd=src)
    try:
        assert "http://127.0.0.1:%d" % here in line_of(fwd, "forwarding")
        assert fetch("http://127.0.0.1:%d/hello.txt" % here) == b"hello through the tunnel\n"
        assert json.loads(fetch("http://127.0.0.1:%d/api/status" % here)) == {"started": "yes"}
    finally:
        fwd.send_signal(signal.SIGINT)
        assert fwd.wait(30) == 130
        rt(sshd, hosts, "cancel", job, cwd=src)
    p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(hosts), "forward", job, str(port)],
                       cwd=str(src), env=sshd.env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "is cancelled: nothing of it listens" in p.stderr


def test_jupyter_started_forwarded_and_reached(sshd, tmp_path):
    src, hosts = tower(sshd, tmp_path)
    port = free_port()
    jp = start(sshd, hosts, "jupyter", "--command", "python3 serve.py %d" % port, cwd=src)
    try:
        url = line_of(jp, "http://127.0.0.1:").split()[-1]
        assert url.endswith("/lab?token=c0ffee")
        base = url.split("/lab?")[0]
        assert json.loads(fetch(base + "/api/status")) == {"started": "yes"}
    finally:
        jp.send_signal(signal.SIGINT)
        assert jp.wait(30) == 130
    out = line_of(jp, "goes on: rtrain cancel")
    job = out.split("goes on: rtrain cancel ")[1].split()[0]
    assert json.loads(rt(sshd, hosts, "status", "--json", job, cwd=src))["state"] == "running"
    rt(sshd, hosts, "cancel", job, cwd=src)


def run_in_pty(argv, cwd, env, script, timeout=60):
    """Run argv with a pty as its terminal, type `script`, return (everything it printed, exit)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(str(cwd))
        os.execve(argv[0], argv, env)
    out = b""
    typed = False
    deadline = time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
            if not typed and out.rstrip().endswith((b"$", b"#")):  # the shell's prompt: type
                os.write(fd, script.encode())
                typed = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return out.decode("utf-8", "replace"), os.waitstatus_to_exitcode(status)


SHELL_SCRIPT = "echo WD=$(pwd); echo GPU=$CUDA_VISIBLE_DEVICES; echo VAR=$MY_VAR; exit 3\n"


def test_shell_in_a_jobs_work_dir_with_its_environment(sshd, tmp_path):
    src, hosts = tower(sshd, tmp_path)
    job = rt(sshd, hosts, "submit", "-q", "--gpus", "1", "--env", "MY_VAR=from-the-job", "--",
             "sleep", "60", cwd=src).strip()
    j = wait_running(sshd, hosts, job, src)
    out, code = run_in_pty([sys.executable, "-m", "launcher", "--hosts", str(hosts), "shell", job], src,
                           sshd.env(), SHELL_SCRIPT)
    assert code == 3, out
    assert "WD=%s" % j["work_dir"] in out and "GPU=%s" % j["gpus"][0] in out and "VAR=from-the-job" in out, out
    rt(sshd, hosts, "cancel", job, cwd=src)


def test_shell_on_the_local_host(world):
    job = world.submit("sleep", "60", gpus=1)
    deadline = time.time() + 30
    while world.status(job)["state"] != "running" and time.time() < deadline:
        time.sleep(0.1)
    j = world.status(job)
    out, code = run_in_pty([sys.executable, "-m", "launcher", "shell", job], world.cwd,
                           world.env(PYTHONPATH=str(REPO)), SHELL_SCRIPT)
    assert code == 3, out
    assert "WD=%s" % j["work_dir"] in out and "GPU=%s" % j["gpus"][0] in out, out
    world.run("cancel", job)
