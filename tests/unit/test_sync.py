"""launcher/selection.py, hashcache.py and sync.py: file selection (git and plain trees), the hash
cache, the manifest and the blob stream, checked end to end against the agent's store with real
files and real git."""
import hashlib
import io
import os
import shutil
import stat
import subprocess

import pytest

from launcher import hashcache, selection, sync
from launcher.agent.materialize import materialize
from launcher.agent.store import Store, StoreError

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")

WEIRD = ["with space.py", "quote'single.py", 'quote"double.py', "new\nline.py", "tab\there.py",
         "café.py", "日本/データ.txt", "-rf", "--help", "sub dir/-n.py"]


def git(root, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(k, None)
    return subprocess.run(["git", "-C", str(root)] + list(args), check=True, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE).stdout


def select_files(root):
    """(sorted paths, warnings) a sync of root takes."""
    paths, warnings, _stats, _in_git = selection.select(os.path.abspath(root))
    return paths, warnings


def git_info(root):
    """What a job records of root's git state: {"commit", "dirty"}, or None outside git."""
    if not selection.in_git_work_tree(root):
        return None
    return selection.GitStatus(root).result()


def write(root, rel, data=b"x", mode=None):
    p = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    if mode is not None:
        os.chmod(p, mode)
    return p


def make_tree(root):
    """A tree with every kind of ignore rule; returns what must be selected."""
    write(root, ".gitignore", "*.log\nbuild/\n/top.txt\n!keep.log\n# comment\n\nnode_modules\n")
    write(root, "train.py")
    write(root, "top.txt")                      # anchored: ignored here...
    write(root, "lib/top.txt")                  # ...but not below
    write(root, "run.log")                      # ignored
    write(root, "keep.log")                     # re-included
    write(root, "build/out.bin")                # ignored dir
    write(root, "lib/build/x.o")                # dir pattern matches at any depth
    write(root, "lib/node_modules/m.js")        # bare name matches dirs at any depth
    write(root, "lib/model.py")
    write(root, "lib/.gitignore", "*.tmp\n!important.tmp\nlocal/\n")
    write(root, "lib/a.tmp")                    # ignored by nested file
    write(root, "lib/important.tmp")            # re-included by nested file
    write(root, "lib/local/secret.txt")         # ignored dir (nested rule)
    write(root, "other/a.tmp")                  # nested rule does not apply here
    write(root, "data/big.bin")                 # .rtrainignore
    write(root, "ckpt/e1.ckpt")                 # .rtrainignore
    write(root, "ckpt/notes.md")
    write(root, ".rtrainignore", "data/\n*.ckpt\n")
    for w in WEIRD:
        write(root, w, w)
    return sorted([".gitignore", ".rtrainignore", "train.py", "lib/top.txt", "keep.log",
                   "lib/model.py", "lib/.gitignore", "lib/important.tmp", "other/a.tmp",
                   "ckpt/notes.md"] + WEIRD)


def test_plain_tree_applies_every_gitignore_and_rtrainignore(tmp_path):
    root = tmp_path / "plain"
    expected = make_tree(root)
    write(root, ".git/config", "not a repo, but .git is never sent")
    write(root, "lib/.git", "gitdir: somewhere")
    paths, warnings = select_files(str(root))
    assert paths == expected
    assert warnings == []


def test_git_selection_matches_the_plain_walk(tmp_path):
    """The same tree, all untracked in a fresh repo: git and the pathspec walk agree."""
    root = tmp_path / "repo"
    expected = make_tree(root)
    git(root, "init", "-q")
    paths, warnings = select_files(str(root))
    assert paths == expected
    assert warnings == []
    listed = git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split(b"\0")
    assert set(paths) <= {os.fsdecode(p) for p in listed if p}


def test_git_tracked_ignored_deleted_and_subdir_root(tmp_path):
    root = tmp_path / "repo"
    make_tree(root)
    git(root, "init", "-q")
    write(root, "forced.log", "tracked although ignored")
    write(root, "gone.py", "tracked then deleted")
    git(root, "add", "-A")
    git(root, "add", "-f", "forced.log")
    git(root, "commit", "-q", "-m", "init")
    os.unlink(str(root / "gone.py"))
    write(root, "untracked.py")
    write(root, "debug.log")  # ignored, untracked
    paths, _ = select_files(str(root))
    assert "forced.log" in paths            # git takes tracked files even if they match .gitignore
    assert "gone.py" not in paths           # deleted but still in the index
    assert "untracked.py" in paths
    assert "debug.log" not in paths
    assert "data/big.bin" not in paths      # .rtrainignore on top of git

    # root below the repo's top: its files only, relative to it, parents' .gitignore in force
    write(root, "lib/new.log")
    sub, _ = select_files(str(root / "lib"))
    assert sub == sorted([".gitignore", "important.tmp", "model.py", "top.txt"])
    m = sync.build_manifest(str(root / "lib"), cache_path=str(tmp_path / "c.sqlite"))
    assert m["git"]["commit"] == git(root, "rev-parse", "HEAD").decode().strip()
    assert m["git"]["dirty"] is False       # lib/new.log is ignored; untracked.py is outside lib
    write(root, "lib/extra.py")
    assert git_info(str(root / "lib"))["dirty"] is True


def test_git_submodule_and_nested_repo_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "repo"
    write(root, "a.py")
    git(root, "init", "-q")
    os.makedirs(str(root / "vendor/lib"))
    git(root, "update-index", "--add", "--cacheinfo", "160000,%s,vendor/lib" % ("1" * 40))
    nested = root / "nested"
    write(nested, "n.py")
    git(nested, "init", "-q")
    paths, warnings = select_files(str(root))
    assert paths == ["a.py"]
    assert any("submodule vendor/lib" in w for w in warnings)
    assert any("nested/" in w and "nested git repository" in w for w in warnings)


def test_git_info_commit_and_dirty(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    assert git_info(str(root)) is None
    git(root, "init", "-q")
    assert git_info(str(root)) == {"commit": None, "dirty": False}  # no commits, empty
    write(root, ".gitignore", "*.log\n")
    write(root, "a.py", "1")
    m = sync.build_manifest(str(root), cache_path=str(tmp_path / "c.sqlite"))
    assert m["git"] == {"commit": None, "dirty": True}
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "one")
    head = git(root, "rev-parse", "HEAD").decode().strip()
    assert git_info(str(root)) == {"commit": head, "dirty": False}
    write(root, "x.log")  # ignored: still clean
    assert git_info(str(root))["dirty"] is False
    write(root, "new.py")  # untracked, not ignored: dirty
    assert git_info(str(root))["dirty"] is True
    os.unlink(str(root / "new.py"))
    write(root, "a.py", "2")  # modified
    assert git_info(str(root))["dirty"] is True
    # dirtiness is scoped to root when root is a subdirectory
    write(root, "a.py", "1")
    write(root, "clean/c.py")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "two")
    write(root, "a.py", "3")
    assert git_info(str(root / "clean"))["dirty"] is False
    assert git_info(str(root))["dirty"] is True
    outside = sync.build_manifest(str(tmp_path / "repo"), cache_path=str(tmp_path / "c.sqlite"))
    assert outside["git"]["commit"] != head


