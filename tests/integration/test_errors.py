"""Issue 4's error list, end to end through the real `rtrain` CLI: each error is one line that
says what is wrong (plus at most one hint line), a non-zero exit, no traceback unless --debug,
and nothing lost or half-made. Most run against the real sshd of conftest.py; those already
covered elsewhere are not repeated here:
  test_ssh.py: connection refused, timeout, DNS failure, refused key, unknown and changed host
  key, python3 missing; test_local_jobs.py: no such job, hosts.yaml syntax error, no such host on
  submit, more GPUs than the host has (local), nvidia-smi missing (local), command not found
  (local); tests/unit/test_config.py: config errors at the parser level."""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

import fakesmi
from support import ALICE, REPO, fill_disk, need, one_error, stop_agent
from support import rtrain as rt

TERMINAL = ("succeeded", "failed", "cancelled", "lost")


# ------------------------------------------------------------------ helpers

def jobs(sshd, hosts, cwd):
    return json.loads(rt(sshd, hosts, "status", "--json", "--all", "--host", "tower", cwd=cwd).stdout)


def wait(sshd, hosts, job, cwd, timeout=60):
    deadline = time.time() + timeout
    while True:
        j = json.loads(rt(sshd, hosts, "status", "--json", job, cwd=cwd).stdout)
        if j["state"] in TERMINAL or time.time() > deadline:
            return j
        time.sleep(0.1)


def private_dir(sshd, prefix, mode=0o755):
    """A fresh folder the test users can reach (tmp_path is root's alone)."""
    d = sshd.root / ("%s-%s" % (prefix, uuid.uuid4().hex[:8]))
    d.mkdir()
    os.chmod(d, mode)
    return d


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "train.py").write_text("print('trained')\n")
    return d


@pytest.fixture
def smi(sshd):
    """A private copy of the fake nvidia-smi with its own state file (the shared one in
    sshd.bin_dir is left alone): give the host `nvidia_smi: str(smi.path)`."""
    d = private_dir(sshd, "smi")

    class Smi:
        path = d / "nvidia-smi"
        state = fakesmi.install(d, gpus=4)

        def set(self, **kw):
            fakesmi.write_state(self.state, **kw)

    yield Smi()
    shutil.rmtree(d, ignore_errors=True)


def tower_hosts(sshd, tmp_path, name="hosts.yaml", **extra):
    return sshd.hosts_yaml(tmp_path / name, {"tower": (ALICE, sshd.port, extra)})


# ------------------------------------------------------------------ nvidia-smi

def test_nvidia_smi_missing_on_the_host(sshd, smi, tmp_path, src):
    missing = smi.path.parent / "not-installed" / "nvidia-smi"
    hosts = tower_hosts(sshd, tmp_path, nvidia_smi=missing)
    p = rt(sshd, hosts, "submit", "--gpus", "1", "--", "python3", "train.py", cwd=src, check=False)
    one_error(p, "nvidia-smi was not found")
    assert "--gpus 0" in p.stderr
    assert jobs(sshd, hosts, src) == []
    job = rt(sshd, hosts, "submit", "-q", "--gpus", "0", "--", "python3", "train.py", cwd=src).stdout.strip()
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"
    assert rt(sshd, hosts, "logs", job, cwd=src).stdout == "trained\n"
    g = rt(sshd, hosts, "gpus", "--host", "tower", cwd=src)
    assert "nvidia-smi not found" in g.stdout and "Traceback" not in g.stderr
    doc = rt(sshd, hosts, "hosts", "tower", cwd=src)
    line = [x for x in doc.stdout.splitlines() if "nvidia-smi" in x]
    assert line and "not found" in line[0], doc.stdout
    assert "tower: ready" in doc.stdout  # CPU jobs run: a warning, not a failure


@pytest.mark.parametrize("error,words", [("driver_not_loaded", "NVIDIA driver"),
                                         ("gpu_lost", "GPU is lost"),
                                         ("nvml_mismatch", "version mismatch")])
