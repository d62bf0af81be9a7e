"""The CLI's own behaviour, end to end through the real `rtrain` on the `local` host (the `world`
fixture): user text that looks like rich markup, options after the verb, errors with their hints,
a submit whose reply is lost, a Python too old for the agent, the large-tree confirmation,
`status --state` and `status --watch`. No timed assertions: waits are polls with generous limits."""
import json
import os
import subprocess
import sys
import time

from support import closed_port, one_error

MARKUP_NAME = "[/]odd[red]name[/red]"
MARKUP_CMD = "echo '[/] [red]not red[/red] [bold]'"


def hosts_file(world, text):
    p = world.root / "hosts-cli.yaml"
    p.write_text(text)
    return p


def all_jobs(world, hosts=None):
    args = (["--hosts", hosts] if hosts else []) + ["status", "--json", "--all"]
    return json.loads(world.run(*args).stdout)


# ------------------------------------------------------------------ 1. markup in user text

def test_markup_in_job_name_and_command_is_printed_as_written(world):
    job = world.submit(MARKUP_CMD, extra=("--name", MARKUP_NAME))  # one argument: run as written
    world.wait(job)
    table = world.run("status", env=world.env(COLUMNS="200"))  # wide enough for the name whole
    assert "Traceback" not in table.stderr and "MarkupError" not in table.stderr, table.stderr
    assert MARKUP_NAME in table.stdout, table.stdout
    detail = world.run("status", job)
    assert MARKUP_NAME in detail.stdout, detail.stdout
    assert MARKUP_CMD in detail.stdout, detail.stdout  # `[red]` did not vanish
    assert world.run("logs", job).stdout == "[/] [red]not red[/red] [bold]\n"


# ------------------------------------------------------------------ 2. options after the verb

def test_debug_hosts_and_accept_new_host_key_work_after_the_verb(world):
    # --debug after the verb is accepted and shows the traceback, as it does before the verb
    for argv in (("status", "99", "--debug"), ("--debug", "status", "99")):
        p = world.run(*argv, check=False)
        assert p.returncode == 1, p.stderr
        assert "Traceback" in p.stderr and "rtrain: error: no job 99" in p.stderr, p.stderr
    plain = world.run("status", "99", check=False)
    assert "Traceback" not in plain.stderr
    # --hosts after the verb; and a value given before the verb is not reset by the verb's parser
    missing = world.root / "no-such-hosts.yaml"
    for argv in (("status", "--hosts", missing), ("--hosts", missing, "status"),
                 ("--hosts", missing, "status", "--debug")):
        p = world.run(*argv, check=False)
        assert p.returncode == 1 and "hosts file %s does not exist" % missing in p.stderr, (argv, p.stderr)
    assert world.run("status", "--accept-new-host-key").returncode == 0
    assert world.run("gpus", "--debug").returncode == 0


# ------------------------------------------------------------------ 3. errors keep their hint

def test_cancel_prints_the_hint_with_the_error(world):
    p = world.run("cancel", "99", check=False)
    one_error(p, "no job 99", "hint: `rtrain status --all` lists your jobs", anywhere=True)


def test_status_json_with_an_unreachable_host_says_why_on_stderr(world):
    job = world.submit("true")
    world.wait(job)
    hosts = hosts_file(world, "default: local\nhosts:\n  local:\n  dead:\n    ssh: nobody@127.0.0.1:%d\n"
                              "    connect_timeout: 5\n" % closed_port())
    empty = world.root / "empty-ssh-config"
    empty.write_text("")
    env = world.env(RTRAIN_SSH_CONFIG=str(empty), RTRAIN_KNOWN_HOSTS=str(world.root / "kh"))
    p = world.run("--hosts", hosts, "status", "--json", "--all", check=False, env=env)
    assert p.returncode == 1
    assert [j["id"] for j in json.loads(p.stdout)] == [job]  # stdout is pure JSON
    one_error(p, "rtrain: error: dead: connection refused by 127.0.0.1", "  hint: ", anywhere=True)
    p = world.run("--hosts", hosts, "gpus", "--json", check=False, env=env)
    assert p.returncode == 1
    rows = json.loads(p.stdout)
    assert {r["host"] for r in rows} == {"local", "dead"} and len(rows) == 5  # 4 GPUs + the error
    one_error(p, "rtrain: error: dead: connection refused by 127.0.0.1", "  hint: ", anywhere=True)


