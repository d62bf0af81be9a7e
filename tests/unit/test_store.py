"""launcher/agent/store.py: the content-addressed store on the GPU host and job work dirs."""
import ast
import hashlib
import io
import os
import stat
import sys

import pytest

from launcher.agent import packs as packsmod
from launcher.agent import store as storemod
from launcher.agent.manifest import ManifestError
from launcher.agent.materialize import materialize
from launcher.agent.store import Store, StoreError
from support import blob_bytes as read
from support import store_blobs as stored


def sha(b):
    return hashlib.sha256(b).hexdigest()


def frame(data, h=None, size=None):
    h = h or sha(data)
    return ("%s %d\n" % (h, len(data) if size is None else size)).encode() + data


def stream(*blobs, end=True):
    return io.BytesIO(b"".join(frame(b) for b in blobs) + (b"END\n" if end else b""))


def blob_files(root):
    out = []
    for d, _, files in os.walk(str(root)):
        out.extend(os.path.join(d, f) for f in files)
    return sorted(out)


def mode(p):
    return stat.S_IMODE(os.lstat(str(p)).st_mode)


def packs(root):
    d = os.path.join(str(root), "packs")
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def test_receive_stores_verified_read_only_blobs(tmp_path):
    st = Store(tmp_path / "store")
    a, b = b"hello\n", b"x" * (3 << 20)  # one small (packed), one large (a loose file)
    assert st.missing([sha(a), sha(b), sha(a)]) == [sha(a), sha(b)]
    assert st.receive(stream(a, b)) == {"count": 2, "bytes": len(a) + len(b)}
    assert st.missing([sha(a), sha(b)]) == []
    assert read(st, sha(a)) == a and read(st, sha(b)) == b
    p = st.path(sha(b))
    assert p == os.path.join(str(tmp_path / "store"), sha(b)[:2], sha(b)[2:])
    assert open(p, "rb").read() == b
    assert mode(p) == 0o444
    assert mode(os.path.dirname(p)) == 0o700
    assert mode(tmp_path / "store") == 0o700
    (pack,) = packs(tmp_path / "store")  # the small one: one pack for the stream
    assert open(pack, "rb").read() == a
    assert mode(pack) == 0o444 and mode(os.path.dirname(pack)) == 0o700
    assert not os.path.exists(st.path(sha(a)))
    # sending a blob that is already there is fine
    assert st.receive(stream(a))["count"] == 1
    assert read(st, sha(a)) == a
    assert st.receive(io.BytesIO(b"END\n")) == {"count": 0, "bytes": 0}
    # many small blobs in one stream: one file in the store, each read back whole
    many = [("blob %d\n" % i).encode() * (i + 1) for i in range(300)] + [a]
    st.receive(stream(*many))
    assert len(packs(tmp_path / "store")) == 3
    assert all(read(st, sha(x)) == x for x in many)
    assert st.missing([sha(x) for x in many]) == []
    assert stored(tmp_path / "store") == sorted({sha(x) for x in many + [b]})


@pytest.mark.parametrize("cut", ["in_data", "after_frame", "in_header", "empty"])
def test_truncated_stream_keeps_complete_blobs_and_no_partial_one(tmp_path, cut):
    st = Store(tmp_path / "store")
    good, second = b"complete blob", b"second blob that will be cut" * 1000
    data = frame(good) + frame(second)
    if cut == "in_data":
        raw = data[:-100]
    elif cut == "after_frame":
        raw = data  # no END line
    elif cut == "in_header":
        raw = frame(good) + frame(second)[:30]
    else:
        raw = b""
    with pytest.raises(StoreError) as ei:
        st.receive(io.BytesIO(raw))
    assert "ended early" in str(ei.value) or "header" in str(ei.value)
    files = blob_files(tmp_path / "store")
    if cut == "empty":
        assert files == []
    elif cut == "after_frame":  # both frames were complete and verified: both kept
        assert st.missing([sha(good), sha(second)]) == []
    else:
        # the complete one is kept (a retry sends less), of the cut one not a byte
        assert st.missing([sha(good), sha(second)]) == [sha(second)]
        (pack,) = packs(tmp_path / "store")
        assert open(pack, "rb").read() == good
    assert [f for f in os.listdir(str(tmp_path / "store")) if f.startswith(".tmp")] == []


