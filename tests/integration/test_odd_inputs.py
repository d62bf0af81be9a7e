"""Odd inputs each get their one-line error or simply work: names that are not UTF-8, `env`
names with "=", a file rewritten with its old size and mtime, a garbage jobs.sqlite. On the
built-in `local` host, through the real CLI."""
import os

from support import one_error


def test_file_names_that_are_not_utf8_go_there_and_back(world):
    name = os.fsdecode(b"caf\xe9.txt")
    with open(os.path.join(str(world.cwd), name), "w") as f:
        f.write("latin-1 name\n")
    job = world.submit("sh", "-c", 'cat caf*.txt; printf new > "$(printf "out\\351.txt")"')
    j = world.wait(job)
    assert j["state"] == "succeeded" and world.run("logs", job).stdout == "latin-1 name\n"
    world.run("pull", job, "-o", str(world.root / "pulled"))
    assert os.listdir(os.fsencode(str(world.root / "pulled"))) == [b"out\xe9.txt"]


def test_an_env_name_with_an_equals_sign_is_one_clear_line(world):
    hosts = world.root / "hosts-env.yaml"
    hosts.write_text("hosts:\n  local:\n    env:\n      'A=B': x\n")
    p = world.run("--hosts", hosts, "submit", "--", "true", check=False)
    one_error(p, "'env' must be", "'A=B' is not a variable name")
    p = world.run("submit", "--env", "=x", "--", "true", check=False)
    one_error(p, "--env", "is not a variable name")
    assert world.status() == []


def test_pull_fetches_a_file_rewritten_with_its_old_size_and_mtime(world):
    (world.cwd / "weights.bin").write_bytes(b"A" * 64)
    (world.cwd / "same.txt").write_text("untouched\n")
    # the job rewrites weights.bin in place, same size, and sets its mtime back a day
    job = world.submit("python3", "-c", "import os; st = os.stat('weights.bin'); "
                       "open('weights.bin', 'r+b').write(b'B' * 64); "
                       "os.utime('weights.bin', (st.st_atime - 86400, st.st_mtime - 86400))")
    assert world.wait(job)["state"] == "succeeded"
    p = world.run("pull", job, "-o", str(world.root / "out"))
    assert (world.root / "out" / "weights.bin").read_bytes() == b"B" * 64, p.stdout
    assert not (world.root / "out" / "same.txt").exists()


def test_a_garbage_job_database_is_named_with_its_fix(world):
    job = world.submit("true")
    world.wait(job)
    (world.home / "jobs.sqlite").write_bytes(b"not a database, just junk\n" * 200)
    for name in ("jobs.sqlite-wal", "jobs.sqlite-shm"):
        try:
            (world.home / name).unlink()
        except FileNotFoundError:
            pass
    p = world.run("status", check=False)
    one_error(p, "jobs.sqlite is damaged", "mv ", anywhere=True)
    doc = world.run("hosts", check=False)
    assert doc.returncode == 1
    bad = [x for x in doc.stdout.splitlines() if x.split()[:1] == ["FAIL"]]
    assert len(bad) == 1 and bad[0].split()[1] == "database", doc.stdout
    assert "nvidia-smi" not in bad[0]
