"""Many runs over a real sshd as the test user (docs/design.md "Many runs"): a sweep sent once
with each job's values in its argv and environment, an array's limit on jobs at once, a chain
of dependencies whose middle fails, a group as a dependency, and the bad inputs."""
import json
import os
import pwd
import re
import subprocess
import sys
import time
import uuid

import pytest

from support import ALICE, one_error

REC = ("import json, os, sys, time\nt0 = time.time(); time.sleep(float(sys.argv[2])); t1 = time.time()\n"
       "open(os.path.join(sys.argv[1], os.environ['RTRAIN_JOB_ID']), 'w').write(json.dumps("
       "{'argv': sys.argv[3:], 't0': t0, 't1': t1, 'env': {k: v for k, v in os.environ.items() "
       "if k.startswith('RTRAIN_SWEEP_') or k == 'RTRAIN_ARRAY_INDEX'}}))\n")


class Host:
    def __init__(self, sshd, tmp_path, names=("tower",)):
        import fakesmi
        fakesmi.write_state(sshd.bin_dir / "nvidia-smi-state.json", gpus=2)
        os.chmod(sshd.bin_dir / "nvidia-smi-state.json", 0o644)
        self.sshd = sshd
        self.home = os.path.join(pwd.getpwnam(ALICE).pw_dir, ".rtrain-%s" % uuid.uuid4().hex[:8])
        self.hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {
            n: (ALICE, sshd.port, {"home": self.home + ("" if i == 0 else "-%d" % i), "max_points": 50})
            for i, n in enumerate(names)})
        self.rec = sshd.root / ("rec-%s" % uuid.uuid4().hex[:8])  # the jobs' records, readable here
        self.rec.mkdir()
        os.chmod(self.rec, 0o1777)
        self.src = tmp_path / "src"
        self.src.mkdir()
        (self.src / "rec.py").write_text(REC)

    def rt(self, *args, check=True):
        p = subprocess.run([sys.executable, "-m", "launcher", "--hosts", str(self.hosts)] + [str(a) for a in args],
                           cwd=str(self.src), env=self.sshd.env(), capture_output=True, text=True, timeout=180)
        if check and p.returncode != 0:
            raise AssertionError("rtrain %s -> %d\n%s\n%s" % (args, p.returncode, p.stdout, p.stderr))
        return p

    def status(self, ref):
        return json.loads(self.rt("status", "--json", ref).stdout)

    def wait_group(self, ref, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            res = self.status(ref)
            if not any(j["state"] in ("queued", "running") for j in res["jobs"]):
                return res
            time.sleep(0.3)
        raise AssertionError("group %s did not end" % ref)

    def wait(self, ref, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = self.status(ref)
            if j["state"] not in ("queued", "running"):
                return j
            time.sleep(0.3)
        raise AssertionError("job %s did not end" % ref)

    def records(self):
        return {int(f.name): json.loads(f.read_text()) for f in self.rec.iterdir() if f.name.isdigit()}


def test_a_sweep_is_sent_once_and_each_job_gets_its_values(sshd, tmp_path):
    h = Host(sshd, tmp_path)
    (h.src / "data.txt").write_text("x" * 5000)
    p = h.rt("submit", "--sweep", "lr=1e-3,3e-4", "--sweep", "seed=0..4", "--",
             "python3", "rec.py", h.rec, "0", "--lr", "{lr}", "--seed={seed}")
    m = re.match(r"group (g\d+) queued on tower: 10 jobs \(sweep lr\(2\) x seed\(5\)\)", p.stdout)
    assert m, p.stdout
    group = m.group(1)
    assert p.stderr.count("rtrain: sent 2 file(s)") == 1, p.stderr  # rec.py and data.txt, once
    packs = os.listdir(os.path.join(h.home, "store", "packs"))
    assert len([x for x in packs if not x.endswith(".tmp")]) == 1  # one blob stream for 10 jobs
    res = h.wait_group(group)
    assert res["group"]["counts"] == {"succeeded": 10} and len(res["jobs"]) == 10
    got = sorted((r["argv"], r["env"]) for r in h.records().values())
    want = sorted((["--lr", lr, "--seed=%d" % s], {"RTRAIN_SWEEP_LR": lr, "RTRAIN_SWEEP_SEED": str(s)})
                  for lr in ("1e-3", "3e-4") for s in range(5))
    assert got == want
    links = {os.stat(os.path.join(h.home, "jobs", str(j["id"]), "manifest.json")).st_ino for j in res["jobs"]}
    assert len(links) == 1  # one manifest for the ten jobs
    table = h.rt("status").stdout
    assert re.search(r"%s\s+rec.py \(sweep lr\(2\) x seed\(5\)\)\s+tower\s+10 succeeded" % group, table), table
    assert "lr=3e-4 seed=4" in h.rt("status", group).stdout
    tails = h.rt("logs", group, "--tail", "1").stdout
    assert tails.count("==> job ") == 10 and "rec.py lr=1e-3 seed=0" in tails
    # -q prints the group id alone; `rtrain.yaml`'s sweep does the same as --sweep
    (h.src / "rtrain.yaml").write_text("run: python3 rec.py %s 0 {x}\nsweep:\n  x: [a, b]\n" % h.rec)
    g2 = h.rt("submit", "-q").stdout.strip()
    assert re.match(r"^g\d+$", g2) and g2 != group
    assert h.wait_group(g2)["group"]["counts"] == {"succeeded": 2}


def test_an_array_limit_is_never_exceeded(sshd, tmp_path):
    h = Host(sshd, tmp_path)
    group = h.rt("submit", "-q", "--array", "0-9%3", "--", "python3", "rec.py", h.rec, "0.4").stdout.strip()
    res = h.wait_group(group)
    assert res["group"]["counts"] == {"succeeded": 10} and res["group"]["max_running"] == 3
    recs = h.records()
    assert sorted(r["env"]["RTRAIN_ARRAY_INDEX"] for r in recs.values()) == sorted(str(i) for i in range(10))
    events = sorted([(r["t0"], 1) for r in recs.values()] + [(r["t1"], -1) for r in recs.values()])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    assert most == 3, most  # three at once, never four


def test_a_failed_dependency_cancels_the_rest_of_the_chain_and_a_group_can_be_waited_for(sshd, tmp_path):
    h = Host(sshd, tmp_path, names=("tower", "tower2"))  # two hosts: ids are written tower:N
    go = h.rec / "go"
    a = h.rt("submit", "-q", "--host", "tower", "--", "sh", "-c",
             "while [ ! -e %s ]; do sleep 0.05; done; python3 rec.py %s 0" % (go, h.rec)).stdout.strip()
    b = h.rt("submit", "-q", "--after", a, "--", "sh", "-c", "exit 3").stdout.strip()
    c = h.rt("submit", "-q", "--after", b, "--", "python3", "rec.py", h.rec, "0").stdout.strip()
    d = h.rt("submit", "-q", "--after-any", b, "--", "python3", "rec.py", h.rec, "0").stdout.strip()
    e = h.rt("submit", "-q", "--after", c, "--", "true").stdout.strip()  # c's dependent: cancelled too
    assert a.startswith("tower:") and b.startswith("tower:")
    assert "waiting for dependency %s" % a in h.status(b)["message"]
    go.touch()
    assert h.wait(a)["state"] == "succeeded"
    assert h.wait(b)["state"] == "failed"
    jc = h.wait(c)
    assert jc["state"] == "cancelled" and jc["message"] == "dependency %s failed" % b, jc
    je = h.wait(e)
    assert je["state"] == "cancelled" and je["message"] == "dependency %s failed" % b, je
    assert h.wait(d)["state"] == "succeeded"  # --after-any: after it, whatever its end
    recs = h.records()
    assert recs[int(d.split(":")[1])]["t0"] >= recs[int(a.split(":")[1])]["t1"]
    # a group as a dependency: after all of its jobs
    g = h.rt("submit", "-q", "--host", "tower", "--array", "3", "--", "python3", "rec.py", h.rec, "0.5").stdout.strip()
    after = h.rt("submit", "-q", "--after", g, "--", "python3", "rec.py", h.rec, "0").stdout.strip()
    assert h.wait(after)["state"] == "succeeded"
    recs = h.records()
    members = [int(j["id"].split(":")[1]) for j in h.status(g)["jobs"]]
    assert recs[int(after.split(":")[1])]["t0"] >= max(recs[m]["t1"] for m in members)
    # a dependency on another host, or an unknown job: refused at submit, one line each
    one_error(h.rt("submit", "--host", "tower2", "--after", a, "--", "true", check=False),
              "on one host", a)
    one_error(h.rt("submit", "--after", "tower:999", "--", "true", check=False), "no job 999")
    one_error(h.rt("submit", "--after", "tower:g999", "--", "true", check=False), "no group g999")


@pytest.mark.parametrize("args, needles", [
    (["--sweep", "lr=", "--", "t", "{lr}"], ["--sweep lr=", "empty value list"]),
    (["--sweep", "lr=1,2", "--", "t", "{lr}", "{seed}"], ["{seed}", "no sweep variable"]),
    (["--sweep", "lr=1,2", "--", "t"], ["sweep variable lr is not used"]),
    (["--array", "51", "--", "t"], ["51 jobs, more than 50"]),
    (["--array", "3", "-f", "--", "t"], ["--follow follows one job"]),
    (["--gpus", "0.4", "--", "t"], ["not 1/k of a GPU"]),
])
def test_bad_input_is_one_clear_line(sshd, tmp_path, args, needles):
    h = Host(sshd, tmp_path)
    one_error(h.rt("submit", *args, check=False), *needles)
    assert h.rt("status").stdout.startswith("no jobs")


def test_usage_adds_up_gpu_hours_per_project_with_their_cost(sshd, tmp_path):
    h = Host(sshd, tmp_path)
    text = h.hosts.read_text().replace("    max_points: 50\n", "    max_points: 50\n    price_per_gpu_hour: 2.0\n"
                                       "    compare_price: 3.0\n")
    h.hosts.write_text(text)
    whole = h.rt("submit", "-q", "--gpus", "1", "--", "python3", "rec.py", h.rec, "1").stdout.strip()
    half = h.rt("submit", "-q", "--gpus", "0.5", "--", "python3", "rec.py", h.rec, "1").stdout.strip()
    jw, jh = h.wait(whole), h.wait(half)
    assert jw["state"] == jh["state"] == "succeeded" and jh["share"] == 2 and jw["project"] == "src"
    res = json.loads(h.rt("usage", "--json").stdout)
    (row,) = res["rows"]
    assert (row["host"], row["project"], row["jobs"], row["user"]) == ("tower", "src", 2, ALICE)
    want = ((jw["ended_at"] - jw["started_at"]) + (jh["ended_at"] - jh["started_at"]) / 2) / 3600.0
    assert abs(row["gpu_hours"] - want) < 1e-6
    assert row["cost"] == round(want * 2.0, 2) and row["compare_cost"] == round(want * 3.0, 2)
    assert json.loads(h.rt("usage", "--json", "--by", "user").stdout)["rows"][0]["user"] == ALICE
    table = h.rt("usage", "--by", "project").stdout
    assert "GPU-HOURS" in table and "src" in table
    assert "1/2 of it, shared" in h.rt("status", half).stdout
