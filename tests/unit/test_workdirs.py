"""A job's work dir is built by the daemon after submit (workdirs.py): in the daemon for small
trees, in a child for larger ones; the job starts only on a complete tree, and a build that
fails fails the job with what went wrong, in its status and its log."""
import hashlib
import io
import json
import os
import time

from launcher.agent import daemon, db, paths, store, workdirs


def _home(tmp_path):
    return paths.Home(str(tmp_path / "home")).ensure()


def _queue(home, files, lose=()):
    """What submit leaves: blobs in the store, jobs/N/{manifest.json,log}, a queued row."""
    blobs = [("file %d\n" % i).encode() for i in range(files)]
    frames = b"".join(b"%s %d\n%s" % (hashlib.sha256(b).hexdigest().encode(), len(b), b)
                      for b in blobs if b not in lose)
    store.Store(home.store).receive(io.BytesIO(frames + b"END\n"))
    entries = [{"path": "d%d/f%d.txt" % (i % 3, i), "type": "file", "size": len(b),
                "hash": hashlib.sha256(b).hexdigest(), "exec": False} for i, b in enumerate(blobs)]
    con = db.connect(home.db)
    job_id = db.insert_job(con, {"name": "t", "command": "true", "gpus": 0, "priority": 0,
                                 "retries": 0, "files": len(entries)})
    os.makedirs(home.job(job_id).dir)
    with open(os.path.join(home.job(job_id).dir, "manifest.json"), "w") as f:
        json.dump({"entries": entries}, f)
    open(home.job(job_id).log, "w").close()
    return con, job_id, entries


def _settle(d, con, job_id, limit=30):
    """Run the daemon's passes until the job leaves `queued` (no job really starts: start is
    stubbed to record the call)."""
    started = []
    d.start = lambda row, uuids, fds, lock_dir=None: started.append(row["id"]) or con.execute(
        "UPDATE jobs SET state='running' WHERE id=?", (row["id"],))
    deadline = time.time() + limit
    while time.time() < deadline:
        d.reap()
        d.schedule()
        if db.get(con, job_id)["state"] != "queued":
            return started
        time.sleep(0.02)
    raise AssertionError("job %d still queued" % job_id)


def test_small_tree_is_built_by_the_daemon_itself(tmp_path):
    home = _home(tmp_path)
    con, job_id, entries = _queue(home, workdirs.INLINE_MAX_FILES)
    d = daemon.Daemon(home, ["agent"])
    assert _settle(d, con, job_id) == [job_id] and not d.builders and not d.built
    got = sorted(os.path.relpath(os.path.join(r, f), home.job(job_id).work)
                 for r, _, fs in os.walk(home.job(job_id).work) for f in fs)
    assert got == sorted(e["path"] for e in entries)


def test_large_tree_is_built_by_a_child_and_the_job_waits_for_it(tmp_path):
    home = _home(tmp_path)
    con, job_id, entries = _queue(home, 300)
    d = daemon.Daemon(home, ["agent"])
    d.start = lambda *a: (_ for _ in ()).throw(AssertionError("started before its tree"))
    d.schedule()
    assert list(d.builders) == [job_id] and not workdirs.ready(home, job_id)
    assert _settle(d, con, job_id) == [job_id]
    assert len(os.listdir(os.path.join(home.job(job_id).work, "d0"))) == 100
    assert [n for n in os.listdir(home.job(job_id).dir) if n.startswith("work.tmp")] == []


def test_a_build_that_fails_fails_the_job_and_says_why(tmp_path):
    for files in (3, 100):  # in the daemon, and in a child
        home = _home(tmp_path / str(files))
        con, job_id, _ = _queue(home, files, lose=[b"file 1\n"])
        d = daemon.Daemon(home, ["agent"])
        assert _settle(d, con, job_id) == []
        row = db.get(con, job_id)
        assert row["state"] == "failed" and row["ended_at"]
        assert row["message"].startswith("cannot build its work dir: the store's copy of ") and \
            "is missing" in row["message"] and "submit again" in row["message"], row["message"]
        with open(home.job(job_id).log) as f:
            assert "rtrain: cannot build the job's work dir: the store's copy of " in f.read()
        assert not os.path.exists(home.job(job_id).work)


