"""Container jobs end to end: the real rtrain CLI over a real sshd on 127.0.0.1 to this machine
as a "tower" whose engine is the private dockerd (as root, container_engine: docker) or rootless
podman (as the podman test user, the default engine there): `image:` and `--image`, byte-exact
logs and exit codes, variables, data/outputs/mounts inside, cancel, a GPU job (podman: a test
CDI spec, the job runs with its fake device; docker: the one clear line, before any lease),
Dockerfile builds cached by key, a lost container and a container left without its job."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fakesmi
from launcher.agent import containers as C

# What is tested here is the host's side (engines, images, binds, leases): one SSH transport,
# the default, is enough (test_ssh.py and test_openssh.py test the transports themselves).
SSH_TRANSPORTS = ("openssh",)


class Tower:
    """This machine as a tower over its own sshd, as `user`, with a private RTRAIN_HOME."""

    def __init__(self, sshd, user, home, set_env, src, extra=None):
        self.state = Path(home).parent / "smi-state.json"
        fakesmi.write_state(self.state, gpus=2)
        port, _key, self.known_hosts = sshd.start("ctr-%s" % user, set_env=dict(
            set_env, FAKE_NVIDIA_SMI_STATE=str(self.state)))
        self.sshd, self.user, self.home, self.src = sshd, user, str(home), Path(src)
        self.hosts = self.src.parent / ("hosts-%s.yaml" % user)
        sshd.hosts_yaml(self.hosts, {"tower": (user, port, dict({"home": self.home}, **(extra or {})))})
        self.src.mkdir(parents=True, exist_ok=True)

    def rt(self, *args, check=True, timeout=120, text=True):
        p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(self.hosts)] + [str(a) for a in args],
                           cwd=str(self.src), env=self.sshd.env(known_hosts=self.known_hosts),
                           capture_output=True, text=text, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
        return p

    def submit(self, *args):
        return self.rt("submit", "-q", *args).stdout.strip()

    def status(self, job):
        return json.loads(self.rt("status", "--json", job).stdout)

    def wait(self, job, until=("succeeded", "failed", "cancelled", "lost"), timeout=120):
        deadline = time.time() + timeout
        while True:
            j = self.status(job)
            if j["state"] in until or time.time() > deadline:
                return j
            time.sleep(0.2)

    def log(self, job):
        return Path(self.home, "jobs", job, "log").read_text(errors="replace")

    def builds(self, kind="image"):
        d = Path(self.home, "builds", kind)
        return sorted(p.name[:-len(".ready")] for p in d.glob("*.ready")) if d.is_dir() else []

    def project(self, text):
        (self.src / "rtrain.yaml").write_text(text)


@pytest.fixture(scope="module")
def docker_tower(sshd, dockerd, base_image):
    root = Path(tempfile.mkdtemp(prefix="rtrain-ctd-"))
    t = Tower(sshd, "root", root / "home", {"DOCKER_HOST": dockerd.url}, root / "src",
              {"container_engine": "docker"})
    t.image, t.dockerd, t.root = base_image, dockerd, root
    yield t
    _stop_home(t.home)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def podman_tower(sshd, podman):
    root = Path(podman.root) / "tower"
    root.mkdir()
    os.chown(root, podman.pw.pw_uid, podman.pw.pw_gid)
    (Path(sshd.root) / "authkeys" / podman.user).write_text(sshd.user_key.with_suffix(".pub").read_text())
    env = {k: v for k, v in podman.env().items() if k.startswith("XDG_")}
    t = Tower(sshd, podman.user, root / "home", env, Path(tempfile.mkdtemp(prefix="rtrain-ctp-")) / "src")
    os.chown(t.state, podman.pw.pw_uid, podman.pw.pw_gid)
    t.image, t.podman = podman.image, podman
    yield t
    _stop_home(t.home)
    shutil.rmtree(t.src.parent, ignore_errors=True)


def _stop_home(home):
    from support import stop_agent
    stop_agent(Path(home))


def _docker(t, *args):
    return t.dockerd.cli(*args, check=False)


def _containers_of(t):
    """Names of the containers (any state) the engine has for the tower's home."""
    out = _docker(t, "ps", "-a", "--filter", "label=rtrain.home=%s" % t.home, "--format", "{{.Names}}").stdout
    return out.split()


# ------------------------------------------------------------------ docker, as root

