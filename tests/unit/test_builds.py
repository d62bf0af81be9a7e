"""Artifacts built once per key (builds.py): published only when complete, a failure kept as a
record and never as an artifact, one builder per key; a data tree (datatree.py) of copies
into the store, read-only."""
import hashlib
import io
import os
import time

from launcher.agent import builds, datatree
from launcher.agent.store import Store


def wait_child(b, pid):
    _, status = os.waitpid(pid, 0)
    b.ended(pid)
    return os.waitstatus_to_exitcode(status)


def test_success_publishes_and_failure_is_not_kept(tmp_path):
    b = builds.Builds(str(tmp_path))

    def good(dest, log):
        os.mkdir(dest)
        open(os.path.join(dest, "x"), "w").write("x")
        os.write(log, b"working\n")
        return {"kind": "test"}

    def bad(dest, log):
        os.mkdir(dest)
        os.write(log, b"ERROR: it broke\n")
        raise builds.BuildError("the setup failed (exit code 1)")

    key, key2 = "a" * 32, "b" * 32
    assert wait_child(b, b.start("env", key, good)) == 0
    rec = b.ready("env", key)
    assert rec["kind"] == "test" and rec["bytes"] > 0 and os.path.isfile(os.path.join(b.path("env", key), "x"))
    assert b.building("env", key) is None and "working" in b.tail("env", key)
    assert wait_child(b, b.start("env", key2, bad)) == 1
    assert b.ready("env", key2) is None and not os.path.exists(b.path("env", key2))
    failed = b.failed("env", key2)
    assert "exit code 1" in failed["message"] and "ERROR: it broke" in failed["tail"]
    assert b.keys("env") == {key, key2}
    assert b.remove("env", key) > 0 and b.keys("env") == {key2}


def test_one_builder_per_key(tmp_path):
    b = builds.Builds(str(tmp_path))
    key = "c" * 32

    def slow(dest, log):
        os.mkdir(dest)
        time.sleep(1.0)

    first = b.start("env", key, slow)
    time.sleep(0.3)
    assert builds.run_build(b.path("env", key), slow) == builds.BUSY  # another process's try
    assert b.remove("env", key) is None  # never removed while it is built
    assert wait_child(b, first) == 0 and b.ready("env", key) is not None


def test_data_tree_is_a_read_only_copy_the_store_never_shares(tmp_path):
    st = Store(str(tmp_path / "store"))
    big, small = os.urandom(2 << 20), b"small\n"
    hb, hs = hashlib.sha256(big).hexdigest(), hashlib.sha256(small).hexdigest()
    stream = b"%s %d\n%s%s %d\n%sEND\n" % (hb.encode(), len(big), big, hs.encode(), len(small), small)
    st.receive(io.BytesIO(stream))
    entries = [{"path": "data/c/big.bin", "type": "file", "hash": hb, "size": len(big), "exec": False},
               {"path": "data/c/s.txt", "type": "file", "hash": hs, "size": len(small), "exec": False},
               {"path": "data/c/link", "type": "symlink", "target": "s.txt"}]
    key = datatree.key_of(entries)
    assert key == datatree.key_of(list(reversed(entries))) and len(key) == 32
    b = builds.Builds(str(tmp_path))
    assert wait_child(b, b.start("data", key, datatree.build(st, entries))) == 0
    root = b.path("data", key)
    s_big = os.stat(os.path.join(root, "data/c/big.bin"))
    assert s_big.st_ino != os.stat(st.path(hb)).st_ino and s_big.st_nlink == 1  # a copy, not the blob
    assert open(os.path.join(root, "data/c/link")).read() == "small\n"
    assert s_big.st_mode & 0o777 == 0o444 and os.stat(os.path.join(root, "data/c")).st_mode & 0o777 == 0o555
    ready = b.ready("data", key)
    assert datatree.intact(root, ready)
    # a job owns these files: one that chmods and rewrites its data changes its tree (which is
    # then seen, and built again) but never the store
    p = os.path.join(root, "data/c/big.bin")
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"HACK")
    assert not datatree.intact(root, ready)
    assert hashlib.sha256(open(st.path(hb), "rb").read()).hexdigest() == hb
    assert b.remove("data", key) is not None and not os.path.exists(root)  # read-only folders too
