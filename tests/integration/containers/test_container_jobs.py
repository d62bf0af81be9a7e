"""Container jobs with the real engines: the job wrapper (agent/runner.py) runs a job whose spec
names an image through `docker run` (a private dockerd) or rootless `podman run` (a test user),
as the daemon would: exit code, log, the user's uid on files it writes, GPUs (a test CDI spec for
podman, the clear error for docker), and a cancel that stops the container in time."""
import fcntl
import grp
import json
import os
import pickle
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import containers as ct
from launcher.agent import containerhost as H
from launcher.agent import containers as C
from launcher.agent import paths, runner
from support import need


PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


class Engine:
    """How to run a job wrapper against one engine, as root (docker) or as a user (podman)."""

    def __init__(self, name, image, env, pw=None, groups=()):
        self.name, self.image, self.env, self.pw, self.groups = name, image, env, pw, list(groups)
        self.bin = shutil.which(name, path=PATH)

    def cli(self, *args):
        return subprocess.run([self.bin] + list(args), env=self.env, capture_output=True, text=True,
                              timeout=60, cwd="/", **self._as_user())

    def call(self, fn, *args):
        """fn(engine binary, *args, env) as the engine's user (a rootless podman run as root
        with the user's settings would take over the user's storage)."""
        if self.pw is None:
            return fn(self.bin, *args, env=self.env)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                self._as_user()["preexec_fn"]()
                os.chdir("/")
                os.write(w, pickle.dumps(fn(self.bin, *args, env=self.env)))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        return pickle.loads(data)

    def _as_user(self):
        if self.pw is None:
            return {}
        pw, groups = self.pw, self.groups

        def become():
            os.setgroups(groups)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        return {"preexec_fn": become}


@pytest.fixture(scope="session")
def docker_engine(dockerd, base_image):
    return Engine("docker", base_image, dict(os.environ, PATH=PATH, DOCKER_HOST=dockerd.url))


@pytest.fixture(scope="session")
def podman_engine(podman):
    return Engine("podman", podman.image, dict(podman.env(), PATH=PATH), pw=podman.pw)


@pytest.fixture(params=["docker", "podman"])
def engine(request):
    return request.getfixturevalue(request.param + "_engine")