def test_hash_mismatch_is_rejected(tmp_path):
    st = Store(tmp_path / "store")
    claimed = sha(b"what the client said")
    raw = frame(b"ok") + frame(b"what arrived!!!!!!!!", h=claimed) + b"END\n"
    with pytest.raises(StoreError, match="hash"):
        st.receive(io.BytesIO(raw))
    assert not st.missing([sha(b"ok")])
    assert st.missing([claimed]) == [claimed]
    (pack,) = packs(tmp_path / "store")
    assert open(pack, "rb").read() == b"ok"  # nothing of the bad one
    assert [f for f in os.listdir(str(tmp_path / "store")) if f.startswith(".tmp")] == []


@pytest.mark.parametrize("header", [b"nothex 3\n", b"%s -1\n" % (b"a" * 64), b"%s\n" % (b"a" * 64),
                                    b"%s 3" % (b"A" * 64), b"x" * 500])
def test_bad_header_is_rejected(tmp_path, header):
    st = Store(tmp_path / "store")
    with pytest.raises(StoreError):
        st.receive(io.BytesIO(header + b"abc" + b"END\n"))
    assert blob_files(tmp_path / "store") == []


def test_missing_rejects_non_hashes(tmp_path):
    with pytest.raises(ManifestError):
        Store(tmp_path / "s").missing(["../../etc/passwd"])


def put(st, *blobs):
    st.receive(stream(*blobs))
    return [sha(b) for b in blobs]


def test_materialize_copies_modes_dirs_and_symlinks(tmp_path):
    st = Store(tmp_path / "store")
    ha, hb = put(st, b"print(1)\n", b"#!/bin/sh\necho hi\n")
    entries = [
        {"path": "a.py", "type": "file", "hash": ha, "size": 9, "exec": False},
        {"path": "deep/er/run.sh", "type": "file", "hash": hb, "size": 18, "exec": True},
        {"path": "same.py", "hash": ha, "size": 9, "exec": False},  # type defaults to file
        {"path": "link", "type": "symlink", "target": "deep/er/run.sh"},
        {"path": "deep/up", "type": "symlink", "target": "../a.py"},
    ]
    dest = tmp_path / "job" / "work"
    materialize(st, entries, str(dest))
    assert (dest / "a.py").read_bytes() == b"print(1)\n"
    assert (dest / "same.py").read_bytes() == b"print(1)\n"
    assert mode(dest / "a.py") == 0o644
    assert mode(dest / "deep/er/run.sh") == 0o755
    assert os.readlink(str(dest / "link")) == "deep/er/run.sh"
    assert (dest / "deep/up").read_bytes() == b"print(1)\n"
    # copies, never hard links to the store (a pack, or a loose blob)
    big = os.urandom(3 << 20)
    (hbig,) = put(st, big)
    materialize(st, [{"path": "big", "type": "file", "hash": hbig, "size": len(big), "exec": False}],
                   str(tmp_path / "job2"))
    assert (tmp_path / "job2" / "big").read_bytes() == big
    assert os.stat(str(tmp_path / "job2" / "big")).st_ino != os.stat(st.path(hbig)).st_ino
    assert os.stat(str(tmp_path / "job2" / "big")).st_nlink == 1
    assert os.stat(st.path(hbig)).st_nlink == 1
    assert os.stat(str(dest / "a.py")).st_nlink == 1
    assert all(os.stat(p).st_nlink == 1 for p in packs(tmp_path / "store"))


@pytest.mark.parametrize("path", ["../x", "/etc/x", "a/../../x", "a/..", "..", "", "a//b", "a/",
                                  "./a", "a/./b", "a\0b", None, 3])
def test_materialize_rejects_bad_paths(tmp_path, path):
    st = Store(tmp_path / "store")
    (h,) = put(st, b"payload")
    dest = tmp_path / "w" / "work"
    with pytest.raises(ManifestError, match="bad path"):
        materialize(st, [{"path": path, "type": "file", "hash": h, "size": 7, "exec": False}], str(dest))
    assert not (tmp_path / "w" / "x").exists()
    assert not (tmp_path / "x").exists()


