"""A project's day over a real sshd, as the test user on the "tower": rtrain.yaml, its
environment built once per key (pip, uv), its data sent once and shared, its outputs kept
across jobs and pulled, variables expanded, the login shell, and prune."""
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import ALICE, need
from wheels import make_wheel


class Tower:
    def __init__(self, sshd, tmp_path):
        import fakesmi
        fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json", gpus=4)
        os.chmod(sshd.bin_dir / "nvidia-smi-state.json", 0o644)
        self.sshd = sshd
        self.user_home = pwd.getpwnam(ALICE).pw_dir
        self.home = os.path.join(self.user_home, ".rtrain-%s" % uuid.uuid4().hex[:8])
        self.hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, sshd.port, {"home": self.home})})
        self.shared = sshd.root / ("p10-%s" % uuid.uuid4().hex[:8])  # readable by the test user
        self.shared.mkdir()
        os.chmod(self.shared, 0o1777)
        self.wheels = self.shared / "wheels"
        for v, value in (("1.0", "one"), ("2.0", "two")):
            make_wheel(str(self.wheels), "tinypkg", v, "VALUE = %r\n" % value)
        os.chmod(self.wheels, 0o755)
        self.count = self.shared / "builds.txt"
        self.src = tmp_path / "src"
        self.src.mkdir()

    def rt(self, *args, check=True, timeout=180):
        p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(self.hosts)] + [str(a) for a in args],
                           cwd=str(self.src), env=self.sshd.env(), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
        return p

    def submit(self, *args):
        """(job id, bytes sent, files sent)"""
        p = self.rt("submit", *args)
        job = re.search(r"^job (\d+) queued", p.stdout, re.M).group(1)
        sent = re.search(r"sent (\d+) file\(s\), ([\d.]+) MB", p.stderr)
        return job, (float(sent.group(2)) if sent else 0.0), (int(sent.group(1)) if sent else 0)

    def wait(self, job, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = json.loads(self.rt("status", "--json", job).stdout)
            if j["state"] not in ("queued", "running"):
                return j
            time.sleep(0.3)
        raise AssertionError("job %s did not end: %s" % (job, j))

    def log(self, job):
        return self.rt("logs", job).stdout

    def builds(self, kind="env"):
        d = os.path.join(self.home, "builds", kind)
        return sorted(n for n in os.listdir(d) if "." not in n) if os.path.isdir(d) else []

    def project(self, text):
        (self.src / "rtrain.yaml").write_text(text)

    def setup_lines(self):
        return ("setup:\n  - pip install --no-index --find-links %s -r requirements.txt\n"
                "  - echo built >> %s\n" % (self.wheels, self.count))

    def built(self):
        return self.count.read_text().count("built") if self.count.exists() else 0


@pytest.fixture
def tower(sshd, tmp_path):
    t = Tower(sshd, tmp_path)
    yield t
    shutil.rmtree(str(t.shared), ignore_errors=True)


RUN = 'run: python -c "import tinypkg; print(\'tinypkg\', tinypkg.VALUE)"\n'


def test_environment_built_once_reused_rebuilt_and_a_broken_one_fails(tower):
    tower.project(RUN + tower.setup_lines())
    (tower.src / "requirements.txt").write_text("tinypkg==1.0\n")
    j1, _, _ = tower.submit()
    assert tower.wait(j1)["state"] == "succeeded", tower.log(j1)
    log1 = tower.log(j1)
    assert log1.startswith("rtrain: building environment"), log1
    assert "Successfully installed tinypkg-1.0" in log1 and log1.rstrip().endswith("tinypkg one")
    # the same requirements: the same environment, not built again
    j2, _, _ = tower.submit()
    assert tower.wait(j2)["state"] == "succeeded"
    assert "is built already" in tower.log(j2) and "Successfully installed" not in tower.log(j2)
    assert tower.built() == 1 and len(tower.builds()) == 1
    # a changed requirement: a new environment
    (tower.src / "requirements.txt").write_text("tinypkg==2.0\n")
    j3, _, _ = tower.submit()
    assert tower.wait(j3)["state"] == "succeeded"
    assert tower.log(j3).rstrip().endswith("tinypkg two")
    assert tower.built() == 2 and len(tower.builds()) == 2
    # a broken one fails the job with pip's error, and keeps no environment
    (tower.src / "requirements.txt").write_text("nosuchpkg-rtrain\n")
    j4, _, _ = tower.submit()
    j = tower.wait(j4)
    assert j["state"] == "failed" and j["exit_code"] is None
    assert "cannot build its environment" in j["message"] and "nosuchpkg-rtrain" in j["message"]
    assert "No matching distribution found for nosuchpkg-rtrain" in tower.log(j4)
    assert len(tower.builds()) == 2 and tower.built() == 2
    failed = [n for n in os.listdir(os.path.join(tower.home, "builds", "env")) if n.endswith(".failed")]
    assert len(failed) == 1
    st = tower.rt("status", j4).stdout
    assert "cannot build its environment" in st


def test_ten_jobs_at_once_build_one_environment(tower):
    tower.project(RUN + tower.setup_lines())
    (tower.src / "requirements.txt").write_text("tinypkg==1.0\n# ten\n")
    with ThreadPoolExecutor(10) as ex:
        jobs = [f.result()[0] for f in [ex.submit(tower.submit) for _ in range(10)]]
    for j in jobs:
        assert tower.wait(j)["state"] == "succeeded", tower.log(j)
        assert tower.log(j).rstrip().endswith("tinypkg one")
    assert tower.built() == 1 and len(tower.builds()) == 1


def test_uv_builds_the_venv_when_the_host_has_it(tower):
    try:
        import uv
        uv_bin = uv.find_uv_bin()
    except (ImportError, OSError):
        uv_bin = shutil.which("uv")
    need(uv_bin, "uv is not installed (pip install uv)")
    bin_dir = tower.shared / "uvbin"
    bin_dir.mkdir()
    shutil.copy(uv_bin, str(bin_dir / "uv"))
    os.chmod(bin_dir, 0o755)
    os.chmod(bin_dir / "uv", 0o755)
    tower.project(RUN + tower.setup_lines() + "env:\n  PATH: %s:$PATH\n  UV_CACHE_DIR: %s\n" % (
        bin_dir, tower.shared / "uvcache"))
    (tower.src / "requirements.txt").write_text("tinypkg==2.0\n")
    j, _, _ = tower.submit()
    assert tower.wait(j)["state"] == "succeeded", tower.log(j)
    log = tower.log(j)
    assert "(venv with uv)" in log and "uv venv" in log and log.rstrip().endswith("tinypkg two")


def test_data_sent_once_incrementally_shared_not_copied(tower):
    (tower.src / ".gitignore").write_text("data/\n")
    subprocess.run(["git", "init", "-q", str(tower.src)], check=True)
    corpus = tower.src / "data" / "corpus"
    corpus.mkdir(parents=True)
    for i in range(5):
        (corpus / ("part%d.bin" % i)).write_bytes(os.urandom(10 << 20))
    (corpus / "small.txt").write_text("v1\n")
    tower.project("data: [data/corpus]\nrun: sleep 2; cat data/corpus/small.txt; "
                  "python3 -c \"import os; print(os.path.getsize('data/corpus/part3.bin'), "
                  "os.path.islink('data/corpus'))\"\n")
    j1, mb1, files1 = tower.submit()
    assert files1 == 8 and mb1 >= 52.0  # the ignored 50 MB went (and 2 code files), unasked
    j2, mb2, files2 = tower.submit()
    assert files2 == 0 and mb2 == 0.0  # nothing of it again
    (corpus / "small.txt").write_text("v2\n")  # while jobs 1 and 2 are queued or running
    j3, mb3, files3 = tower.submit()
    assert files3 == 1 and mb3 < 0.01
    for j, want in ((j1, "v1"), (j2, "v1"), (j3, "v2")):
        assert tower.wait(j)["state"] == "succeeded", tower.log(j)
        assert tower.log(j).endswith("%s\n%d True\n" % (want, 10 << 20))
    # one tree per data content (two contents: two trees, whatever the number of jobs), its files
    # read-only copies of their own (never the store's blobs)
    trees = tower.builds("data")
    assert len(trees) == 2
    st = os.stat(os.path.join(tower.home, "builds", "data", trees[0], "data", "corpus", "part0.bin"))
    assert st.st_nlink == 1 and not st.st_mode & 0o222


def test_outputs_kept_across_jobs_pulled_and_never_sent(tower):
    (tower.src / "train.py").write_text(
        "import os, sys\n"
        "os.makedirs('out', exist_ok=True)\n"
        "if os.path.exists('out/ckpt'):\n"
        "    print('resumed from', open('out/ckpt').read())\n"
        "open('out/ckpt', 'w').write('step %s' % sys.argv[1])\n"
        "os.makedirs('out/__pycache__', exist_ok=True)\n"
        "open('out/__pycache__/x.pyc', 'w').write('x')\n")
    (tower.src / "util.py").write_text("X = 1\n")
    tower.project("outputs: [out]\nrun: python3 -c 'import util' && python3 train.py\n")
    j1, _, _ = tower.submit("--", "python3 -c 'import util' && python3 train.py 1")
    assert tower.wait(j1)["state"] == "succeeded", tower.log(j1)
    j2, _, _ = tower.submit("--", "python3 train.py 2")
    assert tower.wait(j2)["state"] == "succeeded"
    assert tower.log(j2) == "resumed from step 1\n"
    p = tower.rt("pull", j1)
    got = sorted(str(x.relative_to(tower.src / "rtrain-out")) for x in (tower.src / "rtrain-out").rglob("*")
                 if x.is_file())
    assert got == [j1 + "/out/ckpt"], (got, p.stdout)  # the shared outputs as they are now
    assert (tower.src / "rtrain-out" / j1 / "out" / "ckpt").read_text() == "step 2"
    tower.rt("pull", j1, "out", "--pycache", "-o", str(tower.src / "rtrain-out" / "all"))
    assert (tower.src / "rtrain-out" / "all" / "out" / "__pycache__" / "x.pyc").exists()
    j3, mb, files = tower.submit("--", "ls -a; ls out")
    assert files == 0 and mb == 0.0
    assert tower.wait(j3)["state"] == "succeeded"
    assert "rtrain-out" not in tower.log(j3).split()
    # a running job's outputs can be pulled too
    j4, _, _ = tower.submit("--", "echo hi > out/live.txt; sleep 30")
    deadline = time.time() + 30
    while tower.rt("pull", j4, "out/live.txt", check=False).returncode != 0 and time.time() < deadline:
        time.sleep(0.3)
    assert (tower.src / "rtrain-out" / j4 / "out" / "live.txt").read_text() == "hi\n"
    tower.rt("cancel", j4)


def test_variables_expand_and_login_shell_sees_the_profile(tower):
    tower.project("env:\n  PATH: /opt/rtrain-x/bin:$PATH\n  LIT: 'a$$b$'\n  REF: ${HOME}/data\n"
                  "run: echo \"$PATH|$LIT|$REF|${RTRAIN_PROFILE_VAR:-none}\"\n")
    j1, _, _ = tower.submit()
    assert tower.wait(j1)["state"] == "succeeded"
    path, lit, ref, prof = tower.log(j1).strip().split("|")
    assert path.startswith("/opt/rtrain-x/bin:") and len(path) > len("/opt/rtrain-x/bin:") and "$" not in path
    assert lit == "a$b$" and ref == tower.user_home + "/data" and prof == "none"
    profile = os.path.join(tower.user_home, ".profile")
    old = open(profile).read() if os.path.exists(profile) else None
    try:
        with open(profile, "a") as f:
            f.write("\nexport RTRAIN_PROFILE_VAR=from-profile\n")
        with open(tower.src / "rtrain.yaml", "a") as f:
            f.write("shell: login\n")
        j2, _, _ = tower.submit()
        assert tower.wait(j2)["state"] == "succeeded", tower.log(j2)
        path, lit, ref, prof = tower.log(j2).strip().split("|")
        assert prof == "from-profile" and path.startswith("/opt/rtrain-x/bin:") and lit == "a$b$"
    finally:
        if old is None:
            os.unlink(profile)
        else:
            with open(profile, "w") as f:
                f.write(old)


def test_project_file_errors_say_file_and_line(tower):
    from support import one_error
    tower.project("run: python3 x.py\ngpus: two\n")
    one_error(tower.rt("submit", check=False), "rtrain.yaml:2", "'gpus' must be")
    tower.project("run: python3 x.py\ndatas: [x]\n")
    one_error(tower.rt("submit", check=False), "rtrain.yaml:2", "unknown key 'datas'")
    os.unlink(tower.src / "rtrain.yaml")
    p = tower.rt("init")
    assert "rtrain.yaml" in p.stdout and (tower.src / "rtrain.yaml").read_text().startswith("# rtrain.yaml")
    one_error(tower.rt("init", check=False), "exists already")


def test_prune_keeps_what_queued_and_running_jobs_use(tower):
    (tower.src / ".gitignore").write_text("data/\n")
    (tower.src / "data").mkdir()
    (tower.src / "data" / "d.txt").write_text("payload\n")
    (tower.src / "requirements.txt").write_text("tinypkg==1.0\n")
    tower.project(RUN + tower.setup_lines() + "data: [data]\n")
    old, _, _ = tower.submit()  # ends: its work dir may go, what it shares with the others not
    assert tower.wait(old)["state"] == "succeeded"
    running, _, _ = tower.submit("--gpus", "4", "--", "cat data/d.txt; sleep 60")
    deadline = time.time() + 60
    while json.loads(tower.rt("status", "--json", running).stdout)["state"] != "running":
        assert time.time() < deadline
        time.sleep(0.3)
    queued, _, _ = tower.submit("--gpus", "1", "--",
                                "cat data/d.txt; python -c 'import tinypkg; print(tinypkg.VALUE)'")
    # an environment no job uses any more: another project's
    (tower.src / "requirements.txt").write_text("tinypkg==2.0\n")
    other, _, _ = tower.submit()
    assert tower.wait(other)["state"] == "succeeded"
    envs, trees = tower.builds(), tower.builds("data")
    assert len(envs) == 2 and len(trees) == 1
    dry = tower.rt("prune", "--older-than", "0", "--dry-run")
    assert "would free" in dry.stdout and len(tower.builds()) == 2
    p = tower.rt("prune", "--older-than", "0")
    assert "freed" in p.stdout and "work dirs of 2 job(s)" in p.stdout, p.stdout
    assert not os.path.exists(os.path.join(tower.home, "jobs", old, "work"))
    assert tower.log(old).rstrip().endswith("tinypkg one")  # its log stays
    for j in (running, queued):
        assert os.path.isdir(os.path.join(tower.home, "jobs", j, "work"))
    assert len(tower.builds()) == 1 and tower.builds("data") == trees  # the one they use stays
    tower.rt("cancel", running)
    assert tower.wait(queued)["state"] == "succeeded", tower.log(queued)
    assert tower.log(queued).endswith("payload\none\n")


def test_python_mounts_and_a_named_venv_per_host(tower):
    (tower.shared / "hostdata").mkdir()
    (tower.shared / "hostdata" / "f.txt").write_text("on the host")
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(tower.shared / "venv")], check=True)
    for d in ("hostdata", "venv"):
        subprocess.run(["chmod", "-R", "a+rX", str(tower.shared / d)], check=True)
    run = "run: python -c \"import sys; print(sys.prefix); print(open('data/host/f.txt').read())\"\n"
    tower.project("python: python3\nmounts:\n  data/host: %s\n%s" % (tower.shared / "hostdata", run))
    j1, _, _ = tower.submit()  # Debian has no `python`: the project's python3 is the job's python
    assert tower.wait(j1)["state"] == "succeeded", tower.log(j1)
    assert tower.log(j1).endswith("/usr\non the host\n")
    with open(tower.src / "rtrain.yaml", "a") as f:
        f.write("hosts:\n  tower:\n    venv: %s\n" % (tower.shared / "venv"))
    j2, _, _ = tower.submit()
    assert tower.wait(j2)["state"] == "succeeded", tower.log(j2)
    assert tower.log(j2) == "%s\non the host\n" % (tower.shared / "venv")
    with open(tower.src / "rtrain.yaml", "a") as f:
        f.write("    mounts:\n      data/host: /nonexistent/rtrain\n")
    j3, _, _ = tower.submit()
    j = tower.wait(j3)
    assert j["state"] == "failed" and "/nonexistent/rtrain does not exist on this host" in j["message"]