def test_at_most_max_builders_at_once_in_queue_order(tmp_path):
    home = _home(tmp_path)
    jobs = [_queue(home, 100)[1] for _ in range(workdirs.MAX_BUILDERS + 2)]
    con = db.connect(home.db)
    d = daemon.Daemon(home, ["agent"])
    d.start = lambda row, uuids, fds, lock_dir=None: con.execute("UPDATE jobs SET state='running' WHERE id=?",
                                                  (row["id"],))
    d.schedule()
    assert sorted(d.builders) == jobs[:workdirs.MAX_BUILDERS]
    deadline = time.time() + 30
    while any(db.get(con, j)["state"] == "queued" for j in jobs) and time.time() < deadline:
        d.reap()
        d.schedule()
        assert len(d.builders) <= workdirs.MAX_BUILDERS
        time.sleep(0.02)
    assert all(db.get(con, j)["state"] == "running" for j in jobs)


def _flip(path, offset):
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


def test_a_damaged_or_cut_blob_fails_its_job_leaves_the_store_and_is_sent_again(tmp_path):
    """A flipped byte in a pack, a pack cut short, a flipped byte in a large loose blob: the
    job that needs them fails saying so, they leave the store, and the next submit's blobs
    (what store.missing() asks for) repair it."""
    home = _home(tmp_path)
    con, job_id, entries = _queue(home, 4)
    big = os.urandom(3 << 20)
    big_hash = hashlib.sha256(big).hexdigest()
    st = store.Store(home.store)
    st.receive(io.BytesIO(b"%s %d\n%s" % (big_hash.encode(), len(big), big) + b"END\n"))
    entries.append({"path": "big.bin", "type": "file", "size": len(big), "hash": big_hash})
    with open(home.job(job_id).manifest, "w") as f:
        json.dump({"entries": entries}, f)
    packs = os.path.join(home.store, "packs")
    pack = os.path.join(packs, os.listdir(packs)[0])
    where = st.lookup([entries[1]["hash"]])[entries[1]["hash"]]
    _flip(pack, where[1])                      # d1/f1.txt: one flipped byte
    _flip(st.path(big_hash), 123456)           # big.bin: one flipped byte
    d = daemon.Daemon(home, ["agent"])
    assert _settle(d, con, job_id) == []
    row = db.get(con, job_id)
    assert row["state"] == "failed", row["message"]
    assert "the store's copy of big.bin" in row["message"] and "damaged" in row["message"] and \
        "(and 1 more)" in row["message"] and "submit again" in row["message"], row["message"]
    assert st.missing([e["hash"] for e in entries]) == [entries[1]["hash"], big_hash]
    # a pack cut short: missing at once, before any job trips on it
    last = entries[3]["hash"]
    os.truncate(pack, st.lookup([last])[last][1] + 1)
    assert last in st.missing([last])
    # the next submit sends them again, and a job on the same tree is built right
    frames = b"".join(b"%s %d\n%s" % (h.encode(), len(b), b) for h, b in [
        (entries[1]["hash"], b"file 1\n"), (entries[3]["hash"], b"file 3\n"), (big_hash, big)])
    st.receive(io.BytesIO(frames + b"END\n"))
    assert st.missing([e["hash"] for e in entries]) == []
    job2 = db.insert_job(con, {"name": "t", "command": "true", "gpus": 0, "priority": 0,
                               "retries": 0, "files": len(entries)})
    os.makedirs(home.job(job2).dir)
    with open(home.job(job2).manifest, "w") as f:
        json.dump({"entries": entries}, f)
    assert _settle(d, con, job2) == [job2]
    with open(os.path.join(home.job(job2).work, "d1", "f1.txt"), "rb") as f:
        assert f.read() == b"file 1\n"
    with open(os.path.join(home.job(job2).work, "big.bin"), "rb") as f:
        assert f.read() == big
