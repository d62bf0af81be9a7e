"""`rtrain forward`, `shell`, `jupyter` and `tensorboard`: reaching into a job on its host
(docs/design.md "Interactive"). The port forwarding and the terminal are the transports'
(forward.py); these verbs find the job, start the server job where one is needed, wait for the
URL it prints, and return data; the CLI prints and waits."""
import re

from . import logs, submit
from .errors import RtrainError

# what a web server job prints when it is up: jupyter ("http://127.0.0.1:8888/lab?token=..."),
# tensorboard ("TensorBoard 2.17 at http://localhost:6006/"), python -m http.server ("Serving
# HTTP on 0.0.0.0 port 8000 (http://0.0.0.0:8000/)")
URL = re.compile(r"(https?)://(?:127\.0\.0\.1|localhost|0\.0\.0\.0|\[::1?\]|[A-Za-z0-9.-]+):(\d+)(/[^\s)\"']*)?")

JUPYTER = ["python3", "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", "--port=8888",
           "--port-retries=50"]


def forward(session, ref, port, local_port=None):
    """(job, forwarding) for a running job's port: forwarding.local_port on 127.0.0.1 here reaches
    `port` on 127.0.0.1 of the job's host until forwarding.close()."""
    host, _n, job = session.find(ref)
    if job["state"] != "running":
        raise RtrainError("job %s is %s: nothing of it listens" % (job["id"], job["state"]),
                          "forward the port of a running job (`rtrain status` lists them)")
    return job, session.client(host).transport.forward(int(port), local_port)


def shell(session, ref=None, host=None):
    """An interactive shell on the host: in job `ref`'s work dir with its environment (and its
    GPUs while it runs), or a login shell in the home directory. Returns its exit status."""
    if ref is not None:
        host, n, _job = session.find(ref)
        req = {"id": n}
    else:
        from . import hosts as hostsmod
        host = host or hostsmod.default_host(session.cfg) or sorted(session.cfg.hosts)[0]
        session.client(host).call("status", {"ids": [], "limit": 1})  # the agent is there
        req = {}
    return session.client(host).interactive("shell", req)


def serve(session, argv, host=None, gpus=0, name=None, root=".", local_port=None, events=None,
          url=URL):
    """Submit a web server job (jupyter, tensorboard...), wait for the URL it prints, forward its
    port. Returns (job, the URL here, forwarding)."""
    job = submit.submit(session, argv, host=host, gpus=gpus, name=name, root=root, events=events)
    seen = b""
    for ev in logs.logs(session, job["id"], follow=True):
        if ev[0] == "data":
            seen = (seen + ev[1])[-65536:]
            m = url.search(seen.decode("utf-8", "replace"))
            if m:
                break
        elif ev[0] == "end":
            fin = ev[1]
            raise RtrainError("job %s ended (%s%s) before its server printed a URL" % (
                job["id"], fin["state"], "" if fin.get("exit_code") is None else ", exit code %s" % fin["exit_code"]),
                "its log says why: rtrain logs %s" % job["id"])
    remote = int(m.group(2))
    fwd = session.client(job["host"]).transport.forward(remote, local_port or remote)
    here = "%s://127.0.0.1:%d%s" % (m.group(1), fwd.local_port, m.group(3) or "/")
    return job, here, fwd


def tensorboard_argv(job):
    """tensorboard on a job's work dir (its outputs are linked there): the host's path."""
    return ["python3", "-m", "tensorboard.main", "--logdir", job["work_dir"], "--host", "127.0.0.1",
            "--port", "0"]