def test_materialize_never_writes_through_a_symlink(tmp_path):
    st = Store(tmp_path / "store")
    (h,) = put(st, b"evil")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "work"
    # the symlink itself is inside the tree (target "sub"), but "sub" could be anything later
    (dest / "sub").mkdir(parents=True)
    for lnk_target in ("sub", "."):
        d = tmp_path / ("work-" + lnk_target.replace(".", "dot"))
        with pytest.raises(ManifestError, match="through the symlink"):
            materialize(st, [
                {"path": "sub/keep", "type": "file", "hash": h, "size": 4, "exec": False},
                {"path": "lnk", "type": "symlink", "target": lnk_target},
                {"path": "lnk/x", "type": "file", "hash": h, "size": 4, "exec": False},
            ], str(d))
        assert not (d / "sub" / "x").exists() and not (d / "x").exists()
    # a symlink already in dest that points outside: still refused
    d = tmp_path / "work2"
    d.mkdir()
    os.symlink(str(outside), str(d / "out"))
    with pytest.raises(ManifestError, match="through the symlink"):
        materialize(st, [{"path": "out/x", "type": "file", "hash": h, "size": 4, "exec": False}], str(d))
    assert list(outside.iterdir()) == []
    # and a file entry that names an existing symlink does not write through it
    d = tmp_path / "work3"
    d.mkdir()
    os.symlink(str(outside / "victim"), str(d / "f"))
    with pytest.raises(ManifestError):
        materialize(st, [{"path": "f", "type": "file", "hash": h, "size": 4, "exec": False}], str(d))
    assert not (outside / "victim").exists()


@pytest.mark.parametrize("path,target", [("l", "/etc/passwd"), ("l", "../x"), ("d/l", "a/../../../x"),
                                         ("d/l", "../.."), ("l", ""), ("l", "a\0b")])
def test_materialize_rejects_symlinks_leaving_the_tree(tmp_path, path, target):
    st = Store(tmp_path / "store")
    with pytest.raises(ManifestError, match="symlink"):
        materialize(st, [{"path": path, "type": "symlink", "target": target}], str(tmp_path / "w"))


def test_materialize_accepts_symlink_up_within_tree(tmp_path):
    st = Store(tmp_path / "store")
    materialize(st, [{"path": "a/b/l", "type": "symlink", "target": "../../c/../d"}], str(tmp_path / "w"))
    assert os.readlink(str(tmp_path / "w/a/b/l")) == "../../c/../d"


def test_materialize_missing_blob_and_duplicates(tmp_path):
    st = Store(tmp_path / "store")
    h = sha(b"never sent")
    with pytest.raises(StoreError, match=h[:12]):
        materialize(st, [{"path": "f", "type": "file", "hash": h, "size": 1, "exec": False}],
                       str(tmp_path / "w"))
    (h2,) = put(st, b"x")
    e = {"path": "f", "type": "file", "hash": h2, "size": 1, "exec": False}
    with pytest.raises(ManifestError, match="twice"):
        materialize(st, [e, e], str(tmp_path / "w2"))
    with pytest.raises(ManifestError, match="through the file"):
        materialize(st, [e, dict(e, path="f/g")], str(tmp_path / "w3"))
    with pytest.raises(ManifestError, match="unknown type"):
        materialize(st, [dict(e, type="fifo")], str(tmp_path / "w4"))
    with pytest.raises(ManifestError, match="sha256"):
        materialize(st, [dict(e, hash="../../x")], str(tmp_path / "w5"))


def test_isolation_job_rewriting_its_files_changes_nothing_else(tmp_path):
    """docs/design.md "Snapshots": a job that rewrites a file in place must not change the store or
    another job's copy (hard links would)."""
    st = Store(tmp_path / "store")
    original = b"learning_rate = 3e-4\n" * 100
    (h,) = put(st, original)
    entries = [{"path": "cfg/train.py", "type": "file", "hash": h, "size": len(original), "exec": False},
               {"path": "run.sh", "type": "file", "hash": h, "size": len(original), "exec": True}]
    job1, job2 = tmp_path / "jobs/1/work", tmp_path / "jobs/2/work"
    materialize(st, entries, str(job1))
    materialize(st, entries, str(job2))

    # job 1 rewrites a file in place (same inode)
    with open(str(job1 / "cfg/train.py"), "r+b") as f:
        f.write(b"HACKED")
    # and chmods + rewrites the other one
    os.chmod(str(job1 / "run.sh"), 0o777)
    with open(str(job1 / "run.sh"), "r+b") as f:
        f.seek(0)
        f.write(b"rm -rf ~ #")
        f.truncate()
    assert (job1 / "cfg/train.py").read_bytes().startswith(b"HACKED")

    data = read(st, h)
    assert data == original and sha(data) == h
    assert all(mode(p) == 0o444 for p in packs(tmp_path / "store"))
    assert (job2 / "cfg/train.py").read_bytes() == original
    assert (job2 / "run.sh").read_bytes() == original
    assert mode(job2 / "run.sh") == 0o755
    # a third job materialized afterwards still gets the original
    job3 = tmp_path / "jobs/3/work"
    materialize(st, entries, str(job3))
    assert (job3 / "run.sh").read_bytes() == original