def test_plain_tree_has_no_git(tmp_path):
    write(tmp_path / "p", "a.py")
    m = sync.build_manifest(str(tmp_path / "p"), cache_path=str(tmp_path / "c.sqlite"))
    assert m["git"] is None


@pytest.fixture
def counted(monkeypatch):
    reads = []
    real = sync._hash_file

    def spy(path, expect=None, **kw):
        reads.append(os.path.basename(path))
        return real(path, expect, **kw)
    monkeypatch.setattr(sync, "_hash_file", spy)
    return reads


def test_cache_avoids_rereads_and_notices_changes(tmp_path, counted):
    root = tmp_path / "p"
    write(root, "a.py", "aaaa")
    write(root, "b.py", "bbbb")
    cache = tmp_path / "cache" / "hashes.sqlite"
    m1 = sync.build_manifest(str(root), cache_path=str(cache))
    assert sorted(counted) == ["a.py", "b.py"]
    assert stat.S_IMODE(os.stat(str(cache.parent)).st_mode) == 0o700
    del counted[:]
    m2 = sync.build_manifest(str(root), cache_path=str(cache))
    assert counted == []
    assert m2["entries"] == m1["entries"]

    # same size, new content, new mtime: re-read, new hash
    p = write(root, "a.py", "AAAA")
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10 ** 9))
    m3 = sync.build_manifest(str(root), cache_path=str(cache))
    assert counted == ["a.py"]
    a = [e for e in m3["entries"] if e["path"] == "a.py"][0]
    assert a["hash"] == hashlib.sha256(b"AAAA").hexdigest()

    # replaced by another file (new inode) with the same size and mtime: re-read
    del counted[:]
    st = os.stat(p)
    tmp = write(root, "a.new", "ZZZZ")
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, p)
    m4 = sync.build_manifest(str(root), cache_path=str(cache))
    assert counted == ["a.py"]
    assert [e["hash"] for e in m4["entries"] if e["path"] == "a.py"] == [hashlib.sha256(b"ZZZZ").hexdigest()]


