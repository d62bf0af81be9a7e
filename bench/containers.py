#!/usr/bin/env python3
"""Job start overhead in a container: a job running `true` through rtrain's job wrapper
(agent/runner.py, as the daemon forks it) on the host's userland, in a docker container (a
private dockerd) and in a rootless podman container (a test user), side by side with a bare
`docker run --rm IMAGE true` / `podman run --rm IMAGE true` on the same engine, same image.
Time: from the wrapper's fork to its exit (the exit record written and made durable). Then the
whole path on this machine (host `local`, docker): `rtrain submit -f` of `true` with --image
against without, client start to exit code (the daemon already running).
Needs root, docker.io, podman, uidmap and mmdebstrap (bash tests/setup.sh); the Debian base
image is made once and cached (tests/containers.py).
Usage: sudo python3 bench/containers.py [--runs 10] [--no-podman]"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import containers as ct  # noqa: E402  (tests/containers.py: dockerd, base image, podman)
from launcher.agent import paths, runner  # noqa: E402

PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def _become(pw):
    def f():
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    return f


def wrapper_job(root, job_id, env, container=None, pw=None):
    """Seconds from fork to the end of rtrain's wrapper running `true` (in `container`)."""
    home = paths.Home(str(root / "home"))
    spec = {"id": job_id, "command": "true", "env": {}, "grace": 2, "gpus": [], "lock_dir": None}
    if container:
        spec["container"] = container
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            if pw is not None:
                _become(pw)()
            os.environ.clear()
            os.environ.update(env)
            os.chdir("/")
            home.ensure()
            os.makedirs(home.job(job_id).work, exist_ok=True)
            runner.run_wrapper(home, spec, [], lambda: None)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    took = time.perf_counter() - t
    ex = runner.read_exit(home, job_id)
    if status != 0 or not ex or ex.get("exit_code") != 0:
        log = Path(home.job(job_id).log).read_text() if os.path.exists(home.job(job_id).log) else ""
        raise SystemExit("job %d failed: %s %s" % (job_id, ex, log))
    return took


def bare(argv, env, pw=None):
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, cwd="/",
                   preexec_fn=_become(pw) if pw else None)
    return time.perf_counter() - t