class Job:
    """One job's RTRAIN_HOME (owned by the engine's user), run by the real wrapper."""

    def __init__(self, engine, job_id=1):
        self.engine = engine
        self.root = Path(tempfile.mkdtemp(prefix="rtrain-cj-"))
        os.chmod(self.root, 0o755)
        self.home = paths.Home(str(self.root / "home"))
        self.id = job_id
        self.pid = None
        owner = engine.pw
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    def start(self, command, gpus=(), grace=2, env=None, lease=None, **container):
        """Fork the wrapper as the daemon does (as the engine's user); returns its pid. lease: a
        file the wrapper holds an flock on, as it holds a GPU lease (passed to the job)."""
        spec = {"id": self.id, "command": command, "env": env or {}, "grace": grace, "gpus": list(gpus),
                "lock_dir": None, "container": dict({"image": self.engine.image, "engine": self.engine.name,
                                                     "pull": "never"}, **container)}
        pw = self.engine.pw
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                if pw is not None:
                    os.setgroups(self.engine.groups)
                    os.setgid(pw.pw_gid)
                    os.setuid(pw.pw_uid)
                os.environ.clear()
                os.environ.update(self.engine.env)
                os.chdir("/")
                self.home.ensure()
                os.makedirs(self.home.job(self.id).work)
                fds = []
                if lease is not None:
                    fds.append(os.open(lease, os.O_RDWR))
                    fcntl.flock(fds[0], fcntl.LOCK_EX)
                os.write(w, b"x")
                os.close(w)
                runner.run_wrapper(self.home, spec, fds, lambda: None)
            finally:
                os._exit(99)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.close(r)
        self.pid = pid
        return pid

    def wait(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
                return self.exit()
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("job wrapper still running after %ss; log: %s" % (timeout, self.log()))

    def exit(self):
        return json.loads(Path(self.home.job(self.id).exit).read_text())

    def log(self):
        try:
            return Path(self.home.job(self.id).log).read_text()
        except OSError:
            return ""

    def work(self):
        return Path(self.home.job(self.id).work)

    def name(self):
        user = self.engine.pw.pw_name if self.engine.pw else "root"
        return C.container_name(user, self.home.root, self.id)

    def cleanup(self):
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (OSError, ChildProcessError):
                pass
        self.engine.cli("rm", "-f", self.name())
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def job_factory():
    made = []

    def make(engine, job_id=1):
        j = Job(engine, job_id)
        made.append(j)
        return j

    yield make
    for j in made:
        j.cleanup()


def test_cpu_job_exit_code_log_and_env(engine, job_factory):
    job = job_factory(engine, job_id=7)
    job.start("echo out; echo err >&2; echo \"cwd=$(pwd) id=$(id -u) job=$RTRAIN_JOB_ID "
              "cvd=[$CUDA_VISIBLE_DEVICES] tok=$MY_TOKEN\"; python3 -c 'print(\"py ok\")'; exit 7",
              env={"MY_TOKEN": "s3cret=x"})
    ex = job.wait()
    log = job.log()
    assert ex["exit_code"] == 7 and ex["signal"] is None and not ex["cancelled"], log
    uid = engine.pw.pw_uid if engine.pw else 0
    assert "out\n" in log and "err\n" in log and "py ok\n" in log
    assert "cwd=%s id=%d job=7 cvd=[] tok=s3cret=x\n" % (job.work(), uid) in log, log
    # the container is gone once the job has ended
    assert engine.call(H.engine_is_running, job.name()) is False


def test_files_the_job_writes_are_the_users(engine, job_factory):
    job = job_factory(engine)
    job.start("mkdir -p outputs && echo w > outputs/model.pt")
    assert job.wait()["exit_code"] == 0, job.log()
    st = (job.work() / "outputs" / "model.pt").stat()
    want = (engine.pw.pw_uid, engine.pw.pw_gid) if engine.pw else (0, 0)
    assert (st.st_uid, st.st_gid) == want


def test_docker_job_as_an_ordinary_user_writes_as_that_user(dockerd, base_image, job_factory):
    """docker runs the job with --user UID:GID: a non-root user's files are theirs."""
    pw = ct.ensure_user(ct.PODMAN_USER)
    need(_has_group("docker"), "no group docker (docker.io makes it) for the private dockerd's socket")
    docker_gid = grp.getgrnam("docker").gr_gid
    os.chown(str(dockerd.sock), 0, docker_gid)
    engine = Engine("docker", base_image, dict(os.environ, PATH=PATH, DOCKER_HOST=dockerd.url,
                                               HOME=pw.pw_dir), pw=pw, groups=[docker_gid])
    job = job_factory(engine)
    job.start("id -u; echo w > out.txt")
    ex = job.wait()
    assert ex["exit_code"] == 0, job.log()
    assert job.log().split()[0] == str(pw.pw_uid)
    st = (job.work() / "out.txt").stat()
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)


