"""Selection and a project: `!pattern` in .rtrainignore takes back what .gitignore ignores (in
git and outside it), ./rtrain-out is never sent, and a project's data go whatever git says."""
import subprocess

import pytest

from launcher import jobspec, project, sync
from launcher.selection import select


def tree(root, git_repo):
    (root / "data" / "x").mkdir(parents=True)
    (root / "data" / "x" / "input.txt").write_text("corpus")
    (root / "data" / "x" / "train.bin").write_text("bin")
    (root / "train.py").write_text("print(1)")
    (root / ".gitignore").write_text("data/\n")
    (root / ".rtrainignore").write_text("!data/x/input.txt\n")
    (root / "rtrain-out" / "3").mkdir(parents=True)
    (root / "rtrain-out" / "3" / "ckpt").write_text("pulled")
    if git_repo:
        subprocess.run(["git", "init", "-q", str(root)], check=True)


@pytest.mark.parametrize("git_repo", [False, True])
def test_negation_reincludes_and_pulled_files_stay_home(tmp_path, git_repo):
    tree(tmp_path, git_repo)
    paths = select(str(tmp_path))[0]
    assert "data/x/input.txt" in paths and "data/x/train.bin" not in paths
    assert not any(p.startswith("rtrain-out") for p in paths) and "train.py" in paths


def test_data_paths_go_whatever_git_says_and_split_from_code(tmp_path):
    tree(tmp_path, True)
    (tmp_path / ".rtrainignore").unlink()
    (tmp_path / "rtrain.yaml").write_text("data: [data/x]\noutputs: [out]\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.ckpt").write_text("x")
    (tmp_path / ".gitignore").write_text("data/\n")
    proj = project.load(str(tmp_path))
    m = sync.build_manifest(str(tmp_path), cache_path=str(tmp_path / "c.sqlite"),
                            extra=jobspec.data_files(str(tmp_path), proj))
    code, data = jobspec.split(m, proj)
    assert sorted(e["path"] for e in data) == ["data/x/input.txt", "data/x/train.bin"]
    assert "out/old.ckpt" not in [e["path"] for e in code] and "train.py" in [e["path"] for e in code]
    req = jobspec.request(proj, code)
    assert req["data"] == ["data/x"] and req["outputs"] == ["out"] and req["name"] == proj.project
