"""Which files of a tree a sync takes, following git (docs/design.md "Snapshots").

Inside a git work tree exactly what `git ls-files --cached --others --exclude-standard` lists
(run in `root`, so a root below the repository's top level takes that subdirectory only, with
paths relative to root and the .gitignore files of the levels above still in force); outside
git, a walk that applies every .gitignore at every level with pathspec's GitIgnoreSpec and
always leaves `.git` out. An optional `.rtrainignore` at root (same syntax) removes more in both
cases. Symlinks are never followed: a symlink is an entry of its own.
"""
import os
import stat
import subprocess

from .errors import SyncError

RTRAINIGNORE = ".rtrainignore"
_GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX",
                 "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR")


# ---------------------------------------------------------------------------- git

def _git_env():
    env = dict(os.environ)
    for k in _GIT_ENV_DROP:
        env.pop(k, None)
    env["GIT_OPTIONAL_LOCKS"] = "0"
    return env


def _git(root, *args, check=True):
    """Run git in root with an argv list; returns stdout bytes, or None if git is missing or
    (with check=False) failed."""
    try:
        p = subprocess.run(["git", "-C", root] + list(args), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_git_env())
    except OSError:
        return None
    if p.returncode != 0:
        if check:
            raise SyncError("git %s failed in %s: %s" % (
                " ".join(args), root, p.stderr.decode("utf-8", "replace").strip()))
        return None
    return p.stdout


def in_git_work_tree(root):
    out = _git(root, "rev-parse", "--is-inside-work-tree", check=False)
    return out is not None and out.strip() == b"true"


class GitStatus(object):
    """`git status --porcelain=v2 --branch` for root, started at once and read later, so it
    runs while the tree is listed and hashed: HEAD from its branch.oid header, dirty if it
    lists any entry (untracked-not-ignored included), limited to root."""

    def __init__(self, root):
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["git", "-C", root, "status", "--porcelain=v2", "--branch", "-z",
                 "--untracked-files=normal", "--", "."],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=_git_env())
        except OSError:
            self.proc = None
        self.root = root

    def result(self):
        if self.proc is None:
            raise SyncError("git status failed in %s: git not found" % self.root)
        out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise SyncError("git status failed in %s: %s" % (
                self.root, err.decode("utf-8", "replace").strip()))
        commit, dirty = None, False
        for rec in out.split(b"\0"):
            if rec.startswith(b"# branch.oid "):
                oid = rec[len(b"# branch.oid "):].strip().decode("ascii", "replace")
                commit = oid if oid != "(initial)" else None
            elif rec and not rec.startswith(b"#"):
                dirty = True
        return {"commit": commit, "dirty": dirty}

    def cancel(self):
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
                self.proc.communicate()
            except OSError:
                pass


# ---------------------------------------------------------------------------- ignore rules

def _spec(lines):
    import pathspec
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _read_spec(path):
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return _spec(lines) if lines else None


def _check(spec, rel):
    """True: ignored, False: re-included (negated), None: no pattern matches."""
    return spec.check_file(rel).include


def _ignored_by_stack(stack, rel, is_dir):
    """stack: [(base rel dir ('' for root), spec)], shallow to deep. Deeper files win, and
    within a file the last matching pattern wins (git's rules)."""
    for base, spec in reversed(stack):
        sub = rel[len(base) + 1:] if base else rel
        res = _check(spec, sub + "/" if is_dir else sub)
        if res is not None:
            return res
    return False


def _rtrainignore_filter(root, paths):
    spec = _read_spec(os.path.join(root, RTRAINIGNORE))
    if spec is None:
        return paths
    stack = [("", spec)]
    out = []
    for p in paths:
        parts = p.split("/")
        # like git: nothing below an excluded directory can be re-included
        if any(_ignored_by_stack(stack, "/".join(parts[:i]), True) for i in range(1, len(parts))):
            continue
        if not _ignored_by_stack(stack, p, False):
            out.append(p)
    return out


# ---------------------------------------------------------------------------- selection

def _select_git(root, warnings, stats=None):
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    paths = set()
    prefix = root.rstrip("/") + "/"
    lstat, fsdecode = os.lstat, os.fsdecode
    for raw in out.split(b"\0"):
        if not raw:
            continue
        rel = fsdecode(raw)
        if rel.endswith("/"):
            warnings.append("skipped %s: a nested git repository (not tracked here)" % rel)
            continue
        try:
            st = lstat(prefix + rel)
        except (FileNotFoundError, NotADirectoryError):
            continue  # tracked but deleted in the work tree
        if stat.S_ISDIR(st.st_mode):
            warnings.append("skipped submodule %s: submodules are not synced" % rel)
            continue
        paths.add(rel)
        if stats is not None:
            stats[rel] = st
    return paths


def _select_walk(root, warnings):
    paths = set()

    def walk(absdir, reldir, stack):
        spec = _read_spec(os.path.join(absdir, ".gitignore"))
        if spec is not None:
            stack = stack + [(reldir, spec)]
        try:
            it = list(os.scandir(absdir))
        except OSError as e:
            warnings.append("skipped %s: %s" % (reldir or ".", e.strerror or e))
            return
        for de in it:
            if de.name == ".git":
                continue
            rel = reldir + "/" + de.name if reldir else de.name
            try:
                is_dir = de.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if _ignored_by_stack(stack, rel, is_dir):
                continue
            if is_dir:
                walk(de.path, rel, stack)
            else:
                paths.add(rel)

    walk(root, "", [])
    return paths


def select(root, in_git=None, stats=None):
    """(sorted relative POSIX paths of the files to sync, warnings, the lstat of each path where
    one was taken, whether root is in a git work tree)."""
    warnings = []
    if in_git is None:
        in_git = in_git_work_tree(root)
    if in_git:
        paths = _select_git(root, warnings, stats)
    else:
        paths = _select_walk(root, warnings)
    paths = _rtrainignore_filter(root, sorted(paths))
    paths = sorted(set(paths).union(_reincluded(root, in_git)))
    return [p for p in paths if PULL_DIR not in p.split("/")], warnings, stats, in_git


# `rtrain pull` writes here by default: never sent, so pulled files do not travel back
PULL_DIR = "rtrain-out"


def _reincluded(root, in_git):
    """Ignored files that a `!pattern` of .rtrainignore takes back, as git's own negation does
    (also below an ignored folder: the user named them)."""
    try:
        with open(os.path.join(root, RTRAINIGNORE), "r", encoding="utf-8", errors="surrogateescape") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    if not any(ln.lstrip().startswith("!") for ln in lines):
        return []
    spec = _spec(lines)
    if in_git:
        out = _git(root, "ls-files", "-z", "--others", "--ignored", "--exclude-standard") or b""
        candidates = [os.fsdecode(x) for x in out.split(b"\0") if x and not x.endswith(b"/")]
    else:
        candidates = []
        for d, dirs, names in os.walk(root):
            dirs[:] = [x for x in dirs if x != ".git"]
            base = os.path.relpath(d, root).replace(os.sep, "/")
            candidates += [n if base == "." else base + "/" + n for n in names]
    return [p for p in candidates if _check(spec, p) is False]