def _has_group(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def test_docker_gpu_job_without_the_toolkit_fails_at_once_saying_what_to_install(docker_engine, job_factory):
    uuids = ["GPU-0f0e0d0c-0000-4000-8000-00000000000%d" % i for i in range(2)]
    job = job_factory(docker_engine)
    job.start("echo should not run", gpus=uuids)
    ex = job.wait()
    log = job.log()
    assert ex["exit_code"] == 125 and "NVIDIA Container Toolkit" in ex["message"]
    lines = log.splitlines()
    assert lines[0] == "rtrain: error: docker on this host cannot give GPUs to containers: " \
                       "the NVIDIA Container Toolkit is not installed", log
    assert lines[1].startswith("  hint: install nvidia-container-toolkit") and len(lines) == 2, log
    assert "should not run" not in log and "could not select device driver" not in log
    # the argv it would have run does carry the UUIDs, in the form the docker CLI parses: the
    # daemon answers with its own (cryptic) driver error, not a flag error
    argv = ["--gpus", '"device=%s"' % ",".join(uuids)]
    assert C.gpu_argv("docker", uuids) == argv
    raw = docker_engine.cli("run", "--rm", "--pull=never", *argv, docker_engine.image, "true")
    assert raw.returncode == 125 and "could not select device driver" in raw.stderr, raw.stderr


def test_podman_gpu_job_runs_with_its_cdi_devices(podman_engine, job_factory, cdi_gpus):
    uuids, nodes = cdi_gpus
    job = job_factory(podman_engine)
    job.start("ls %s; env | grep -E '^(RTRAIN_TEST_GPU|CUDA_VISIBLE)' | sort; ls /dev | grep -c rtrain-test-gpu"
              % " ".join(nodes), gpus=uuids)
    ex = job.wait()
    log = job.log()
    assert ex["exit_code"] == 0, log
    assert log.split("\n") == nodes + ["CUDA_VISIBLE_DEVICES=%s" % ",".join(uuids)] + [
        "RTRAIN_TEST_GPU_%d=%s" % (i, u) for i, u in enumerate(uuids)] + ["2", ""], log
    # one GPU only: the other device is not in the container
    job2 = job_factory(podman_engine, job_id=2)
    job2.start("ls /dev | grep rtrain-test-gpu", gpus=uuids[1:])
    assert job2.wait()["exit_code"] == 0 and job2.log() == nodes[1][len("/dev/"):] + "\n"


def test_podman_gpu_job_without_a_cdi_spec_for_it_says_what_to_run(podman_engine, job_factory, cdi_gpus):
    job = job_factory(podman_engine)
    job.start("echo should not run", gpus=["GPU-00000000-dead-4000-8000-000000000000"])
    ex = job.wait()
    lines = job.log().splitlines()
    assert ex["exit_code"] == 125
    assert lines[0].startswith("rtrain: error: podman cannot give GPUs to containers: "), lines
    assert "GPU-00000000-dead" in lines[0] and "nvidia-ctk cdi generate" in lines[1] and len(lines) == 2


@pytest.mark.parametrize("command, within", [
    ("echo started; exec sleep 1000", 1.0),                        # SIGTERM ends it at once
    ("trap 'echo got TERM' TERM; echo started; while :; do sleep 0.1; done", None),  # grace, then kill
])
def test_cancel_stops_the_container_within_grace(engine, job_factory, command, within):
    grace = 2
    job = job_factory(engine)
    job.start(command, grace=grace)
    deadline = time.time() + 30
    while "started" not in job.log() and time.time() < deadline:
        time.sleep(0.02)
    assert "started" in job.log(), job.log()
    found = engine.call(H.engine_list, job.home.root)
    assert found == {job.id: job.name()}
    assert engine.call(H.engine_is_running, job.name()) is True
    t0 = time.time()
    os.kill(job.pid, signal.SIGTERM)  # what `rtrain cancel` does to a running job's wrapper
    ex = job.wait()
    took = time.time() - t0
    assert ex["cancelled"] is True
    assert took < (within or grace + 1), (took, job.log())
    if within is None:
        assert took >= grace - 0.5 and "got TERM" in job.log()  # it had its grace period
    assert engine.call(H.engine_is_running, job.name()) is False
    assert engine.call(H.engine_list, job.home.root) == {}


def test_engine_stop_helper(engine, job_factory):
    job = job_factory(engine)
    job.start("echo started; exec sleep 1000")
    deadline = time.time() + 30
    while "started" not in job.log() and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.time()
    assert engine.call(H.engine_stop, job.name(), 5) is True
    assert time.time() - t0 < 3
    ex = job.wait()
    assert ex["exit_code"] == 143 or ex["exit_code"] == 128 + 15, (ex, job.log())


def _lease_free(path):
    from launcher.agent import fsutil
    return not fsutil.flock_held(path)


def test_the_lease_lasts_as_long_as_the_container_not_the_engine_client(engine, job_factory):
    """The engine's client dies (SIGKILL) while its container runs on: the wrapper keeps the
    lease until the engine says the container is gone (it removes it), never before."""
    job = job_factory(engine)
    lease = job.root / "gpu.lock"
    lease.write_text("")
    os.chmod(lease, 0o666)
    job.start("echo started; exec sleep 1000", lease=str(lease))
    deadline = time.time() + 30
    while "started" not in job.log() and time.time() < deadline:
        time.sleep(0.02)
    assert not _lease_free(str(lease)) and engine.call(H.engine_is_running, job.name()) is True
    client = json.loads((Path(job.home.job(job.id).dir) / "pid.json").read_text())["pgid"]
    os.kill(client, signal.SIGKILL)
    deadline = time.time() + 60
    while not _lease_free(str(lease)) and time.time() < deadline:
        time.sleep(0.005)
    assert _lease_free(str(lease))
    assert engine.call(H.engine_is_running, job.name()) is False  # gone before the lease was
    ex = job.wait()
    assert ex["signal"] == "SIGKILL" and not ex["cancelled"]
