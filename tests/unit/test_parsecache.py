"""hosts.yaml and rtrain.yaml are parsed once and read back while they do not change
(parsecache.py): never a stale result, never an error from a damaged cache."""
import os
import time

import pytest

from launcher import config, parsecache, project


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rtrain" / "parsed"


def _old(path, age=60):
    t = time.time() - age
    os.utime(str(path), (t, t))


def test_a_file_is_parsed_once_until_it_changes(tmp_path, cache, monkeypatch):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  tower:\n    ssh: alice@127.0.0.1:2222\n")
    _old(hosts)
    calls = []
    real = config.parse

    def spy(path):
        calls.append(path)
        return real(path)
    spy.__module__, spy.__name__ = real.__module__, real.__name__
    monkeypatch.setattr(config, "parse", spy)
    first = config.load(str(hosts))
    again = config.load(str(hosts))
    assert len(calls) == 1 and again == first and again.get("tower").ssh == "alice@127.0.0.1:2222"
    hosts.write_text("hosts:\n  tower:\n    ssh: bob@127.0.0.1:2222\n")
    _old(hosts, 30)
    assert config.load(str(hosts)).get("tower").ssh == "bob@127.0.0.1:2222" and len(calls) == 2


def test_a_file_just_written_is_not_kept(tmp_path, cache):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  tower:\n    ssh: alice@127.0.0.1:2222\n")
    config.load(str(hosts))
    assert not cache.exists() or os.listdir(str(cache)) == []


def test_a_damaged_cache_means_parsing_again(tmp_path, cache):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "rtrain.yaml").write_text("project: demo\n")
    _old(root / "rtrain.yaml")
    assert project.load(str(root)).project == "demo"
    (name,) = os.listdir(str(cache))
    (cache / name).write_bytes(b"not a pickle")
    assert project.load(str(root)).project == "demo"
    # an error is never kept: the next command says it again
    (root / "rtrain.yaml").write_text("project: [demo\n")
    _old(root / "rtrain.yaml", 30)
    for _ in range(2):
        with pytest.raises(config.ConfigError):
            project.load(str(root))


def test_the_same_file_for_another_root_is_parsed_for_it(tmp_path, cache):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "rtrain.yaml").write_text("data: [d]\n")
    _old(a / "rtrain.yaml")
    pa = parsecache.cached(str(a / "rtrain.yaml"), project.parse, str(a))
    pb = parsecache.cached(str(a / "rtrain.yaml"), project.parse, str(b))
    assert pa.root == str(a) and pb.root == str(b)