def test_copy_falls_back_without_copy_file_range(tmp_path, monkeypatch):
    st = Store(tmp_path / "store")
    data = os.urandom(3 << 20)
    (h,) = put(st, data)

    def nope(*a, **k):
        raise OSError(18, "EXDEV")  # cross-device: fall back to read/write
    monkeypatch.setattr(packsmod.os, "copy_file_range", nope, raising=False)
    materialize(st, [{"path": "f", "type": "file", "hash": h, "size": len(data), "exec": False}],
                   str(tmp_path / "w"))
    assert (tmp_path / "w/f").read_bytes() == data


def test_gc_deletes_unkept_blobs(tmp_path):
    st = Store(tmp_path / "store")
    ha, hb = put(st, b"keep me", b"drop me")
    stale = tmp_path / "store" / ".tmp-stale"
    stale.write_bytes(b"half")
    os.utime(str(stale), (1, 1))
    res = st.gc([ha])
    assert res == {"count": 1, "bytes": 7}
    assert st.missing([ha, hb]) == [hb]
    assert not stale.exists()


def test_gc_writes_a_pack_again_with_the_kept_blobs(tmp_path):
    st = Store(tmp_path / "store")
    h1, h2, h3 = put(st, b"one", b"two!", b"three")
    (old,) = packs(tmp_path / "store")
    assert st.gc([h1, h3]) == {"count": 1, "bytes": 4}
    assert st.missing([h1, h2, h3]) == [h2]
    assert read(st, h1) == b"one" and read(st, h3) == b"three"
    (new,) = packs(tmp_path / "store")
    assert new != old and open(new, "rb").read() == b"onethree"
    assert st.gc([]) == {"count": 2, "bytes": 8}
    assert packs(tmp_path / "store") == []
    dest = tmp_path / "w"
    with pytest.raises(StoreError, match=h1[:12]):
        materialize(st, [{"path": "f", "type": "file", "hash": h1, "size": 3, "exec": False}], str(dest))


def test_a_lost_pack_counts_as_missing_and_is_sent_again(tmp_path):
    st = Store(tmp_path / "store")
    ha, hb = put(st, b"alpha", b"beta")
    for p in packs(tmp_path / "store"):
        os.chmod(p, 0o644)
        os.unlink(p)
    assert Store(tmp_path / "store").missing([ha, hb]) == [ha, hb]
    put(st, b"alpha")
    st2 = Store(tmp_path / "store")
    assert st2.missing([ha, hb]) == [hb] and read(st2, ha) == b"alpha"
    materialize(st2, [{"path": "a", "type": "file", "hash": ha, "size": 5, "exec": False}], str(tmp_path / "w"))
    assert (tmp_path / "w" / "a").read_bytes() == b"alpha"


def test_concurrent_receivers_share_one_store(tmp_path):
    import threading
    sets = [[("%d-%d" % (t, i)).encode() * 7 for i in range(200)] + [b"shared"] for t in range(4)]
    errors = []

    def go(blobs):
        try:
            Store(tmp_path / "store").receive(stream(*blobs))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=go, args=(b,)) for b in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    st = Store(tmp_path / "store")
    every = [b for bs in sets for b in bs]
    assert st.missing([sha(b) for b in every]) == []
    entries = [{"path": "f%d" % i, "type": "file", "hash": sha(b), "size": len(b), "exec": False}
               for i, b in enumerate(every)]
    materialize(st, entries, str(tmp_path / "w"))
    assert all((tmp_path / "w" / ("f%d" % i)).read_bytes() == b for i, b in enumerate(every))


def test_store_is_stdlib_only_and_py38_syntax():
    src = open(storemod.__file__).read()
    tree = ast.parse(src, feature_version=(3, 8))
    stdlib = getattr(sys, "stdlib_module_names", None)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level > 0 or node.module.split(".")[0] in (stdlib or {node.module.split(".")[0]})
            continue
        else:
            continue
        for n in names:
            if stdlib is not None:
                assert n.split(".")[0] in stdlib, n
    assert "removeprefix" not in src and "removesuffix" not in src
