"""The tower policy (agent/policy.py) and the YAML subset it is read with (agent/miniyaml.py):
what the admin sets counts only from a file root owns and nobody else can write."""
import os

import pytest
import yaml

from launcher.agent import miniyaml, policy

DOC = """\
# /etc/rtrain/tower.yaml
hidden: [3, GPU-abc]        # never handed out
order:
  - 2
  - "0"
max_gpus_per_user: 1.5
reserved:
  - gpus: [0]
    users: [alice, 'b o b']
    groups:
    - vision
  - {gpus: [1], users: [carol], groups: []}
lock_dir: /run/lock/rtrain
note: 'it''s # not a comment'
esc: "a\\"b # c"   # but this is
nothing:
"""


def test_the_subset_reads_as_yaml_does():
    assert miniyaml.parse(DOC) == yaml.safe_load(DOC)
    assert miniyaml.parse("") is None and miniyaml.parse("# only\n") is None
    assert miniyaml.parse("- 1\n- [a, {b: 2}]\n- x: 1\n  y: [true, null, 1.5]\n") == [
        1, ["a", {"b": 2}], {"x": 1, "y": [True, None, 1.5]}]


@pytest.mark.parametrize("text, line, needle", [
    ("a: 1\n  b: 2\n", 2, "indentation"),
    ("a: [1, 2\n", 1, "not closed"),
    ("a: &x 1\n", 1, "anchors"),
    ("a: 1\na: 2\n", 2, "twice"),
    ("a:\n\t- 1\n", 2, "tab"),
    ('a: "x\n', 1, "does not end"),
    ("a: [1] x\n", 1, "unexpected"),
    ("- a\nb: 1\n", 2, "key where the list"),
    ("a: 1\n---\nb: 2\n", 2, "one document"),
    ("a: |\n  text\n", 1, "block strings"),
])
def test_what_the_subset_does_not_read_is_an_error_with_its_line(text, line, needle):
    with pytest.raises(miniyaml.MiniYAMLError) as e:
        miniyaml.parse(text)
    assert e.value.line == line and needle in str(e.value), str(e.value)


def _policy(tmp_path, text, mode=0o644):
    d = tmp_path / "etc-rtrain"
    d.mkdir(exist_ok=True)
    os.chmod(str(tmp_path), 0o755)
    os.chmod(str(d), 0o755)
    p = d / "tower.yaml"
    p.write_text(text)
    os.chmod(str(p), mode)
    return str(p)


UNITS = [{"index": str(i), "uuid": "GPU-%d" % i, "state": "free", "parent_uuid": None} for i in range(4)]


def test_a_policy_root_owns_hides_orders_reserves_and_caps(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the policy must be root's: run as root")
    pol = policy.load(_policy(tmp_path, "hidden: [3]\norder: [2, GPU-0]\nmax_gpus_per_user: 2\n"
                                        "reserved:\n  - {gpus: [1], users: [alice], groups: [vision]}\n"
                                        "lock_dir: /run/lock/rtrain\n"))
    assert pol.state == "ok" and pol.cap == 2 and pol.lock_dir == "/run/lock/rtrain"
    assert [u["index"] for u in UNITS if pol.hides(u)] == ["3"]
    ranked = [u["index"] for pos, u in sorted(enumerate(UNITS), key=lambda x: pol.rank(x[1], x[0]))]
    assert ranked == ["2", "0", "1", "3"]
    assert not pol.may_use(UNITS[1], ("bob", set())) and pol.may_use(UNITS[1], ("alice", set()))
    assert pol.may_use(UNITS[1], ("bob", {"vision"})) and pol.may_use(UNITS[0], ("bob", set()))
    mig = {"index": "1:0", "uuid": "MIG-x", "state": "free", "parent_uuid": "GPU-1"}
    assert pol.rule(mig) is not None  # a MIG device follows its GPU's rules
    shown = policy.annotate([dict(u) for u in UNITS], pol, ("bob", set()))
    assert [u["state"] for u in shown] == ["free", "reserved", "free", "hidden"]
    assert shown[1]["policy"] == "reserved for alice, group vision"


@pytest.mark.parametrize("how, needle", [
    ("world-writable", "can be written by users other than root"),
    ("not-root", "not root"),
    ("folder-writable", "its folder"),
    ("symlink", "not a regular file"),
])
def test_a_policy_others_could_change_is_ignored_saying_why(tmp_path, how, needle):
    if os.geteuid() != 0:
        pytest.skip("run as root")
    path = _policy(tmp_path, "hidden: [0]\n")
    if how == "world-writable":
        os.chmod(path, 0o666)
    elif how == "not-root":
        os.chown(path, 65534, 65534)
    elif how == "folder-writable":
        os.chmod(os.path.dirname(path), 0o777)
    else:
        os.rename(path, path + ".real")
        os.symlink(path + ".real", path)
    pol = policy.load(path)
    assert pol.state == "ignored" and needle in pol.problem and not pol.hides(UNITS[0])


def test_a_policy_with_an_error_holds_gpu_jobs_and_says_where(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("run as root")
    for text, needle in (("hidden: [0\n", ":1: '[' is not closed"), ("hiden: [0]\n", "unknown key 'hiden'"),
                         ("max_gpus_per_user: lots\n", "max_gpus_per_user"),
                         ("reserved: [{users: [a]}]\n", "each reserved entry")):
        pol = policy.load(_policy(tmp_path, text))
        assert pol.state == "error" and needle in pol.problem, pol.problem
    assert policy.load(str(tmp_path / "none.yaml")).state == "none"