def test_nvidia_smi_failing_on_the_host(sshd, smi, tmp_path, src, error, words):
    smi.set(gpus=4, error=error)
    hosts = tower_hosts(sshd, tmp_path, nvidia_smi=smi.path)
    # rtrain gpus: one row saying what failed; nothing is free (fail closed); a non-zero exit
    g = rt(sshd, hosts, "gpus", "--host", "tower", cwd=src, check=False)
    assert "nvidia-smi failed" in g.stdout and words in g.stdout, g.stdout
    assert "free" not in g.stdout and "Traceback" not in g.stderr
    assert g.returncode == 1, g
    rows = json.loads(rt(sshd, hosts, "gpus", "--json", "--host", "tower", cwd=src, check=False).stdout)
    assert not any(r.get("state") == "free" for r in rows)
    assert any(words in (r.get("error") or "") for r in rows), rows
    # rtrain hosts: nvidia-smi FAILs, with the message and a fix
    doc = rt(sshd, hosts, "hosts", "tower", cwd=src, check=False)
    assert doc.returncode == 1 and "tower: not ready" in doc.stdout, doc.stdout
    assert words in doc.stdout and "fix:" in doc.stdout
    # a GPU job is refused with the reason; a CPU job still runs
    p = rt(sshd, hosts, "submit", "--gpus", "1", "--", "python3", "train.py", cwd=src, check=False)
    one_error(p, "cannot read the GPUs", words)
    assert jobs(sshd, hosts, src) == []
    job = rt(sshd, hosts, "submit", "-q", "--", "python3", "train.py", cwd=src).stdout.strip()
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"


