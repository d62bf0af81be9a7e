"""ssh.py on its own: an exec channel that hears nothing fails with `no answer`, and which
known_hosts files are read."""
import socket
import types

import pytest

from launcher import config, ssh
from launcher.errors import HostError


class _Chan:
    def __init__(self):
        self.timeout = None

    def settimeout(self, t):
        self.timeout = t

    def makefile(self, mode, bufsize=-1):
        class F:
            def readline(self):
                raise socket.timeout("timed out")
        return F()

    def sendall(self, data):
        raise socket.timeout("timed out")

    def shutdown_write(self):
        pass

    status_event = types.SimpleNamespace(wait=lambda t: False)


def test_an_exec_channel_that_hears_nothing_fails_with_no_answer():
    chan = _Chan()
    ch = ssh._Channel(chan, "tower", 60.0)
    assert chan.timeout == 60.0
    for op in (ch.readline, lambda: ch.write(b"x"), ch.wait):
        with pytest.raises(HostError) as ei:
            op()
        assert ei.value.message == "tower: no answer from the host for 60s"
        assert "io_timeout" in ei.value.hint and not ei.value.permanent


def test_system_known_hosts_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("RTRAIN_GLOBAL_KNOWN_HOSTS", raising=False)
    assert ssh._global_known_hosts_paths() == ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    assert ssh._global_known_hosts_paths("/a /b") == ["/a", "/b"]
    g = tmp_path / "global"
    monkeypatch.setenv("RTRAIN_GLOBAL_KNOWN_HOSTS", str(g))
    assert ssh._global_known_hosts_paths("/a") == [str(g)]
    monkeypatch.setenv("RTRAIN_GLOBAL_KNOWN_HOSTS", "")
    assert ssh._global_known_hosts_paths() == []  # set but empty: none


def test_global_known_hosts_file_from_ssh_config(tmp_path, monkeypatch):
    monkeypatch.delenv("RTRAIN_GLOBAL_KNOWN_HOSTS", raising=False)
    conf = tmp_path / "ssh_config"
    conf.write_text("Host tower\n  HostName 127.0.0.1\n  GlobalKnownHostsFile %s/g1 %s/g2\n" % (
        tmp_path, tmp_path))
    monkeypatch.setenv("RTRAIN_SSH_CONFIG", str(conf))
    r = ssh.Resolved(config.Host(name="tower", kind="ssh", ssh="tower"))
    assert r.global_known_hosts == [str(tmp_path / "g1"), str(tmp_path / "g2")]
