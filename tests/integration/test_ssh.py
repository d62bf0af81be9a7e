"""rtrain over a real OpenSSH sshd on 127.0.0.1, end to end through the CLI."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netproxy import FreezingProxy
from support import ALICE, BOB, NOPY, closed_port, need, one_error
from support import rtrain as rt
from support import wait_ended as wait



@pytest.fixture
def tower(sshd, tmp_path):
    import fakesmi
    fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json", gpus=4)
    os.chmod(sshd.bin_dir / "nvidia-smi-state.json", 0o644)
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, sshd.port)})
    src = tmp_path / "src"
    src.mkdir()
    return hosts, src


def test_submit_status_logs_cancel_over_ssh(sshd, tower):
    hosts, src = tower
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    (src / "train.py").write_text("import os\nprint('gpus', os.environ['CUDA_VISIBLE_DEVICES'])\n")
    (src / ".gitignore").write_text("data/\n")
    (src / "data").mkdir()
    (src / "data" / "big.bin").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(src), "add", "train.py"], check=True)
    subprocess.run(["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   check=True)
    job = rt(sshd, hosts, "submit", "-q", "--gpus", "2", "--", "python3", "train.py", cwd=src).stdout.strip()
    assert job.isdigit()
    j = wait(sshd, hosts, job, src)
    assert j["state"] == "succeeded" and j["host"] == "tower" and len(j["gpus"]) == 2
    assert j["git_commit"] and len(j["git_commit"]) == 40 and j["git_dirty"] is True  # .gitignore untracked
    out = rt(sshd, hosts, "logs", job, cwd=src).stdout
    assert out == "gpus %s\n" % ",".join(j["gpus"])
    # data/ is ignored: the job's snapshot does not have it
    job2 = rt(sshd, hosts, "submit", "-q", "--", "sh", "-c", "ls; sleep 60", cwd=src).stdout.strip()
    time.sleep(1)
    rt(sshd, hosts, "cancel", job2, cwd=src)
    j2 = wait(sshd, hosts, job2, src)
    assert j2["state"] == "cancelled"
    assert "data" not in rt(sshd, hosts, "logs", job2, cwd=src).stdout.split()
    follow = rt(sshd, hosts, "submit", "--follow", "--", "sh", "-c", "echo hi; exit 5", cwd=src, check=False)
    assert follow.returncode == 5 and "hi\n" in follow.stdout
    gp = json.loads(rt(sshd, hosts, "gpus", "--json", cwd=src).stdout)
    assert len(gp) == 4 and all(g["host"] == "tower" for g in gp)
    doc = rt(sshd, hosts, "hosts", cwd=src)
    assert "tower: ready" in doc.stdout and "4 GPU(s)" in doc.stdout


def test_awkward_names_symlinks_and_exec_bits(sshd, tower):
    hosts, src = tower
    names = ["with space.txt", "quote'd\".txt", "new\nline.txt", "ünïcödé-日本.txt", "-dash.txt"]
    for n in names:
        (src / n).write_text(n)
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(src / "run.sh", 0o755)
    (src / "link.txt").symlink_to("with space.txt")
    (src / "outside").symlink_to("/etc/passwd")
    script = ("import os\nfor n in sorted(os.listdir('.')):\n"
              "    print(repr(n), os.path.islink(n), os.access(n, os.X_OK))\n"
              "print(open('link.txt').read())\n")
    (src / "check.py").write_text(script)
    p = rt(sshd, hosts, "submit", "-q", "--", "sh", "-c", "./run.sh && python3 check.py", cwd=src)
    assert "outside" in p.stderr and "outside the tree" in p.stderr
    j = wait(sshd, hosts, p.stdout.strip(), src)
    log = rt(sshd, hosts, "logs", p.stdout.strip(), cwd=src).stdout
    assert j["state"] == "succeeded", log
    assert log.startswith("ran\n")
    for n in names:
        assert repr(n) in log
    assert "'link.txt' True" in log and "'run.sh' False True" in log
    assert "'outside'" not in log
    assert log.rstrip().endswith("with space.txt")


def test_editing_after_submit_over_ssh(sshd, tower):
    hosts, src = tower
    (src / "v.txt").write_text("one\n")
    job = rt(sshd, hosts, "submit", "-q", "--", "sh", "-c", "sleep 1.5; cat v.txt", cwd=src).stdout.strip()
    (src / "v.txt").write_text("two\n")
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"
    assert rt(sshd, hosts, "logs", job, cwd=src).stdout == "one\n"


def test_a_resubmit_sends_what_changed_and_a_lost_base_costs_nothing_but_a_frame(sshd, tower):
    """docs/design.md "Manifest bases": the second submit of a tree goes as a delta on the
    manifest the host kept; where the host lost it (a prune), the agent asks for the whole
    manifest on the same call. Each job sees exactly its own tree."""
    import pwd
    hosts, src = tower
    for i in range(30):
        (src / ("a%02d.txt" % i)).write_text("a%d\n" % i)
    job = rt(sshd, hosts, "submit", "-q", "--", "cat", "a00.txt", "a29.txt", cwd=src).stdout.strip()
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"
    assert rt(sshd, hosts, "logs", job, cwd=src).stdout == "a0\na29\n"
    home = [ln.split(":", 1)[1].strip() for ln in hosts.read_text().splitlines() if "home:" in ln][0]
    kept = os.path.join(pwd.getpwnam(ALICE).pw_dir, home[2:], "store", "bases")
    records = os.path.join(sshd.env()["XDG_CACHE_HOME"], "rtrain", "bases")

    from launcher import bases, config
    name = bases.key("tower", config.parse(str(hosts)).get("tower"), str(src)) + ".rec"

    def record_token():
        with open(os.path.join(records, name), "rb") as f:
            return f.readline().split()[-1].decode()

    first = record_token()
    assert os.listdir(kept) == [first + ".json"]

    # one file changed, one gone, one new: the job has exactly that tree
    (src / "a00.txt").write_text("changed\n")
    (src / "a29.txt").unlink()
    (src / "b.txt").write_text("new\n")
    cmd = "cat a00.txt b.txt; test -e a29.txt || echo gone; ls | wc -l"
    job = rt(sshd, hosts, "submit", "-q", "--", cmd, cwd=src).stdout.strip()
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"
    assert rt(sshd, hosts, "logs", job, cwd=src).stdout == "changed\nnew\ngone\n30\n"
    second = record_token()
    assert second != first and sorted(os.listdir(kept)) == sorted([first + ".json", second + ".json"])

    # the host lost its bases: the next submit still carries its whole tree
    for n in os.listdir(kept):
        os.unlink(os.path.join(kept, n))
    (src / "a01.txt").write_text("again\n")
    job = rt(sshd, hosts, "submit", "-q", "--", "cat a00.txt a01.txt; ls | wc -l", cwd=src).stdout.strip()
    assert wait(sshd, hosts, job, src)["state"] == "succeeded"
    assert rt(sshd, hosts, "logs", job, cwd=src).stdout == "changed\nagain\n30\n"
    assert os.listdir(kept) == [record_token() + ".json"]


def test_two_unix_users_share_a_tower(sshd, tmp_path):
    import fakesmi
    fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json", gpus=4)
    rec = sshd.root / ("rec-%d" % os.getpid())
    rec.mkdir(exist_ok=True)
    os.chmod(rec, 0o1777)
    worlds = []
    for user in (ALICE, BOB):
        src = tmp_path / user
        src.mkdir()
        (src / "rec.py").write_text(
            "import os, time, sys\nt0 = time.time(); time.sleep(0.2); t1 = time.time()\n"
            "open(sys.argv[1] + '/%s-' + os.environ['RTRAIN_JOB_ID'], 'w').write("
            "'%%s %%r %%r' %% (os.environ['CUDA_VISIBLE_DEVICES'], t0, t1))\n" % user)
        worlds.append((user, src, sshd.hosts_yaml(src / "hosts.yaml", {"tower": (user, sshd.port)})))

    def go(w):
        user, src, hosts = w
        return w, rt(sshd, hosts, "submit", "-q", "--gpus", "1", "--", "python3", "rec.py", rec, cwd=src).stdout.strip()

    with ThreadPoolExecutor(8) as ex:
        jobs = list(ex.map(go, [w for _ in range(20) for w in worlds]))
    for (_, src, hosts), job in jobs:
        assert wait(sshd, hosts, job, src, timeout=120)["state"] == "succeeded"
    spans = {}
    for f in rec.iterdir():
        gpu, t0, t1 = f.read_text().split()
        spans.setdefault(gpu, []).append((float(t0), float(t1), f.name))
    assert sum(map(len, spans.values())) == 40
    for gpu, s in spans.items():
        s.sort()
        for a, b in zip(s, s[1:]):
            assert a[1] <= b[0], "GPU %s held by %s and %s at once" % (gpu, a[2], b[2])
    # each user sees only their own jobs, and cannot cancel the other's
    (alice, asrc, ahosts), (bob, bsrc, bhosts) = worlds
    a_jobs = json.loads(rt(sshd, ahosts, "status", "--json", "--all", cwd=asrc).stdout)
    mine = {j for (u, _, _), j in jobs if u == alice}
    assert {j["id"] for j in a_jobs} == mine, a_jobs
    assert all(j["host"] == "tower" and "rec.py" in j["command"] for j in a_jobs)
    lone = rt(sshd, bhosts, "submit", "-q", "--", "sleep", "30", cwd=bsrc).stdout.strip()
    a_ids = {j["id"] for j in a_jobs}
    if lone not in a_ids:
        p = rt(sshd, ahosts, "cancel", lone, cwd=asrc, check=False)
        assert p.returncode != 0 and "no job" in p.stderr
    rt(sshd, bhosts, "cancel", lone, cwd=bsrc)


def test_placement_across_two_hosts(sshd, tmp_path):
    port2, _key2, kh2 = sshd.start("second")
    kh = tmp_path / "kh"
    kh.write_text(sshd.known_hosts.read_text() + kh2.read_text())
    env = sshd.env(known_hosts=kh)
    src = tmp_path / "src"
    src.mkdir()
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"a": (ALICE, sshd.port),
                                                      "b": (BOB, port2,
                                                            {"lock_dir": tmp_path / "b-locks"}),
                                                      "dead": (BOB, closed_port())})
    busy = rt(sshd, hosts, "submit", "-q", "--host", "a", "--gpus", "4", "--", "sleep", "30", cwd=src, env=env)
    p = rt(sshd, hosts, "submit", "-q", "--gpus", "2", "--", "true", cwd=src, env=env)
    assert p.stdout.strip().startswith("b:"), p.stdout + p.stderr
    assert "dead" in p.stderr  # the unreachable host is skipped, and said so
    rt(sshd, hosts, "cancel", busy.stdout.strip(), cwd=src, env=env)
    st = rt(sshd, hosts, "status", cwd=src, env=env, check=False)
    assert st.returncode == 1 and "dead: connection refused" in st.stderr  # says which host failed
    assert "a:" in st.stdout  # and still lists the others' jobs


def test_unknown_and_changed_host_keys(sshd, tower, tmp_path):
    hosts, src = tower
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    p = rt(sshd, hosts, "status", cwd=src, env=sshd.env(known_hosts=empty), check=False)
    assert p.returncode == 1 and "is not in %s" % empty in p.stderr and "Traceback" not in p.stderr
    assert "--accept-new-host-key" in p.stderr
    p = rt(sshd, hosts, "--accept-new-host-key", "status", cwd=src, env=sshd.env(known_hosts=empty))
    assert "[127.0.0.1]:%d" % sshd.port in empty.read_text()
    rt(sshd, hosts, "status", cwd=src, env=sshd.env(known_hosts=empty))
    # a changed key: the file names another key for this host
    wrong = tmp_path / "wrong_known_hosts"
    other = sshd.other_key.with_suffix(".pub").read_text().split()[:2]
    wrong.write_text("# first line\n[127.0.0.1]:%d %s\n" % (sshd.port, " ".join(other)))
    before = wrong.read_text()
    for extra in ([], ["--accept-new-host-key"]):
        p = rt(sshd, hosts, *extra, "status", cwd=src, env=sshd.env(known_hosts=wrong), check=False)
        assert p.returncode == 1 and "HOST KEY CHANGED" in p.stderr
        assert "%s line 2" % wrong in p.stderr and "ssh-keygen -R" in p.stderr
        assert wrong.read_text() == before


def test_refused_key(sshd, tower, tmp_path):
    _, src = tower
    hosts = sshd.hosts_yaml(tmp_path / "h2.yaml", {"tower": (ALICE, sshd.port,
                                                             {"identity_file": sshd.other_key})})
    p = rt(sshd, hosts, "status", cwd=src, check=False)
    assert p.returncode == 1 and "authentication refused for %s@" % ALICE in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 2, p.stderr


def test_unreachable_refused_and_timeout(sshd, tower, tmp_path):
    _, src = tower
    hosts = sshd.hosts_yaml(tmp_path / "h.yaml", {"tower": (ALICE, closed_port())})
    p = rt(sshd, hosts, "submit", "--", "true", cwd=src, check=False)
    assert p.returncode == 1 and "connection refused" in p.stderr and "Traceback" not in p.stderr
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # accepts, never answers
    try:
        hosts = sshd.hosts_yaml(tmp_path / "h3.yaml", {"tower": (ALICE, silent.getsockname()[1],
                                                                 {"connect_timeout": 1})})
        t = time.time()
        p = rt(sshd, hosts, "status", "--host", "tower", cwd=src, check=False)
        assert p.returncode == 1 and ("no SSH answer" in p.stderr or "timed out" in p.stderr)
        assert time.time() - t < 20
    finally:
        silent.close()


def test_dns_failure_without_dns(sshd, tower, tmp_path):
    """A host name that does not resolve. rtrain runs in a network namespace of its own with no
    network at all (`unshare -n`): the resolver fails at once and no DNS query leaves the machine."""
    _, src = tower
    unshare = shutil.which("unshare")
    need(unshare is not None and subprocess.run([unshare, "-n", "true"]).returncode == 0,
         "`unshare -n` (util-linux, as root) is needed for a resolver without a network")
    hosts = tmp_path / "h.yaml"
    hosts.write_text("hosts:\n  tower:\n    ssh: alice@gpu-tower.invalid\n    transport: %s\n" % sshd.transport)
    p = subprocess.run([unshare, "-n", sys.executable, "-m", "launcher", "--hosts", str(hosts), "status",
                        "--host", "tower"], cwd=str(src), env=sshd.env(), capture_output=True, text=True,
                       timeout=60)
    one_error(p, "tower: cannot resolve host name 'gpu-tower.invalid'")
    assert p.stdout == ""


def test_host_without_python3(sshd, tower, tmp_path):
    _, src = tower
    hosts = sshd.hosts_yaml(tmp_path / "h.yaml", {"tower": (NOPY, sshd.port)})
    p = rt(sshd, hosts, "submit", "--", "true", cwd=src, check=False)
    assert p.returncode == 1 and "python3 not found on the host" in p.stderr
    assert "Traceback" not in p.stderr


def test_system_known_hosts_are_read_and_never_written(sshd, tower, tmp_path):
    """/etc/ssh/ssh_known_hosts (here $RTRAIN_GLOBAL_KNOWN_HOSTS) vouches for a host the user's
    file does not know; accept-new still writes the user's file only, and not for a known key."""
    hosts, src = tower
    user = tmp_path / "user_known_hosts"
    user.write_text("")
    system = tmp_path / "system_known_hosts"
    system.write_text(sshd.known_hosts.read_text())
    env = sshd.env(known_hosts=user, RTRAIN_GLOBAL_KNOWN_HOSTS=str(system))
    before = system.read_text()
    for extra in ([], ["--accept-new-host-key"]):
        rt(sshd, hosts, *extra, "status", cwd=src, env=env)
    assert user.read_text() == "" and system.read_text() == before
    # a changed key in the system file is refused, and the message names that file and line (a
    # shared connection keeps the trust it was opened with, as OpenSSH's do: close it first)
    rt(sshd, hosts, "hosts", "--disconnect", cwd=src, env=env)
    other = sshd.other_key.with_suffix(".pub").read_text().split()[:2]
    system.write_text("# managed by the admins\n[127.0.0.1]:%d %s\n" % (sshd.port, " ".join(other)))
    p = rt(sshd, hosts, "--accept-new-host-key", "status", cwd=src, env=env, check=False)
    assert p.returncode == 1 and "HOST KEY CHANGED" in p.stderr and "%s line 2" % system in p.stderr
    assert user.read_text() == "" and "Traceback" not in p.stderr, p.stderr
    # the user's file comes first, as with OpenSSH: its right key wins over the stale system one
    user.write_text(sshd.known_hosts.read_text())
    rt(sshd, hosts, "hosts", "--disconnect", cwd=src, env=env)
    rt(sshd, hosts, "status", cwd=src, env=env)


