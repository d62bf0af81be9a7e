"""Every process a job started ends with it (cancel), wherever it went: setsid, double fork; a
job that ends normally but leaves daemonized children holding its GPU says so (status, gpus,
its log) until `cancel` ends them. On the built-in `local` host, through the real CLI."""
import json
import time

# A job that leaves its process group three ways, each child holding the job's descriptors
# (its GPU lease among them), and writes their pids down.
ESCAPE = """
setsid sleep 301 < /dev/null > /dev/null 2>&1 &
echo $! > pid.a
( sleep 302 < /dev/null > /dev/null 2>&1 & echo $! > pid.b ) &
setsid sh -c 'sleep 303 & echo $! > pid.c; wait' < /dev/null > /dev/null 2>&1 &
until [ -s pid.a ] && [ -s pid.b ] && [ -s pid.c ]; do sleep 0.02; done
for p in $(cat pid.a pid.c); do  # until both really are in sessions of their own
    while [ "$(cut -d' ' -f6 /proc/$p/stat)" = "$(cut -d' ' -f6 /proc/$$/stat)" ]; do sleep 0.02; done
done
"""


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_state(world, job, state, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = world.status(job)
        if j["state"] == state:
            return j
        time.sleep(0.05)
    raise AssertionError("job %s never %s: %s" % (job, state, j))


def _pids(world, job):
    """The pids the job wrote down: its setsid child, its double-forked one, the child of its
    setsid shell."""
    work = world.home / "jobs" / job / "work"
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            return [int((work / ("pid." + x)).read_text()) for x in "abc"]
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("no pids from job %s" % job)


def _gpus(world):
    return {r["uuid"]: r for r in json.loads(world.run("gpus", "--json").stdout)}


def test_cancel_ends_the_processes_that_left_the_group_and_frees_the_gpu(world):
    (world.cwd / "escape.sh").write_text(ESCAPE + "sleep 300\n")
    job = world.submit("sh", "escape.sh", gpus=4)
    _wait_state(world, job, "running")
    pids = _pids(world, job)
    assert all(_alive(p) for p in pids)
    world.run("cancel", job)
    j = world.wait(job, timeout=30)
    assert j["state"] == "cancelled"
    assert not [p for p in pids if _alive(p)], "processes of the job survived cancel"
    # the GPU leases ended with the last of them: a job needing every GPU starts at once
    after = world.submit("true", gpus=4)
    assert world.wait(after, timeout=20)["state"] == "succeeded"


def test_a_job_that_ends_with_daemonized_children_says_so_until_cancel_ends_them(world):
    (world.cwd / "escape.sh").write_text(ESCAPE + "exit 0\n")
    job = world.submit("sh", "escape.sh", gpus=1)
    j = world.wait(job, timeout=30)
    assert j["state"] == "succeeded"
    pids = _pids(world, job)
    # a normal end kills its process group (the plain double fork), not what it daemonized...
    assert [_alive(p) for p in pids] == [True, False, True]
    pids = [pids[0], pids[2]]
    gpu = j["gpus"][0]
    detail = world.run("status", job).stdout
    assert "left running" in detail and "sleep" in detail, detail
    assert "sleep" in world.status(job)["leftovers"]
    row = _gpus(world)[gpu]          # ...and its GPU stays leased, held by them, and said so
    assert row["state"] == "busy" and "left running by job %s" % job in row["holder"], row
    assert "left 3 process(es) running" in world.run("logs", job).stdout
    p = world.run("cancel", job)
    assert "ended 3 process(es)" in p.stdout, p.stdout
    assert not [x for x in pids if _alive(x)]
    assert _gpus(world)[gpu]["state"] == "free"
    assert world.status(job).get("leftovers") is None
