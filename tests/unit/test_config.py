"""hosts.yaml: the search order, and errors that name file, line and what is allowed."""
import os

import pytest

from launcher import config
from launcher.errors import ConfigError
from support import REPO


def write(tmp_path, text):
    p = tmp_path / "hosts.yaml"
    p.write_text(text)
    return str(p)


def test_no_file_means_local_only(tmp_path):
    c = config.load(env={}, cwd=str(tmp_path))
    assert c.path is None and list(c.hosts) == ["local"] and c.default == "local"


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cwd_file = write(tmp_path, "hosts:\n  a:\n    ssh: u@h\n")
    env_file = tmp_path / "env.yaml"
    env_file.write_text("hosts:\n  b:\n    ssh: u@h\n")
    assert config.find_hosts_file(env={}, cwd=str(tmp_path)) == cwd_file
    assert config.find_hosts_file(env={"RTRAIN_HOSTS": str(env_file)}, cwd=str(tmp_path)) == str(env_file)
    assert config.find_hosts_file(str(env_file), env={}, cwd=str(tmp_path)) == str(env_file)
    with pytest.raises(ConfigError, match="does not exist"):
        config.find_hosts_file(str(tmp_path / "nope.yaml"), env={})


def test_example_file_loads():
    c = config.parse(str(REPO / "hosts.example.yaml"))
    assert c.default == "tower" and set(c.hosts) == {"local", "tower", "cloud"}
    assert c.hosts["local"].gpus == ("0",) and c.hosts["cloud"].accept_new_host_key is True
    assert dict(c.hosts["cloud"].env) == {"HF_HOME": "/data/hf-cache"}


def test_yaml_syntax_error_has_line(tmp_path):
    p = write(tmp_path, "hosts:\n  tower:\n    ssh: [oops\n")
    with pytest.raises(ConfigError) as e:
        config.parse(p)
    assert e.value.message.startswith(p + ":") and "YAML syntax error" in e.value.message


def test_unknown_key_lists_valid_ones(tmp_path):
    p = write(tmp_path, "hosts:\n  tower:\n    ssh: u@h\n    gpu: 2\n")
    with pytest.raises(ConfigError) as e:
        config.parse(p)
    assert e.value.message.startswith("%s:4: unknown key 'gpu' in host 'tower'" % p)
    assert "gpus" in e.value.message and "mem_busy_mib" in e.value.message


def test_wrong_type(tmp_path):
    p = write(tmp_path, "hosts:\n  tower:\n    ssh: u@h\n    gpus: 3\n")
    with pytest.raises(ConfigError, match=r":4: host 'tower': 'gpus' must be 'all' or a list"):
        config.parse(p)
    p = write(tmp_path, "hosts:\n  tower:\n    ssh: u@h\n    mem_busy_mib: lots\n")
    with pytest.raises(ConfigError, match="mem_busy_mib"):
        config.parse(p)


def test_unknown_default_and_unknown_host(tmp_path):
    p = write(tmp_path, "default: towr\nhosts:\n  tower:\n    ssh: u@h\n")
    with pytest.raises(ConfigError, match=r":1: default host 'towr' is not defined"):
        config.parse(p)
    c = config.parse(write(tmp_path, "hosts:\n  tower:\n    ssh: u@h\n"))
    with pytest.raises(ConfigError, match=r"no such host 'vm'.*tower"):
        c.get("vm")


def test_host_without_ssh(tmp_path):
    with pytest.raises(ConfigError, match="has no `ssh:`"):
        config.parse(write(tmp_path, "hosts:\n  tower:\n    python: python3\n"))


def test_io_timeout_in_hosts_yaml(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  a:\n    ssh: u@h\n    io_timeout: 2.5\n  b:\n    ssh: u@h\n")
    cfg = config.parse(str(p))
    assert cfg.hosts["a"].io_timeout == 2.5 and cfg.hosts["b"].io_timeout == 60
    assert "io_timeout" in config.HOST_KEYS
    for bad in ("0", "-1", "soon", "true"):
        p.write_text("hosts:\n  a:\n    ssh: u@h\n    io_timeout: %s\n" % bad)
        with pytest.raises(config.ConfigError, match="io_timeout"):
            config.parse(str(p))
    example = open(os.path.join(os.path.dirname(config.__file__), "..", "hosts.example.yaml")).read()
    assert "io_timeout:" in example


def test_the_local_host_takes_max_tree_mb(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  local: {kind: local, max_tree_mb: 1}\n")
    assert config.parse(str(p)).hosts["local"].max_tree_mb == 1


def test_local_is_a_host_only_when_listed(tmp_path):
    """A hosts file that names only towers never asks this machine (its nvidia-smi may be
    broken, or absent); `local:` alone brings it back, as the built-in local host."""
    towers = config.parse(write(tmp_path, "hosts:\n  tower:\n    ssh: u@h\n"))
    assert list(towers.hosts) == ["tower"]
    with pytest.raises(ConfigError, match="no such host 'local'"):
        towers.get("local")
    both = config.parse(write(tmp_path, "default: tower\nhosts:\n  tower:\n    ssh: u@h\n  local:\n"))
    assert list(both.hosts) == ["tower", "local"] and both.hosts["local"] == config.LOCAL
    tuned = config.parse(write(tmp_path, "hosts:\n  local:\n    gpus: [0]\n"))
    assert tuned.hosts["local"].kind == "local" and tuned.hosts["local"].gpus == ("0",)
    with pytest.raises(ConfigError, match="lists no host"):
        config.parse(write(tmp_path, "default: tower\nhosts: {}\n"))
