#!/usr/bin/env python3
"""Job start overhead in a container: a job running `true` through rtrain's job wrapper
(agent/runner.py, as the daemon forks it) on the host's userland, in a docker container (a
private dockerd) and in a rootless podman container (a test user), side by side with a bare
`docker run --rm IMAGE true` / `podman run --rm IMAGE true` on the same engine, same image.
Time: from the wrapper's fork to its exit (the exit record written and made durable).
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


def series(fn, runs):
    fn(0)  # warm: first container start loads the image's layers into the page cache
    return statistics.median(fn(i + 1) for i in range(runs))


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
        host = series(lambda i: wrapper_job(tmp / ("host%d" % i), 1, denv), a.runs)
        rows.append(("host job (bash -c true)", host, None))
        dbare = series(lambda i: bare(["docker", "run", "--rm", "--pull=never", "--network=host", image,
                                       "true"], denv), a.runs)
        dinit = series(lambda i: bare(["docker", "run", "--rm", "--pull=never", "--network=host", "--init",
                                       image, "true"], denv), a.runs)
        djob = series(lambda i: wrapper_job(tmp / ("dk%d" % i), 1, denv, {
            "image": image, "engine": "docker", "pull": "never"}), a.runs)
        rows += [("docker run --rm IMAGE true", dbare, None),
                 ("docker run --rm --init IMAGE true", dinit, None),
                 ("container job, docker", djob, dbare)]
        if not a.no_podman and ct.podman_missing() is None:
            pm = ct.make_podman()
            pimage = pm.import_rootfs(rootfs, ct.BASE_IMAGE)
            penv = dict(pm.env(), PATH=PATH)
            for i in range(a.runs + 1):
                (tmp / ("pm%d" % i)).mkdir()
                os.chown(tmp / ("pm%d" % i), pm.pw.pw_uid, pm.pw.pw_gid)
            phost = series(lambda i: wrapper_job(tmp / ("pm%d" % i) / "h", 1, penv, pw=pm.pw), a.runs)
            pbare = series(lambda i: bare(["podman", "run", "--rm", "--pull=never", "--network=host",
                                           pimage, "true"], penv, pm.pw), a.runs)
            pjob = series(lambda i: wrapper_job(tmp / ("pm%d" % i) / "c", 1, penv, {
                "image": pimage, "engine": "podman", "pull": "never"}, pm.pw), a.runs)
            rows += [("host job, as the podman user", phost, None),
                     ("podman run --rm IMAGE true (rootless)", pbare, None),
                     ("container job, podman (rootless)", pjob, pbare)]
    finally:
        if pm is not None:
            pm.stop()
        dk.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("job start overhead (medians of %d runs), %s" % (a.runs, time.strftime("%Y-%m-%d")))
    for name, t, against in rows:
        extra = ""
        if against:
            extra = "   %.2fx the bare engine run, %.0fx the host job" % (t / against, t / host)
        print("  %-40s %8.1f ms%s" % (name, t * 1000, extra))


if __name__ == "__main__":
    main()