def test_cache_default_path_and_broken_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert hashcache.default_cache_path() == str(tmp_path / "home/.cache/rtrain/hashes.sqlite")
    write(tmp_path / "p", "a.py")
    bad = write(tmp_path, "bad.sqlite", b"this is not a database" * 100)
    m = sync.build_manifest(str(tmp_path / "p"), cache_path=bad)  # degrades, does not fail
    assert [e["path"] for e in m["entries"]] == ["a.py"]


def test_manifest_fields_symlinks_and_largest(tmp_path):
    root = tmp_path / "p"
    write(root, "run.sh", "#!/bin/sh\n", mode=0o755)
    write(root, "group_x.sh", "#!/bin/sh\n", mode=0o610)   # any x bit counts
    write(root, "big.bin", b"\0" * 5000)
    write(root, "src/mod.py", "print(1)\n")
    write(root, "real/data.txt", "d")
    os.symlink("src/mod.py", str(root / "inside"))
    os.symlink("../real", str(root / "src" / "datadir"))   # symlink to a dir: one entry
    os.symlink("/etc/passwd", str(root / "abs"))
    os.symlink("../../outside.txt", str(root / "src" / "out"))
    os.symlink("nowhere", str(root / "dangling_inside"))
    os.symlink("../../../nowhere", str(root / "src" / "dangling_out"))
    write(tmp_path, "escape_target.txt", "x")
    os.symlink(str(tmp_path), str(root / "tmpdir"))
    os.symlink("tmpdir/escape_target.txt", str(root / "via_link"))  # relative, but resolves outside
    m = sync.build_manifest(str(root), cache_path=str(tmp_path / "c.sqlite"))
    by = {e["path"]: e for e in m["entries"]}
    assert by["run.sh"]["exec"] is True and by["group_x.sh"]["exec"] is True
    assert by["src/mod.py"] == {"path": "src/mod.py", "type": "file", "size": 9, "exec": False,
                                "hash": hashlib.sha256(b"print(1)\n").hexdigest()}
    assert by["inside"] == {"path": "inside", "type": "symlink", "target": "src/mod.py"}
    assert by["src/datadir"] == {"path": "src/datadir", "type": "symlink", "target": "../real"}
    assert by["dangling_inside"]["type"] == "symlink"
    assert "src/datadir/data.txt" not in by  # never followed
    for gone in ("abs", "src/out", "src/dangling_out", "tmpdir", "via_link"):
        assert gone not in by
    assert "skipped symlink abs -> /etc/passwd: points outside the tree" in m["warnings"]
    assert any(w.startswith("skipped symlink src/out -> ../../outside.txt") for w in m["warnings"])
    assert any(w.startswith("skipped symlink via_link") for w in m["warnings"])
    assert m["total_size"] == 10 + 10 + 5000 + 9 + 1
    assert [e["path"] for e in m["entries"]] == sorted(by)
    assert sync.largest_files(m, 2) == [("big.bin", 5000), ("group_x.sh", 10)]
    assert len(sync.largest_files(m)) == 5


def test_symlinks_in_git_are_entries_too(tmp_path):
    root = tmp_path / "repo"
    write(root, "real/d.txt", "d")
    os.symlink("real", str(root / "alias"))
    os.symlink("/etc/passwd", str(root / "pw"))
    git(root, "init", "-q")
    m = sync.build_manifest(str(root), cache_path=str(tmp_path / "c.sqlite"))
    assert [(e["path"], e["type"]) for e in m["entries"]] == [("alias", "symlink"), ("real/d.txt", "file")]
    assert any("pw -> /etc/passwd" in w for w in m["warnings"])


def round_trip(tmp_path, root, git_repo):
    if git_repo:
        git(root, "init", "-q")
    m = sync.build_manifest(str(root), cache_path=str(tmp_path / "c.sqlite"))
    st = Store(str(tmp_path / "store"))
    wanted = st.missing(sorted({e["hash"] for e in m["entries"] if e["type"] == "file"}))
    raw = b"".join(sync.iter_blob_frames(str(root), m, wanted + wanted[:1], chunk=7))
    got = st.receive(io.BytesIO(raw))
    assert got["count"] == len(wanted)  # each hash sent once
    assert st.missing(wanted) == []
    dest = tmp_path / "job" / "work"
    materialize(st, m["entries"], str(dest))
    return m, dest