# ------------------------------------------------------------------ 4. a submit whose reply is lost

# `python:` for the local host: runs the real agent, but plays a dropped connection around a
# `submit` call. eat-once: the first submit is made, its reply swallowed (the agent queued the
# job; the client never hears of it). eat-always: every submit's reply is swallowed. drop-once:
# the first submit's request is read and the connection "drops" before the agent gets it.
WRAPPER = r'''#!%(python)s
import os, subprocess, sys
args = sys.argv[1:]
mode, marker = os.environ["WRAP_MODE"], os.environ["WRAP_MARKER"]
if args[-1] == "submit" and (mode == "eat-always" or not os.path.exists(marker)):
    with open(marker, "a") as f:
        f.write("x")
    if mode == "drop-once":
        sys.stdin.buffer.readline()
        sys.exit(255)
    p = subprocess.Popen([sys.executable] + args, stdout=subprocess.PIPE)
    for line in iter(p.stdout.readline, b""):
        if b'"protocol"' in line:
            break  # the reply: lost
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
    p.wait()
    sys.exit(255)
os.execv(sys.executable, [sys.executable] + args)
'''


def _wrapped(world, mode, tmp):
    wrapper = world.root / "python-wrapper"
    wrapper.write_text(WRAPPER % {"python": sys.executable})
    os.chmod(wrapper, 0o755)
    hosts = hosts_file(world, "hosts:\n  local:\n    kind: local\n    python: %s\n" % wrapper)
    marker = world.root / ("marker-" + mode)
    env = world.env(WRAP_MODE=mode, WRAP_MARKER=str(marker))
    (world.cwd / "train.py").write_text("print('trained')\n")
    return hosts, marker, env


def test_a_lost_submit_reply_is_retried_with_the_same_token_no_duplicate(world, tmp_path):
    hosts, marker, env = _wrapped(world, "eat-once", tmp_path)
    p = world.run("--hosts", hosts, "submit", "-q", "--", "python3", "train.py", env=env, check=False)
    assert p.returncode == 0, p.stderr
    assert marker.read_text() == "x"  # the first reply was lost
    assert "connection lost (" in p.stderr and "retrying" in p.stderr, p.stderr
    job = p.stdout.strip()
    jobs = all_jobs(world)
    assert [j["id"] for j in jobs] == [job]  # one job, not two
    assert world.wait(job)["state"] == "succeeded"
    assert world.run("logs", job).stdout == "trained\n"


def test_a_submit_whose_replies_are_all_lost_says_to_check_status(world, tmp_path):
    hosts, marker, env = _wrapped(world, "eat-always", tmp_path)
    p = world.run("--hosts", hosts, "submit", "-q", "--", "python3", "train.py", env=env, check=False)
    assert p.returncode == 1 and p.stdout == "", p.stdout
    assert len(marker.read_text()) == 3  # the submit and two retries
    lines = [x for x in p.stderr.splitlines() if not x.startswith("rtrain: connection lost (")]
    assert p.stderr.count("retrying") == 2, p.stderr
    assert len(lines) == 2 and lines[0].startswith("rtrain: error: local: "), p.stderr
    assert "may or may not be queued" in lines[0] and "rtrain status" in lines[1], p.stderr
    assert "run the command again" not in p.stderr
    assert len(all_jobs(world)) == 1  # the first one was queued, once


def test_a_submit_dropped_before_the_agent_had_it_queues_nothing(world, tmp_path):
    hosts, marker, env = _wrapped(world, "drop-once", tmp_path)
    p = world.run("--hosts", hosts, "submit", "-q", "--", "python3", "train.py", env=env, check=False)
    one_error(p, "queued no job from this submit", "submit again", anywhere=True)
    assert p.stderr.count("retrying") == 1, p.stderr  # the host answered the first retry
    assert all_jobs(world) == []
    # and submitting again works
    job = world.run("--hosts", hosts, "submit", "-q", "--", "python3", "train.py", env=env).stdout.strip()
    assert [j["id"] for j in all_jobs(world)] == [job]


