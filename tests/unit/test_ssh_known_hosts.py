"""The SSH transports on their own: a paramiko exec channel that hears nothing fails with `no
answer`, and which known_hosts files each transport reads."""
import shutil
import socket
import types

import pytest

from launcher import config, openssh, openssh_errors, paramiko_transport, sshcommon
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
    ch = paramiko_transport._Channel(chan, "tower", 60.0)
    assert chan.timeout == 60.0
    for op in (ch.readline, lambda: ch.write(b"x"), ch.wait):
        with pytest.raises(HostError) as ei:
            op()
        assert ei.value.message == "tower: no answer from the host for 60s"
        assert "io_timeout" in ei.value.hint and not ei.value.permanent


def test_system_known_hosts_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("RTRAIN_GLOBAL_KNOWN_HOSTS", raising=False)
    assert sshcommon.global_known_hosts_override() is None
    assert sshcommon.DEFAULT_GLOBAL_KNOWN_HOSTS == ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    g = tmp_path / "global"
    monkeypatch.setenv("RTRAIN_GLOBAL_KNOWN_HOSTS", str(g))
    assert sshcommon.global_known_hosts_override() == [str(g)]
    monkeypatch.setenv("RTRAIN_GLOBAL_KNOWN_HOSTS", "")
    assert sshcommon.global_known_hosts_override() == []  # set but empty: none


@pytest.mark.parametrize("transport", ["openssh", "paramiko"])
def test_known_hosts_files_from_ssh_config(tmp_path, monkeypatch, transport):
    """UserKnownHostsFile and GlobalKnownHostsFile of the user's config are the files checked
    (and named in errors), for both transports (openssh: as `ssh -G` resolves them, locally)."""
    if transport == "openssh" and not shutil.which("ssh"):
        pytest.skip("no OpenSSH client")
    for var in ("RTRAIN_GLOBAL_KNOWN_HOSTS", "RTRAIN_KNOWN_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RTRAIN_SSH_CONTROL_DIR", str(tmp_path / "cm"))
    conf = tmp_path / "ssh_config"
    conf.write_text("Host tower\n  HostName 127.0.0.1\n  UserKnownHostsFile %s/u1\n"
                    "  GlobalKnownHostsFile %s/g1 %s/g2\n" % (tmp_path, tmp_path, tmp_path))
    monkeypatch.setenv("RTRAIN_SSH_CONFIG", str(conf))
    h = config.Host(name="tower", kind="ssh", ssh="tower")
    want = ([str(tmp_path / "u1")], [str(tmp_path / "g1"), str(tmp_path / "g2")])
    if transport == "openssh":
        assert openssh_errors.known_files(openssh.OpenSSHTransport(h)) == want
    else:
        hops = paramiko_transport.ParamikoTransport(h)._connection()
        assert paramiko_transport._hop_files(hops[-1]) == want
