"""Sweeps and arrays on the client (launcher/sweep.py), dependencies' hosts (launcher/groups.py):
points, quoting, and one clear error for each kind of bad input."""
import shlex

import pytest

from launcher import config, groups, sweep
from launcher.errors import RtrainError


def test_a_sweep_is_the_cartesian_product_with_values_in_argv_and_env():
    plan = sweep.plan(["python3", "train.py", "--lr", "{lr}", "--seed={seed}"],
                      sweep.parse_sweeps(["lr=1e-3,3e-4", "seed=0..4"]))
    pts = plan["points"]
    assert len(pts) == 10 and plan["group"]["kind"] == "sweep"
    assert pts[0]["argv"] == ["python3", "train.py", "--lr", "1e-3", "--seed=0"]
    assert pts[9]["argv"][3:] == ["3e-4", "--seed=4"]
    assert pts[6]["env"] == {"RTRAIN_SWEEP_LR": "3e-4", "RTRAIN_SWEEP_SEED": "1"}
    assert pts[6]["suffix"] == " lr=3e-4 seed=1"


def test_a_one_string_command_gets_each_value_shell_quoted_as_one_word():
    values = ["a b", "it's", "$(rm -rf ~)", "x;y"]
    plan = sweep.plan(["python3 t.py --name {name} ${HOME} {{literal}}"], {"name": values})
    for p, v in zip(plan["points"], values):
        words = shlex.split(p["argv"][0])
        assert words == ["python3", "t.py", "--name", v, "${HOME}", "{literal}"]


def test_an_array_gives_indices_and_a_limit():
    assert sweep.parse_array("10") == (list(range(10)), None)
    assert sweep.parse_array("0-9%3") == (list(range(10)), 3)
    assert sweep.parse_array("1,4,7-8") == ([1, 4, 7, 8], None)
    plan = sweep.plan(["python3", "t.py"], array="2-3%1")
    assert [p["env"] for p in plan["points"]] == [{"RTRAIN_ARRAY_INDEX": "2"}, {"RTRAIN_ARRAY_INDEX": "3"}]
    assert plan["group"]["max_running"] == 1 and plan["points"][0]["suffix"] == "[2]"


@pytest.mark.parametrize("argv, sweeps, array, needle", [
    (["t {lr}"], ["lr="], None, "empty value list"),
    (["t {lr}"], ["lr=1,,2"], None, "empty value"),
    (["t {lr} {seed}"], ["lr=1"], None, "uses {seed}"),
    (["t"], ["lr=1,2"], None, "lr is not used"),
    (["t {lr}"], ["lr=5..1"], None, "backwards"),
    (["t {lr}"], ["lr"], None, "NAME=VALUES"),
    (["t {lr}"], ["lr=1", "lr=2"], None, "twice"),
    (["t {1x}"], ["1x=1"], None, "letters, digits"),
    (["t"], [], "0-x", "not N"),
    (["t"], [], "5-1", "not an index"),
    (["t"], [], "1,1", "twice"),
    (["t {lr}"], ["lr=1"], "3", "cannot go together"),
])
def test_bad_sweeps_and_arrays_are_one_clear_error(argv, sweeps, array, needle):
    with pytest.raises(RtrainError) as e:
        sweep.plan(argv, sweep.parse_sweeps(sweeps) if sweeps else None, array)
    assert needle in e.value.message and "\n" not in e.value.message and e.value.hint


def test_a_variable_used_only_through_its_environment_is_fine():
    plan = sweep.plan(["python3 t.py --seed $RTRAIN_SWEEP_SEED"], {"seed": ["1", "2"]})
    assert len(plan["points"]) == 2


def test_more_points_than_max_points_need_yes():
    plan = sweep.plan(["t"], array="1001")
    with pytest.raises(RtrainError) as e:
        sweep.check_count(plan, 1000, yes=False)
    assert "1001 jobs, more than 1000" in e.value.message and "--yes" in e.value.hint
    sweep.check_count(plan, 1000, yes=True)
    sweep.check_count(sweep.plan(["t"], array="1000"), 1000, yes=False)


def test_a_project_sweep_takes_lists_and_ranges():
    assert sweep.from_project((("lr", ("1e-3", "3e-4")), ("seed", "0..2")), "rtrain.yaml") == {
        "lr": ["1e-3", "3e-4"], "seed": ["0", "1", "2"]}


def _cfg(default=None):
    from launcher.config import Config, Host
    return Config(path="h.yaml", default=default, hosts={"tower": Host("tower", kind="ssh", ssh="x"),
                                                          "gpu2": Host("gpu2", kind="ssh", ssh="y")})


def test_dependencies_are_on_the_jobs_own_host():
    cfg = _cfg()
    assert groups.dependencies(cfg, ["tower:12,tower:g3"], [], None) == ("tower", [12, "g3"], [])
    assert groups.dependencies(cfg, ["12"], ["g4"], "gpu2") == ("gpu2", [12], ["g4"])
    for after, host, needle in ((["tower:12"], "gpu2", "on one host"), (["12"], None, "which host"),
                                (["tower:1", "gpu2:2"], None, "on one host")):
        with pytest.raises(RtrainError) as e:
            groups.dependencies(cfg, after, [], host)
        assert needle in e.value.message
    assert groups.format_id(_cfg("tower"), "tower", 7) == "g7"
    assert groups.format_id(_cfg("tower"), "gpu2", 7) == "gpu2:g7"
    assert groups.parse(_cfg("tower"), "g7") == ("tower", 7) and groups.is_group("gpu2:g12")
    assert not groups.is_group("12") and not groups.is_group("tower:12")


def test_max_points_is_a_host_key(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  local:\n    max_points: 50\n")
    assert config.load(str(p)).get("local").max_points == 50


def test_rtrain_yaml_takes_a_sweep_and_a_share_of_a_gpu(tmp_path):
    from launcher import project
    from launcher.errors import ConfigError
    (tmp_path / "rtrain.yaml").write_text("run: python3 t.py {lr}\ngpus: 0.5\nsweep:\n  lr: [1e-3, 3e-4]\n"
                                          "  seed: 0..2\n")
    p = project.load(str(tmp_path))
    assert p.gpus == 0.5 and p.sweep == (("lr", ("1e-3", "3e-4")), ("seed", "0..2"))
    for bad, needle in (("gpus: 1.5\n", "'gpus'"), ("sweep: [1, 2]\n", "'sweep'"),
                        ("sweep:\n  lr: []\n", "sweep: lr")):
        (tmp_path / "rtrain.yaml").write_text(bad)
        with pytest.raises(ConfigError) as e:
            project.load(str(tmp_path))
        assert needle in e.value.message and "rtrain.yaml:" in e.value.message


def test_the_command_line_takes_shares_sweeps_arrays_and_dependencies():
    from launcher import cli
    a = cli.build_parser().parse_args(["submit", "--gpus", "1/3", "--sweep", "lr=1,2", "--after", "12,g3",
                                       "--after-any", "4", "--array", "0-9%3", "--", "t", "{lr}"])
    assert abs(a.gpus - 1 / 3.0) < 1e-9 and a.sweep == ["lr=1,2"] and a.array == "0-9%3"
    assert a.after == ["12,g3"] and a.after_any == ["4"]
    assert cli.build_parser().parse_args(["submit", "--gpus", "2", "--", "t"]).gpus == 2
    u = cli.build_parser().parse_args(["usage", "--since", "7d", "--by", "project", "--json"])
    assert (u.since, u.by, u.json) == ("7d", "project", True)