def test_a_silent_network_fails_with_no_answer_instead_of_hanging(sshd, tower, tmp_path):
    """The network dies without a reset while `rtrain status` waits for the agent's reply: the
    call gives up after io_timeout with one line, where TCP alone would wait ~15 minutes."""
    import uuid
    from pathlib import Path
    _, src = tower
    proxy = FreezingProxy(sshd.port)
    try:
        # `python:` on the host: waits, when told to, until the test has frozen the network
        flags = Path(sshd.root) / ("hold-" + uuid.uuid4().hex[:8])
        flags.mkdir()
        os.chmod(flags, 0o777)
        wrapper = flags / "python3"
        wrapper.write_text("#!/bin/sh\nif [ -e %(d)s/hold ]; then touch %(d)s/started\n"
                           "  while [ ! -e %(d)s/go ]; do sleep 0.05; done\nfi\n"
                           "exec python3 \"$@\"\n" % {"d": flags})
        os.chmod(wrapper, 0o755)
        hosts = sshd.hosts_yaml(tmp_path / "frozen.yaml", {"tower": (
            ALICE, proxy.port, {"python": wrapper, "io_timeout": 2})})
        key = " ".join(sshd.host_key.with_suffix(".pub").read_text().split()[:2])
        kh = tmp_path / "kh_proxy"
        kh.write_text("[127.0.0.1]:%d %s\n" % (proxy.port, key))
        env = sshd.env(known_hosts=kh)
        rt(sshd, hosts, "status", cwd=src, env=env)  # ships the agent: all is well
        (flags / "hold").touch()
        p = subprocess.Popen([sys.executable, "-m", "launcher", "--hosts", str(hosts), "status"],
                             cwd=str(src), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            deadline = time.time() + 60
            while not (flags / "started").exists():
                assert p.poll() is None and time.time() < deadline, p.communicate()
                time.sleep(0.02)
            assert proxy.freeze() >= 1
            (flags / "go").touch()  # the agent answers into the dead network
            out, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 1, (out, err)
        lines = err.strip().splitlines()
        assert lines[0] == "rtrain: error: tower: no answer from the host for 2s", err
        assert len(lines) == 2 and lines[1].startswith("  hint: ") and "io_timeout" in lines[1], err
    finally:
        proxy.close()