# ------------------------------------------------------------------ 5. python too old

OLD_PYTHON = r'''#!/bin/sh
# python3 that says it is 3.6: runs the agent's bootstrap (-c TEXT) with sys.version_info patched
while [ "$1" != "-c" ]; do shift; done
shift
exec %(python)s -S -c 'import sys
sys.version_info = (3, 6, 9, "final", 0)
code = sys.argv[1]
sys.argv = ["-c"] + sys.argv[2:]
exec(code)' "$@"
'''


def test_a_python_older_than_3_8_gets_one_clear_error(world):
    old = world.root / "python3.6"
    old.write_text(OLD_PYTHON % {"python": sys.executable})
    os.chmod(old, 0o755)
    hosts = hosts_file(world, "hosts:\n  local:\n    kind: local\n    python: %s\n" % old)
    p = world.run("--hosts", hosts, "status", check=False)
    lines = one_error(p, "local: Python 3.6 at ", "too old", "needs 3.8 or newer", "`python:`", anywhere=True)
    assert lines[1].startswith("  hint: ")
    doc = world.run("--hosts", hosts, "hosts", check=False)
    assert doc.returncode == 1 and "not ready" in doc.stdout, doc.stdout
    assert any(x.split()[:2] == ["FAIL", "python"] for x in doc.stdout.splitlines()), doc.stdout


# ------------------------------------------------------------------ 8. large tree, --state, --watch

def test_a_large_tree_is_refused_without_a_terminal_and_sent_with_yes(world):
    hosts = hosts_file(world, "hosts:\n  local: {kind: local, max_tree_mb: 1}\n")
    (world.cwd / "big.bin").write_bytes(os.urandom(2 << 20))
    (world.cwd / "small.py").write_text("print('ok')\n")
    p = world.run("--hosts", hosts, "submit", "--", "python3", "small.py", check=False, input="")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    listing = p.stderr.split("Largest:", 1)[1]
    assert "2.1 MB  big.bin" in listing and "small.py" in listing, p.stderr
    assert listing.index("big.bin") < listing.index("small.py")  # largest first
    assert "over the 1 MB limit" in p.stderr and "--yes" in p.stderr, p.stderr
    assert "Send it anyway" not in p.stderr  # nobody to ask
    assert all_jobs(world) == []
    job = world.run("--hosts", hosts, "submit", "-q", "--yes", "--", "python3", "small.py",
                    input="").stdout.strip()
    assert world.wait(job)["state"] == "succeeded"
    assert world.run("logs", job).stdout == "ok\n"


def test_status_state_filters(world):
    ok = world.submit("true", extra=("--name", "fine"))
    bad = world.submit("false", extra=("--name", "broken"))
    world.wait(ok)
    world.wait(bad)
    failed = json.loads(world.run("status", "--json", "--state", "failed").stdout)
    assert [j["id"] for j in failed] == [bad]
    both = json.loads(world.run("status", "--json", "--state", "failed", "--state", "succeeded").stdout)
    assert sorted(j["id"] for j in both) == sorted([ok, bad])
    table = world.run("status", "--state", "succeeded").stdout
    assert "fine" in table and "broken" not in table, table
    p = world.run("status", "--state", "nonsense", check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_status_watch_refreshes_the_table(world):
    job = world.submit("true", extra=("--name", "watched"))
    world.wait(job)
    out = world.root / "watch.out"
    with open(out, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "launcher", "status", "--watch"], cwd=str(world.cwd),
                             env=world.env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 60
            while out.read_text(errors="replace").count("watched") < 2:
                assert p.poll() is None, out.read_text(errors="replace")
                assert time.time() < deadline, "the table was not printed twice: %r" % out.read_text()
                time.sleep(0.1)
        finally:
            p.terminate()
            p.wait(30)
    text = out.read_text(errors="replace")
    assert text.count("\x1b[H\x1b[2J") >= 2  # the screen is cleared before each refresh
    assert text.count("ID") >= 2 and "Traceback" not in text, text