def end_to_end(root, env, image=None):
    """Seconds of `rtrain submit -f -q [--image IMAGE] -- true` on this machine (host local)."""
    argv = [sys.executable, "-m", "launcher", "--hosts", str(root / "hosts.yaml"), "submit", "-f", "-q"]
    argv += ["--image", image] if image else []
    t = time.perf_counter()
    p = subprocess.run(argv + ["--", "true"], cwd=str(root / "src"), env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    took = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit("rtrain submit failed: %s" % p.stderr.decode())
    return took


def interleaved(fns, runs):
    """{name: median seconds} of fns {name: fn(i)}, run round-robin (the machine's load drifts;
    each name sees the same drift). One warm-up run each: the first container start loads the
    image's layers into the page cache."""
    times = {name: [] for name in fns}
    for i in range(runs + 1):
        for name, fn in fns.items():
            t = fn(i)
            if i:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rtrain_argv(root, image, engine, env, pw=None):
    """The `ENGINE run ...` argv rtrain's wrapper would run for a job `true` (jobcontainer.py)."""
    from launcher.agent import jobcontainer
    home = paths.Home(str(root / "home"))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # as the engine's user: the job's folder and variables file are theirs
        try:
            os.close(r)
            if pw is not None:
                _become(pw)()
            home.ensure()
            os.makedirs(home.job(1).work, exist_ok=True)
            job = {"id": 1, "command": "true", "env": {}, "grace": 2, "gpus": [],
                   "container": {"image": image, "engine": engine, "pull": "never"}}
            argv, _env, _c = jobcontainer.command(home, job, runner.fixed_vars(1, []), base_env=env)
            os.write(w, "\0".join(argv).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data.decode().split("\0")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--no-podman", action="store_true")
    a = ap.parse_args()
    for why in (ct.dockerd_missing(), ct.mmdebstrap_missing()):
        if why:
            raise SystemExit("cannot run: " + why)
    tmp = Path(tempfile.mkdtemp(prefix="rtrain-ctrbench-"))
    os.chmod(tmp, 0o755)
    dk = ct.Dockerd(tempfile.mkdtemp(prefix="rtrain-dk-", dir="/tmp")).start()
    pm = None
    rows = []
    try:
        rootfs = ct.base_rootfs()
        image = dk.import_rootfs(rootfs, ct.BASE_IMAGE)
        denv = dict(os.environ, PATH=PATH, DOCKER_HOST=dk.url)
        dargv = rtrain_argv(tmp / "dkargv", image, "docker", denv)
        e2e = tmp / "e2e"
        (e2e / "src").mkdir(parents=True)
        (e2e / "hosts.yaml").write_text("hosts:\n  local:\n    container_engine: docker\n")
        eenv = dict(denv, RTRAIN_HOME=str(e2e / "home"), PYTHONPATH=str(REPO))
        m = interleaved({
            "host": lambda i: wrapper_job(tmp / ("host%d" % i), 1, denv),
            "bare": lambda i: bare(["docker", "run", "--rm", "--pull=never", "--network=host", image,
                                    "true"], denv),
            "argv": lambda i: bare(dargv, denv),
            "job": lambda i: wrapper_job(tmp / ("dk%d" % i), 1, denv, {
                "image": image, "engine": "docker", "pull": "never"}),
            "e2e host": lambda i: end_to_end(e2e, eenv),
            "e2e ctr": lambda i: end_to_end(e2e, eenv, image)}, a.runs)
        host = m["host"]
        rows += [("host job (bash -c true)", host, None),
                 ("docker run --rm IMAGE true", m["bare"], None),
                 ("docker run, rtrain's argv (binds, init)", m["argv"], m["bare"]),
                 ("container job, docker", m["job"], m["bare"]),
                 ("rtrain submit -f true, host job", m["e2e host"], None),
                 ("rtrain submit -f --image IMAGE true", m["e2e ctr"], None)]
        e2e_rows = (m["e2e host"], m["e2e ctr"], m["bare"])
        if not a.no_podman and ct.podman_missing() is None:
            pm = ct.make_podman()
            pimage = pm.import_rootfs(rootfs, ct.BASE_IMAGE)
            penv = dict(pm.env(), PATH=PATH)
            for i in range(a.runs + 2):
                (tmp / ("pm%d" % i)).mkdir()
                os.chown(tmp / ("pm%d" % i), pm.pw.pw_uid, pm.pw.pw_gid)
            pargv = rtrain_argv(tmp / ("pm%d" % (a.runs + 1)), pimage, "podman", penv, pm.pw)
            p = interleaved({
                "host": lambda i: wrapper_job(tmp / ("pm%d" % i) / "h", 1, penv, pw=pm.pw),
                "bare": lambda i: bare(["podman", "run", "--rm", "--pull=never", "--network=host",
                                        pimage, "true"], penv, pm.pw),
                "argv": lambda i: bare(pargv, penv, pm.pw),
                "job": lambda i: wrapper_job(tmp / ("pm%d" % i) / "c", 1, penv, {
                    "image": pimage, "engine": "podman", "pull": "never"}, pm.pw)}, a.runs)
            rows += [("host job, as the podman user", p["host"], None),
                     ("podman run --rm IMAGE true (rootless)", p["bare"], None),
                     ("podman run, rtrain's argv", p["argv"], p["bare"]),
                     ("container job, podman (rootless)", p["job"], p["bare"])]
    finally:
        if pm is not None:
            pm.stop()
        _stop_daemon(tmp / "e2e" / "home")
        dk.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("job start overhead (medians of %d interleaved runs), %s" % (a.runs, time.strftime("%Y-%m-%d")))
    for name, t, against in rows:
        extra = "   %.2fx the bare engine run" % (t / against) if against else ""
        print("  %-40s %8.1f ms%s" % (name, t * 1000, extra))
    ehost, ectr, dbare = e2e_rows
    print("  end to end, the container's cost: %+.0f ms over the host job (a bare docker run: %.0f ms)" % (
        (ectr - ehost) * 1000, dbare * 1000))


def _stop_daemon(home):
    """The e2e daemon and its jobs (tests/support.py stop_agent)."""
    from support import stop_agent
    if home.exists():
        stop_agent(home)


if __name__ == "__main__":
    main()