def test_gpu_job_waits_with_a_reason_when_nvidia_smi_breaks(sshd, smi, tmp_path, src):
    """nvidia-smi breaks after the host's GPU count was seen: a GPU job may still be queued, but
    then it waits (never starts on a GPU nobody can vouch for) and `rtrain status JOB` says why."""
    from launcher.agent import scheduler
    home = private_dir(sshd, "home", mode=0o700)
    shutil.chown(str(home), ALICE, ALICE)
    hosts = tower_hosts(sshd, tmp_path, nvidia_smi=smi.path, home=home)
    first = rt(sshd, hosts, "submit", "-q", "--gpus", "1", "--", "true", cwd=src).stdout.strip()
    assert wait(sshd, hosts, first, src)["state"] == "succeeded"
    smi.set(gpus=4, error="gpu_lost")
    time.sleep(scheduler.SNAPSHOT_MAX_AGE_S + 0.5)  # past the daemon's last good snapshot
    p = rt(sshd, hosts, "submit", "-q", "--gpus", "1", "--", "true", cwd=src, check=False)
    if p.returncode != 0:
        one_error(p, "GPU is lost")
        return
    job = p.stdout.strip()
    # the daemon has looked once it dropped the GPU count it keeps (it does so on an error)
    deadline = time.time() + 20
    while (home / "gpus.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not (home / "gpus.json").exists()
    j = json.loads(rt(sshd, hosts, "status", "--json", job, cwd=src).stdout)
    assert j["state"] == "queued" and j["gpus"] == [], j
    p = rt(sshd, hosts, "submit", "--gpus", "1", "--", "true", cwd=src, check=False)
    one_error(p, "GPU is lost")  # the next one is refused outright
    # and the waiting job says why it waits
    deadline = time.time() + 20
    while "GPU is lost" not in (j["message"] or "") and time.time() < deadline:
        time.sleep(0.1)
        j = json.loads(rt(sshd, hosts, "status", "--json", job, cwd=src).stdout)
    assert j["state"] == "queued" and "cannot read the GPUs" in j["message"], j
    assert "GPU is lost" in rt(sshd, hosts, "status", job, cwd=src).stdout
    smi.set(gpus=4)  # repaired: it runs
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"


def test_more_gpus_than_the_host_has_over_ssh(sshd, smi, tmp_path, src):
    smi.set(gpus=2)
    hosts = tower_hosts(sshd, tmp_path, nvidia_smi=smi.path)
    p = rt(sshd, hosts, "submit", "--gpus", "3", "--", "python3", "train.py", cwd=src, check=False)
    one_error(p, "asked for 3 GPUs", "has 2")
    assert "at most 2" in p.stderr
    assert jobs(sshd, hosts, src) == []
    job = rt(sshd, hosts, "submit", "-q", "--gpus", "2", "--", "python3", "train.py", cwd=src).stdout.strip()
    j = wait(sshd, hosts, job, src)
    assert j["state"] == "succeeded" and len(j["gpus"]) == 2


# ------------------------------------------------------------------ RTRAIN_HOME on the host

def mount_small_disk(d, owner=None):
    """Mount a 4 MiB tmpfs on d (mode 0700, owned by `owner`); returns its unmount function."""
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        need(False, "cannot mount a tmpfs to fill (%s)" % p.stderr.strip())

    def unmount():
        stop_agent(d)
        for _ in range(50):
            if subprocess.run(["umount", str(d)], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        subprocess.run(["umount", "-l", str(d)], capture_output=True)

    if owner:
        shutil.chown(str(d), owner, owner)
    os.chmod(d, 0o700)
    return unmount


@pytest.fixture
def small_disk(sshd):
    """A 4 MiB tmpfs owned by the test user (mode 0700): room for the agent (~1 MiB unpacked), unmounted at the end."""
    d = private_dir(sshd, "smalldisk")
    unmount = mount_small_disk(d, ALICE)
    yield d
    unmount()
    shutil.rmtree(d, ignore_errors=True)


def test_disk_full_under_rtrain_home(sshd, small_disk, tmp_path, src):
    hosts = tower_hosts(sshd, tmp_path, home=small_disk)
    first = rt(sshd, hosts, "submit", "-q", "--", "python3", "train.py", cwd=src).stdout.strip()
    assert wait(sshd, hosts, first, src)["state"] == "succeeded"
    filler = fill_disk(small_disk)
    (src / "data.bin").write_bytes(os.urandom(300 * 1024))  # new content: must be uploaded
    p = rt(sshd, hosts, "submit", "--", "python3", "train.py", cwd=src, check=False)
    one_error(p, "no space left", str(small_disk))
    # nothing half-made: the one job, and its folder alone under jobs/
    assert [j["id"] for j in jobs(sshd, hosts, src)] == [first]
    assert sorted(os.listdir(small_disk / "jobs")) == [first]
    assert os.listdir(small_disk / "tmp") == []
    filler.unlink()
    job = rt(sshd, hosts, "submit", "-q", "--", "sh", "-c", "wc -c < data.bin", cwd=src).stdout.strip()
    j = wait(sshd, hosts, job, src)
    assert j["state"] == "succeeded"
    assert rt(sshd, hosts, "logs", job, cwd=src).stdout.strip() == str(300 * 1024)


def test_disk_full_after_upload(sshd, small_disk, tmp_path, src):
    """Room for the blobs but not for the job's work dir: still one clear line, no half job."""
    hosts = tower_hosts(sshd, tmp_path, home=small_disk)
    first = rt(sshd, hosts, "submit", "-q", "--", "true", cwd=src).stdout.strip()
    assert wait(sshd, hosts, first, src)["state"] == "succeeded"
    size = 400 * 1024
    (src / "data.bin").write_bytes(os.urandom(size))
    filler = fill_disk(small_disk, leave=size + 100 * 1024)
    p = rt(sshd, hosts, "submit", "--", "true", cwd=src, check=False)
    one_error(p, "no space left", str(small_disk))
    assert [j["id"] for j in jobs(sshd, hosts, src)] == [first]
    assert sorted(os.listdir(small_disk / "jobs")) == [first]
    assert os.listdir(small_disk / "tmp") == []
    filler.unlink()
    job = rt(sshd, hosts, "submit", "-q", "--", "true", cwd=src).stdout.strip()
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"


def test_disk_full_during_a_large_upload_over_ssh(sshd, small_disk, tmp_path, src):
    """The agent stops reading when the disk fills; the client, still sending, must report the
    agent's reason, not a broken connection."""
    hosts = tower_hosts(sshd, tmp_path, home=small_disk)
    first = rt(sshd, hosts, "submit", "-q", "--", "true", cwd=src).stdout.strip()
    assert wait(sshd, hosts, first, src)["state"] == "succeeded"
    (src / "big.bin").write_bytes(os.urandom(6 << 20))  # more than the disk, more than a window
    p = rt(sshd, hosts, "submit", "--", "true", cwd=src, check=False)
    one_error(p, "no space left", str(small_disk))
    assert [j["id"] for j in jobs(sshd, hosts, src)] == [first]
    (src / "big.bin").unlink()
    assert wait(sshd, hosts, rt(sshd, hosts, "submit", "-q", "--", "true", cwd=src).stdout.strip(),
                src)["state"] == "succeeded"


def test_disk_full_on_the_local_host(world, tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    unmount = mount_small_disk(d)
    try:
        env = world.env(RTRAIN_HOME=str(d))
        first = world.run("submit", "-q", "--", "true", env=env).stdout.strip()
        (world.cwd / "big.bin").write_bytes(os.urandom(6 << 20))
        p = world.run("submit", "--", "true", env=env, check=False)
        one_error(p, "no space left", str(d))
        ids = [j["id"] for j in json.loads(world.run("status", "--json", "--all", env=env).stdout)]
        assert ids == [first]
    finally:
        world.home = d  # so the world's cleanup stops this daemon
        world.cleanup()
        unmount()


def test_disk_full_before_the_agent_is_there(sshd, small_disk, tmp_path, src):
    hosts = tower_hosts(sshd, tmp_path, home=small_disk)
    filler = fill_disk(small_disk)
    p = rt(sshd, hosts, "submit", "--", "true", cwd=src, check=False)
    one_error(p, "no space left", str(small_disk))
    doc = rt(sshd, hosts, "hosts", "tower", cwd=src, check=False)
    assert doc.returncode == 1 and "ok   ssh" in doc.stdout, doc.stdout
    assert "FAIL disk       no space left" in doc.stdout, doc.stdout
    filler.unlink()
    job = rt(sshd, hosts, "submit", "-q", "--", "true", cwd=src).stdout.strip()
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"


def test_rtrain_home_not_writable(sshd, tmp_path, src):
    ro = private_dir(sshd, "ro-home")  # root's, 0755: the user can read, not write
    hosts = tower_hosts(sshd, tmp_path, home=ro)
    for args in (("submit", "--", "true"), ("status",)):
        p = rt(sshd, hosts, *args, cwd=src, check=False)
        one_error(p, str(ro), "not writable", "Permission denied")
        assert "home:" in p.stderr
    doc = rt(sshd, hosts, "hosts", "tower", cwd=src, check=False)
    assert doc.returncode == 1 and "FAIL disk       RTRAIN_HOME %s" % ro in doc.stdout, doc.stdout


def test_rtrain_home_made_read_only_after_use(sshd, tmp_path, src):
    home = private_dir(sshd, "home", mode=0o700)
    shutil.chown(str(home), ALICE, ALICE)
    hosts = tower_hosts(sshd, tmp_path, home=home)
    first = rt(sshd, hosts, "submit", "-q", "--", "true", cwd=src).stdout.strip()
    assert wait(sshd, hosts, first, src)["state"] == "succeeded"
    rt(sshd, hosts, "status", cwd=src)
    for d in (home, home / "jobs", home / "tmp", home / "store"):
        os.chmod(d, 0o500)
    try:
        (src / "new.txt").write_text("new\n")
        p = rt(sshd, hosts, "submit", "--", "true", cwd=src, check=False)
        one_error(p, str(home))
        assert "writ" in p.stderr
    finally:
        for d in (home, home / "jobs", home / "tmp", home / "store"):
            os.chmod(d, 0o700)
    assert [j["id"] for j in jobs(sshd, hosts, src)] == [first]


# ------------------------------------------------------------------ jobs, hosts, config

def test_command_not_found_over_ssh(sshd, tmp_path, src):
    hosts = tower_hosts(sshd, tmp_path)
    job = rt(sshd, hosts, "submit", "-q", "--", "no-such-command-xyz", "--flag", cwd=src).stdout.strip()
    j = wait(sshd, hosts, job, src)
    assert j["state"] == "failed" and j["exit_code"] == 127, j
    log = rt(sshd, hosts, "logs", job, cwd=src).stdout
    assert "no-such-command-xyz" in log and "not found" in log
    p = rt(sshd, hosts, "submit", "--follow", "--", "no-such-command-xyz", cwd=src, check=False)
    assert p.returncode == 127 and "not found" in p.stdout


def test_no_such_job_over_ssh(sshd, tmp_path, src):
    hosts = tower_hosts(sshd, tmp_path)
    for args in (("logs", "999"), ("status", "999"), ("cancel", "999"), ("pull", "999"),
                 ("logs", "-f", "tower:999")):
        p = rt(sshd, hosts, *args, cwd=src, check=False)
        one_error(p, "no job")


def test_no_such_host_in_a_job_id_and_filters(sshd, tmp_path, src):
    hosts = tower_hosts(sshd, tmp_path)
    for args in (("logs", "nowhere:3"), ("status", "--host", "nowhere"), ("gpus", "--host", "nowhere"),
                 ("hosts", "nowhere"), ("submit", "--host", "nowhere", "--", "true")):
        p = rt(sshd, hosts, *args, cwd=src, check=False)
        one_error(p, "no such host 'nowhere'", str(hosts), "tower")


def test_hosts_yaml_errors_through_the_cli(tmp_path, src, sshd):
    bad = tmp_path / "bad.yaml"
    cases = [
        ("hosts:\n  tower:\n    ssh: u@h\n    gpu: 2\n", ["%s:4: unknown key 'gpu'" % bad, "gpus"]),
        ("hosts:\n  tower:\n    ssh: u@h\n   home: x\n", ["%s:4" % bad, "YAML syntax error"]),
        ("hosts:\n  tower:\n    ssh: u@h\n    gpus: 3\n", ["%s:4" % bad, "'gpus' must be"]),
        ("hostz:\n  tower: {}\n", ["%s:1: unknown key 'hostz'" % bad, "hosts"]),
        ("default: tower\nhosts:\n  gpu:\n    ssh: u@h\n", ["%s:1" % bad, "'tower' is not defined"]),
    ]
    for text, needles in cases:
        bad.write_text(text)
        p = rt(sshd, bad, "status", cwd=src, check=False)
        one_error(p, *needles)
    p = rt(sshd, tmp_path / "nope.yaml", "status", cwd=src, check=False)
    one_error(p, "does not exist")
    p = rt(sshd, None, "status", cwd=src, check=False,
           env=sshd.env(RTRAIN_HOSTS=str(tmp_path / "gone.yaml")))
    one_error(p, "RTRAIN_HOSTS", "gone.yaml")


def test_debug_shows_the_traceback(sshd, smi, tmp_path, src):
    hosts = tower_hosts(sshd, tmp_path, nvidia_smi=smi.path.parent / "absent" / "nvidia-smi")
    plain = rt(sshd, hosts, "submit", "--gpus", "1", "--", "true", cwd=src, check=False)
    one_error(plain, "nvidia-smi was not found")
    dbg = rt(sshd, hosts, "--debug", "submit", "--gpus", "1", "--", "true", cwd=src, check=False)
    assert dbg.returncode == 1 and "Traceback (most recent call last)" in dbg.stderr
    assert dbg.stderr.rstrip().splitlines()[-2] == plain.stderr.rstrip().splitlines()[0]
    # and for a client-side error too
    plain = rt(sshd, tmp_path / "nope.yaml", "status", cwd=src, check=False)
    one_error(plain, "does not exist")
    dbg = rt(sshd, tmp_path / "nope.yaml", "--debug", "status", cwd=src, check=False)
    assert dbg.returncode == 1 and "Traceback" in dbg.stderr and "ConfigError" in dbg.stderr


def test_unexpected_error_is_one_line_without_debug(tmp_path):
    """A bug (not an RtrainError) is still one line and exit 1, and --debug shows it in full."""
    code = ("import sys\nfrom launcher import cli, commands\n"
            "def boom(args, factory):\n    raise ZeroDivisionError('boom')\n"
            "commands.HANDLERS['status'] = boom\nsys.exit(cli.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), RTRAIN_HOME=str(tmp_path / "home"))
    p = subprocess.run([sys.executable, "-c", code, "status"], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path))
    one_error(p, "unexpected error: ZeroDivisionError: boom")
    assert "--debug" in p.stderr
    p = subprocess.run([sys.executable, "-c", code, "--debug", "status"], capture_output=True,
                       text=True, env=env, cwd=str(tmp_path))
    assert p.returncode == 1 and "Traceback" in p.stderr and "ZeroDivisionError" in p.stderr


# ------------------------------------------------------------------ start-up cost

HEAVY = ("paramiko", "fabric", "invoke", "rich", "yaml", "cryptography", "nacl", "bcrypt")

PROBE = """
import json, sys
from launcher import cli
code = None
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
sys.stdout.flush()
sys.stderr.write("\\nMODULES=" + json.dumps(sorted(sys.modules)) + "\\n")
sys.exit(code or 0)
"""


def loaded(args, tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), RTRAIN_HOME=str(tmp_path / "home"),
               HOME=str(tmp_path / "userhome"))
    env.pop("RTRAIN_HOSTS", None)
    p = subprocess.run([sys.executable, "-c", PROBE] + list(args), capture_output=True, text=True,
                       env=env, cwd=str(cwd), timeout=60)
    assert p.returncode == 0, p.stderr
    mods = json.loads(p.stderr.rsplit("MODULES=", 1)[1])
    return p, {m.split(".")[0] for m in mods}


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["submit", "--help"]])
def test_version_and_help_load_nothing_heavy(tmp_path, args):
    p, mods = loaded(args, tmp_path)
    assert p.stdout.strip()
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_local_status_loads_no_ssh(tmp_path):
    p, mods = loaded(["status"], tmp_path)
    assert "no jobs" in p.stdout
    assert not mods & {"paramiko", "fabric", "invoke", "cryptography", "nacl", "bcrypt"}, mods
    assert "yaml" not in mods  # no hosts file: nothing to parse
