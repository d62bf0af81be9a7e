"""Odd trees on the client: a tracked folder replaced by a symlink, symlink chains that leave
the tree together, names that are not UTF-8, a tree that changes while submit reads it."""
import os
import subprocess

import pytest

from launcher import sync
from launcher.agent.manifest import ManifestError, check_entries, escaping_links
from launcher.errors import RtrainError, SyncError


def _git(root, *args):
    subprocess.run(["git", "-C", str(root)] + list(args), check=True, capture_output=True)


def _manifest(root, tmp_path):
    return sync.build_manifest(str(root), cache_path=str(tmp_path / "cache.sqlite"))


def test_a_tracked_folder_replaced_by_a_symlink_is_never_read_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("secret\n")
    root = tmp_path / "p"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.txt").write_text("tracked\n")
    (root / "a.py").write_text("print(1)\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    (root / "sub" / "x.txt").unlink()
    (root / "sub").rmdir()
    (root / "sub").symlink_to(outside)
    m = _manifest(root, tmp_path)
    paths = {e["path"] for e in m["entries"]}
    assert paths == {"a.py"}, m["entries"]
    assert any("sub" in w and "symlink" in w for w in m["warnings"]), m["warnings"]


def test_symlinks_that_leave_the_tree_together_are_dropped_here_and_refused_there(tmp_path):
    root = tmp_path / "p"
    (root / "x").mkdir(parents=True)
    (root / "x" / "f.txt").write_text("f\n")
    os.symlink("..", str(root / "x" / "y"))        # the root: inside
    os.symlink("y/..", str(root / "x" / "z"))      # lexically x/, really the root's parent
    os.symlink("z/etc", str(root / "x" / "w"))     # so this is outside too
    os.symlink("loop2", str(root / "loop1"))
    os.symlink("loop1", str(root / "loop2"))
    os.symlink("x/f.txt", str(root / "ok"))
    m = _manifest(root, tmp_path)
    links = {e["path"] for e in m["entries"] if e["type"] == "symlink"}
    assert links == {"x/y", "ok"}, m["entries"]
    for name in ("x/z", "x/w", "loop1", "loop2"):
        assert any(name + " ->" in w for w in m["warnings"]), (name, m["warnings"])
    check_entries(m["entries"])  # what is sent passes the host's check
    crafted = m["entries"] + [{"path": "x/z", "type": "symlink", "target": "y/.."}]
    assert escaping_links(crafted) == ["x/z"]
    with pytest.raises(ManifestError, match="x/z"):
        check_entries(crafted)


def test_a_file_name_that_is_not_utf8_is_sent_as_it_is(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    name = os.fsdecode(b"caf\xe9.txt")  # latin-1 bytes: not UTF-8
    with open(os.path.join(str(root), name), "w") as f:
        f.write("x")
    m = _manifest(root, tmp_path)
    assert [e["path"] for e in m["entries"]] == [name]
    check_entries(m["entries"])


@pytest.mark.parametrize("change", ["dir", "gone-parent", "fifo"])
def test_a_tree_that_changes_while_it_is_read_is_one_clear_error(tmp_path, monkeypatch, change):
    root = tmp_path / "p"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("x")
    real = sync.select

    def select_then_change(*a, **kw):
        out = real(*a, **kw)
        if change == "dir":      # the file became a folder
            (root / "d" / "f.txt").unlink()
            (root / "d" / "f.txt").mkdir()
        elif change == "gone-parent":  # its folder became a file
            (root / "d" / "f.txt").unlink()
            (root / "d").rmdir()
            (root / "d").write_text("now a file")
        else:                    # a FIFO: never opened blocking
            (root / "d" / "f.txt").unlink()
            os.mkfifo(str(root / "d" / "f.txt"))
        return out

    monkeypatch.setattr(sync, "select", select_then_change)
    try:
        m = _manifest(root, tmp_path)
    except SyncError as e:
        assert isinstance(e, RtrainError) and "d/f.txt" in e.message and e.hint, e
    else:  # or it is seen as it is now, and left out
        assert [e["path"] for e in m["entries"]] == [], m