def test_cpu_job_in_a_container_exit_code_byte_exact_log_and_variables(docker_tower):
    t = docker_tower
    t.project("image: %s\ncontainer: {pull: never}\nenv:\n  PATH: /opt/tools/bin:$PATH\n"
              "  GREETING: costs $$5 in ${RTRAIN_JOB_ID}\n" % t.image)
    (t.src / "train.py").write_text(
        "import os, sys\n"
        "out = sys.stdout.buffer\n"
        "out.write(b'progress 10%\\rprogress 99%\\r\\nraw \\xff\\xfe\\x00 end\\n')\n"
        "out.write(('%s|%s|%s|%s|%s\\n' % (os.getcwd(), os.environ['PATH'], os.environ['GREETING'],\n"
        "           os.environ['TOKEN'], os.getuid())).encode())\n"
        "out.flush()\n"
        "sys.exit(3)\n")
    job = t.submit("--env", "TOKEN=s3cret x", "--", "python3", "train.py")
    p = t.rt("logs", job, "-f", check=False, text=False)
    assert p.returncode == 3, p.stderr
    work = os.path.join(t.home, "jobs", job, "work")
    head = b"progress 10%\rprogress 99%\r\nraw \xff\xfe\x00 end\n"
    assert p.stdout.startswith(head), p.stdout
    cwd, path, greeting, token, uid = p.stdout[len(head):].decode().rstrip("\n").split("|")
    assert (cwd, greeting, token, uid) == (work, "costs $5 in %s" % job, "s3cret x", "0")
    # $PATH expanded against the container's PATH (the image's), not the host's
    assert path.startswith("/opt/tools/bin:/") and "/usr/bin" in path and str(t.sshd.bin_dir) not in path
    assert p.stdout == Path(t.home, "jobs", job, "log").read_bytes()  # the log is the job's output, alone
    j = t.status(job)
    assert (j["state"], j["exit_code"]) == ("failed", 3)
    assert _containers_of(t) == []  # --rm: nothing left


def test_image_on_the_command_line_wins_and_the_host_environment_is_not_used(docker_tower):
    t = docker_tower
    t.project("setup: pip install nothing-at-all\n")
    p = t.rt("submit", "--image", t.image, "--", "sh", "-c", "echo in $(cat /etc/debian_version | cut -c1-2)")
    assert "setup in %s is not used" % (t.src / "rtrain.yaml") in p.stderr, p.stderr
    job = re.search(r"^job (\d+) queued", p.stdout, re.M).group(1)
    assert t.wait(job)["state"] == "succeeded", t.log(job)
    assert t.log(job) == "in 12\n"
    assert not Path(t.home, "builds", "env").exists()  # no venv was built for it


def test_data_outputs_and_mounts_inside_the_container(docker_tower):
    t = docker_tower
    ext = t.root / "ext"
    ext.mkdir()
    (ext / "ext.txt").write_text("from the host\n")
    (t.src / "data").mkdir()
    (t.src / "data" / "x.txt").write_text("hello data\n")
    t.project("image: %s\ncontainer: {pull: never}\ndata: [data]\noutputs: [out]\nmounts:\n  ext: %s\n" % (
        t.image, ext))
    cmd = ("cat data/x.txt ext/ext.txt; echo run $RTRAIN_JOB_ID >> out/runs.txt; cat out/runs.txt; "
           "(echo x > data/x.txt) 2>/dev/null && echo data writable || echo data read-only; "
           "echo made > ext/made.txt")
    first = t.submit("--", cmd)
    assert t.wait(first)["state"] == "succeeded", t.log(first)
    second = t.submit("--", cmd)
    assert t.wait(second)["state"] == "succeeded", t.log(second)
    assert t.log(second) == "hello data\nfrom the host\nrun %s\nrun %s\ndata read-only\n" % (first, second)
    assert (ext / "made.txt").read_text() == "made\n"
    t.rt("pull", second, "out")
    assert (t.src / "rtrain-out" / second / "out" / "runs.txt").read_text() == "run %s\nrun %s\n" % (first, second)


def test_cancel_stops_the_container_at_once(docker_tower):
    t = docker_tower
    t.project("image: %s\ncontainer: {pull: never}\n" % t.image)
    job = t.submit("--", "trap 'echo got TERM; sleep 0.5; exit 0' TERM; echo started; "
                         "while :; do sleep 0.1; done")
    deadline = time.time() + 60
    while "started" not in t.log(job) and time.time() < deadline:
        time.sleep(0.05)
    assert len(_containers_of(t)) == 1
    t0 = time.time()
    t.rt("cancel", job)
    while _containers_of(t) and time.time() - t0 < 20:
        time.sleep(0.05)
    took = time.time() - t0
    # the grace period is 10 s; the job ends 0.5 s after its SIGTERM, and the container with it
    assert _containers_of(t) == [] and took < 0.5 + 1 + 1, took
    j = t.wait(job)
    assert j["state"] == "cancelled" and "got TERM" in t.log(job)