@pytest.mark.parametrize("git_repo", [True, False])
def test_round_trip_manifest_frames_store_materialize(tmp_path, git_repo):
    root = tmp_path / "src"
    for w in WEIRD:
        write(root, w, "content of " + w)
    write(root, "dup1.txt", "same")
    write(root, "dup2.txt", "same")           # two paths, one blob
    write(root, "empty.txt", "")
    write(root, "bin/tool", "#!/bin/sh\necho ok\n", mode=0o755)
    write(root, "big.bin", os.urandom(100000))
    os.symlink("bin/tool", str(root / "tool-link"))
    os.symlink("/etc/passwd", str(root / "pw"))
    m, dest = round_trip(tmp_path, root, git_repo)
    for e in m["entries"]:
        src, dst = root / e["path"], dest / e["path"]
        if e["type"] == "symlink":
            assert os.readlink(str(dst)) == os.readlink(str(src))
        else:
            assert dst.read_bytes() == src.read_bytes()
            assert stat.S_IMODE(os.stat(str(dst)).st_mode) == (0o755 if e["exec"] else 0o644)
    paths = {e["path"] for e in m["entries"]}
    assert set(WEIRD) <= paths
    assert os.access(str(dest / "bin/tool"), os.X_OK)
    assert not os.access(str(dest / "dup1.txt"), os.X_OK)
    assert os.path.islink(str(dest / "tool-link"))
    assert not os.path.lexists(str(dest / "pw"))
    assert subprocess.run([str(dest / "tool-link")], stdout=subprocess.PIPE).stdout == b"ok\n"


def test_stream_refuses_a_file_changed_since_hashing(tmp_path):
    root = tmp_path / "src"
    write(root, "small.txt", "original")
    write(root, "large.bin", b"L" * 1000)
    m = sync.build_manifest(str(root), cache_path=str(tmp_path / "c.sqlite"))
    hashes = {e["path"]: e["hash"] for e in m["entries"]}

    write(root, "small.txt", "changed!")  # same size
    # the bytes read to hash it were kept: those are sent, the snapshot as it was hashed
    assert m["_kept"][hashes["small.txt"]] == b"original"
    assert b"".join(sync.iter_blob_frames(str(root), dict(m), [hashes["small.txt"]])) == (
        "%s 8\n" % hashes["small.txt"]).encode() + b"original" + b"END\n"
    # not kept (over Kept's limits, or hashed by an earlier submit): read again, and refused
    m["_kept"] = {}
    with pytest.raises(sync.SyncError, match="small.txt changed since it was hashed"):
        list(sync.iter_blob_frames(str(root), m, [hashes["small.txt"]]))

    # a large file (many chunks) changed in its middle: error before the frame completes,
    # and what was sent leaves nothing in the store
    write(root, "large.bin", b"L" * 500 + b"M" + b"L" * 499)
    st = Store(str(tmp_path / "store"))
    sent = []
    with pytest.raises(sync.SyncError, match="large.bin"):
        for part in sync.iter_blob_frames(str(root), m, [hashes["large.bin"]], chunk=64):
            sent.append(part)
    assert sum(len(p) for p in sent) < 65 + 1000
    with pytest.raises(StoreError):
        st.receive(io.BytesIO(b"".join(sent)))
    assert st.missing([hashes["large.bin"]]) == [hashes["large.bin"]]

    # shorter / longer / gone
    write(root, "large.bin", b"L" * 999)
    with pytest.raises(sync.SyncError):
        list(sync.iter_blob_frames(str(root), m, [hashes["large.bin"]], chunk=64))
    write(root, "large.bin", b"L" * 1001)
    with pytest.raises(sync.SyncError):
        list(sync.iter_blob_frames(str(root), m, [hashes["large.bin"]], chunk=64))
    os.unlink(str(root / "large.bin"))
    with pytest.raises(sync.SyncError):
        list(sync.iter_blob_frames(str(root), m, [hashes["large.bin"]], chunk=64))
    with pytest.raises(sync.SyncError, match="not in this snapshot"):
        list(sync.iter_blob_frames(str(root), m, ["0" * 64]))


def test_frames_format(tmp_path):
    root = tmp_path / "src"
    write(root, "a", "hello")
    m = sync.build_manifest(str(root), cache_path=str(tmp_path / "c.sqlite"))
    h = m["entries"][0]["hash"]
    assert b"".join(sync.iter_blob_frames(str(root), m, [h])) == (h + " 5\nhello").encode() + b"END\n"
    assert b"".join(sync.iter_blob_frames(str(root), m, [])) == b"END\n"