def test_docker_gpu_job_fails_at_once_with_one_line_before_any_lease(docker_tower):
    t = docker_tower
    t.project("image: %s\ncontainer: {pull: never}\n" % t.image)
    job = t.submit("--gpus", "1", "--", "echo should not run")
    j = t.wait(job, timeout=30)
    assert j["state"] == "failed" and j["started_at"] is None and j["gpus"] == [], j
    assert j["message"] == "docker on this host cannot give GPUs to containers: the NVIDIA " \
                           "Container Toolkit is not installed"
    lines = t.log(job).splitlines()
    assert lines[0] == "rtrain: error: " + j["message"]
    assert lines[1].startswith("  hint: install nvidia-container-toolkit") and len(lines) == 2
    hosts = t.rt("hosts", check=False).stdout
    assert "containers" in hosts and "docker" in hosts and "NVIDIA Container Toolkit" in hosts, hosts


def test_dockerfile_builds_once_per_key(docker_tower):
    t = docker_tower
    src = t.src
    (src / "requirements.txt").write_text("v1\n")
    (src / "train.py").write_text("print(open('/opt/built.txt').read().strip())\n")
    (src / "Dockerfile").write_text("FROM %s\nCOPY requirements.txt /opt/req.txt\n"
                                    "RUN echo \"built $(cat /opt/req.txt)\" > /opt/built.txt\n" % t.image)
    t.project("project: Demo_Proj\nbuild: Dockerfile\n")
    before = set(t.builds())
    with ThreadPoolExecutor(2) as ex:
        jobs = list(ex.map(lambda _: t.submit("--", "python3", "train.py"), range(2)))
    for j in jobs:
        assert t.wait(j)["state"] == "succeeded", t.log(j)
        assert t.log(j).endswith("built v1\n")
    new = set(t.builds()) - before
    assert len(new) == 1, new  # one build for both
    key = new.pop()
    assert t.log(jobs[0]).startswith("rtrain: building image rtrain/demo-proj:%s with docker" % key)
    tags = _docker(t, "images", "rtrain/demo-proj", "--format", "{{.Tag}}").stdout.split()
    assert tags == [key]
    # a file the Dockerfile does not copy changed: the same image
    (src / "train.py").write_text("print('again', open('/opt/built.txt').read().strip())\n")
    j = t.submit("--", "python3", "train.py")
    assert t.wait(j)["state"] == "succeeded"
    assert t.log(j) == "rtrain: image rtrain/demo-proj:%s is built already (its key hashes the Dockerfile " \
                       "and 1 file(s) its COPY/ADD lines name): using it\nagain built v1\n" % key
    # a copied file changed: a new image
    (src / "requirements.txt").write_text("v2\n")
    j = t.submit("--", "python3", "train.py")
    assert t.wait(j)["state"] == "succeeded", t.log(j)
    assert t.log(j).endswith("again built v2\n") and len(set(t.builds()) - before) == 2
    # a broken Dockerfile: the job fails with its last lines, nothing is kept
    (src / "Dockerfile").write_text("FROM %s\nRUN echo broken-step; exit 3\n" % t.image)
    j = t.submit("--", "python3", "train.py")
    s = t.wait(j)
    assert s["state"] == "failed" and s["started_at"] is None
    assert s["message"].startswith("cannot build its image (docker build of Dockerfile): docker build "
                                   "failed (exit code "), s["message"]
    assert "returned a non-zero code: 3" in s["message"], s["message"]
    assert "broken-step" in t.log(j) and len(set(t.builds()) - before) == 2
    failed = list(Path(t.home, "builds", "image").glob("*.failed"))
    assert len(failed) == 1 and not failed[0].with_suffix("").exists()
    assert len(_docker(t, "images", "rtrain/demo-proj", "--format", "{{.Tag}}").stdout.split()) == 2


def test_a_lost_container_job_is_retried_and_a_container_without_its_job_is_stopped(docker_tower):
    t = docker_tower
    t.project("image: %s\ncontainer: {pull: never}\noutputs: [state]\n" % t.image)
    job = t.submit("--retries", "1", "--", "if [ -e state/first ]; then echo second run; else "
                                           "touch state/first; echo first run; exec sleep 300; fi")
    deadline = time.time() + 60
    while "first run" not in t.log(job) and time.time() < deadline:
        time.sleep(0.05)
    pids = json.loads(Path(t.home, "jobs", job, "pid.json").read_text())
    os.kill(pids["wrapper_pid"], signal.SIGKILL)  # the wrapper dies; its container would run on
    j = t.wait(job, until=("succeeded", "failed", "lost"), timeout=60)
    log = t.log(job)
    assert j["state"] == "succeeded" and "first run\n" in log and log.endswith("second run\n"), (j, log)
    assert "job lost" in log and "retrying (attempt 2 of 2)" in log
    daemon_log = Path(t.home, "daemon.log").read_text()
    assert "job %s lost its wrapper: stopped its container" % job in daemon_log
    assert _containers_of(t) == []

    # a container of this home whose job is not running (as after a reboot): stopped by the
    # next daemon, and said in its log
    name = C.container_name("root", t.home, 999)
    _docker(t, "run", "-d", "--pull=never", "--network=none", "--name", name, "--label",
            "rtrain.home=%s" % t.home, "--label", "rtrain.job=999", t.image, "sleep", "300")
    assert _containers_of(t) == [name]
    Path(t.home, "containers.swept").unlink(missing_ok=True)  # as a new boot would find it
    from support import daemon_pid
    os.kill(daemon_pid(t.home), signal.SIGKILL)
    j = t.submit("--", "true")  # starts a daemon
    assert t.wait(j)["state"] == "succeeded"
    deadline = time.time() + 30
    while _containers_of(t) and time.time() < deadline:
        time.sleep(0.1)
    assert _containers_of(t) == []
    assert "stopped container %s (docker): its job 999 is not in the job table" % name in \
        Path(t.home, "daemon.log").read_text()


# ------------------------------------------------------------------ rootless podman, as a user

def test_podman_job_runs_as_the_user_with_its_files_and_exit_code(podman_tower):
    t = podman_tower
    t.project("image: %s\ncontainer: {pull: never}\noutputs: [out]\n" % t.image)
    job = t.submit("--", "id -u; echo w > out/model.pt; echo w > local.txt; exit 4")
    p = t.rt("logs", job, "-f", check=False)
    uid = t.podman.pw.pw_uid
    assert p.returncode == 4 and p.stdout == "%d\n" % uid, (p.stdout, p.stderr)
    outs = Path(t.home, "projects", "src", "outputs", "out", "model.pt")
    for f in (outs, Path(t.home, "jobs", job, "work", "local.txt")):
        st = f.stat()
        assert (st.st_uid, st.st_gid) == (uid, t.podman.pw.pw_gid), f
    hosts = t.rt("hosts").stdout
    assert "podman" in hosts and "rootless (used)" in hosts, hosts


def test_podman_gpu_job_runs_with_the_device_of_its_leased_gpu(podman_tower, cdi_gpus):
    t = podman_tower
    uuids, nodes = cdi_gpus
    fakesmi.write_state(t.state, gpus=[{"index": i, "uuid": u} for i, u in enumerate(uuids)])
    os.chown(t.state, t.podman.pw.pw_uid, t.podman.pw.pw_gid)
    t.project("image: %s\ncontainer: {pull: never}\n" % t.image)
    job = t.submit("--gpus", "1", "--", "ls /dev | grep rtrain-test-gpu; echo $CUDA_VISIBLE_DEVICES; "
                                       "env | grep RTRAIN_TEST_GPU_")
    j = t.wait(job)
    assert j["state"] == "succeeded", t.log(job)
    (uuid,) = j["gpus"]
    i = uuids.index(uuid)
    assert t.log(job) == "%s\n%s\nRTRAIN_TEST_GPU_%d=%s\n" % (nodes[i][len("/dev/"):], uuid, i, uuid)



def test_podman_builds_the_image_without_network(podman_tower):
    t = podman_tower
    (t.src / "Dockerfile").write_text("FROM %s\nCOPY hello.txt /opt/hello.txt\n" % t.image)
    (t.src / "hello.txt").write_text("hello from the image\n")
    t.project("build: Dockerfile\n")
    job = t.submit("--", "cat /opt/hello.txt")
    j = t.wait(job)
    log = t.log(job)
    assert j["state"] == "succeeded", log
    (key,) = t.builds()
    assert log.startswith("rtrain: building image rtrain/src:%s with podman from Dockerfile (network: none)\n"
                          % key) and log.endswith("hello from the image\n"), log
