"""What the two SSH transports share, without a network: hosts.yaml's transport keys, known_hosts
read as OpenSSH reads it (for paramiko), where control sockets go, and the config file rtrain
writes for OpenSSH."""
import base64
import hashlib
import hmac
import os

import pytest

from launcher import config, knownhosts, sshcommon
from launcher.errors import ConfigError


def parse(tmp_path, body):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  tower:\n    ssh: u@h\n" + body)
    return config.parse(str(p)).hosts["tower"]


def test_transport_and_control_persist_keys(tmp_path):
    h = parse(tmp_path, "")
    assert h.transport is None and h.control_persist == "10m"
    assert parse(tmp_path, "    transport: paramiko\n").transport == "paramiko"
    for given, want in (("no", "no"), ("0", "no"), ("false", "no"), ("'no'", "no"), ("600", "600"),
                        ("1h30m", "1h30m"), ("'10m'", "10m")):
        assert parse(tmp_path, "    control_persist: %s\n" % given).control_persist == want, given
    for bad, key in (("    transport: ssh\n", "transport"), ("    control_persist: yes\n", "control_persist"),
                     ("    control_persist: soon\n", "control_persist"),
                     ("    control_persist: -5\n", "control_persist")):
        with pytest.raises(ConfigError) as e:
            parse(tmp_path, bad)
        assert ":4: host 'tower': '%s' must be" % key in e.value.message


def test_transport_default_follows_the_ssh_client(monkeypatch):
    h = config.Host(name="t", kind="ssh", ssh="u@h")
    monkeypatch.setattr(sshcommon, "openssh_client", lambda: "/usr/bin/ssh")
    assert sshcommon.transport_of(h) == "openssh"
    monkeypatch.setattr(sshcommon, "openssh_client", lambda: None)
    assert sshcommon.transport_of(h) == "paramiko"
    assert sshcommon.transport_of(config.Host(name="t", kind="ssh", ssh="u@h", transport="openssh")) == "openssh"


def test_quote_leaves_only_a_leading_tilde_to_the_shell():
    assert sshcommon.quote("~/a b/c") == "~/'a b/c'"
    assert sshcommon.quote("$(rm -rf /)") == "'$(rm -rf /)'"
    assert sshcommon.quote("~user") == "'~user'"
    assert sshcommon.command_line(["python3", "a'b"], {"K": "v w"}) == "env 'K=v w' python3 'a'\"'\"'b'"


def _hashed(name, salt=b"0123456789abcdefghij"):
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return "|1|%s|%s" % (base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def test_known_hosts_as_openssh_reads_them(tmp_path):
    a = tmp_path / "a"
    a.write_text("# comment\n\n"
                 "@cert-authority *.example.org ssh-ed25519 CAKEY\n"
                 "@revoked * ssh-ed25519 STOLEN\n"
                 "[127.0.0.1]:2222 ssh-ed25519 KEY1\n"
                 "%s ssh-ed25519 KEY2\n"
                 "*.lab,!bad.lab ssh-rsa KEY3\n"
                 "gpu-tower-key ssh-ed25519 KEY4\n" % _hashed("[10.0.0.1]:22"))
    kh = knownhosts.KnownHosts([str(a), str(tmp_path / "missing")])
    assert kh.read == [str(a)]
    assert kh.check(["[127.0.0.1]:2222"], "ssh-ed25519", "KEY1")[0] == "ok"
    status, e = kh.check(["[127.0.0.1]:2222"], "ssh-ed25519", "OTHER")
    assert status == "changed" and (e.path, e.line) == (str(a), 5)
    assert kh.check(["[127.0.0.1]:2223"], "ssh-ed25519", "KEY1")[0] == "unknown"  # [ is literal
    assert kh.check(["[10.0.0.1]:22"], "ssh-ed25519", "KEY2")[0] == "ok"          # hashed name
    assert kh.check(["gpu.lab"], "ssh-rsa", "KEY3")[0] == "ok"
    assert kh.check(["bad.lab"], "ssh-rsa", "KEY3")[0] == "unknown"               # negated
    assert kh.check(["x.example.org"], "ssh-ed25519", "CAKEY")[0] == "unknown"    # a CA is no host key
    status, e = kh.check(["anything"], "ssh-ed25519", "STOLEN")
    assert status == "revoked" and e.line == 4
    assert kh.check(["gpu-tower-key"], "ssh-ed25519", "KEY4")[0] == "ok"


def test_control_dir_follows_rtrain_home_and_stays_short(monkeypatch, tmp_path):
    from launcher import openssh
    monkeypatch.delenv("RTRAIN_SSH_CONTROL_DIR", raising=False)
    monkeypatch.setenv("RTRAIN_HOME", "/h/.rtrain")
    assert openssh.control_dir() == "/h/.rtrain/ssh"
    monkeypatch.setenv("RTRAIN_HOME", "/" + "x" * 90)
    d = openssh.control_dir()
    assert d.startswith("/tmp/rtrain-ssh-%d-" % os.geteuid()) and len(d) + 35 <= 100
    monkeypatch.setenv("RTRAIN_SSH_CONTROL_DIR", str(tmp_path / "cm"))
    assert openssh.control_dir() == str(tmp_path / "cm")
    os.makedirs(str(tmp_path / "cm"), mode=0o755)
    openssh.private_dir(str(tmp_path / "cm"))  # ours, readable by others: made private
    assert os.stat(str(tmp_path / "cm")).st_mode & 0o777 == 0o700


def test_the_config_rtrain_gives_openssh(monkeypatch, tmp_path):
    from launcher import openssh
    monkeypatch.setenv("RTRAIN_SSH_CONTROL_DIR", str(tmp_path / "cm"))
    monkeypatch.setenv("RTRAIN_SSH_CONFIG", str(tmp_path / "user config"))
    monkeypatch.setenv("RTRAIN_KNOWN_HOSTS", str(tmp_path / "kh"))
    monkeypatch.setenv("RTRAIN_GLOBAL_KNOWN_HOSTS", "")
    h = config.Host(name="t", kind="ssh", ssh="alice@gpu:2222", identity_file="k", connect_timeout=3)
    t = openssh.OpenSSHTransport(h, ssh="/usr/bin/ssh")
    text = open(t.config_file).read()
    assert "BatchMode yes\nStrictHostKeyChecking yes\n" in text and "ConnectTimeout 3\n" in text
    assert "UserKnownHostsFile %s\n" % (tmp_path / "kh") in text and "GlobalKnownHostsFile /dev/null\n" in text
    assert 'Include "%s"\n' % (tmp_path / "user config") in text
    assert "/etc/ssh/ssh_config" not in text  # RTRAIN_SSH_CONFIG stands alone, as -F would
    argv = t.argv("true")
    assert argv[:4] == ["/usr/bin/ssh", "-F", t.config_file, "-T"]
    i = argv.index("--")
    assert argv[i - 6:] == ["-p", "2222", "-l", "alice", "-i", os.path.abspath("k"), "--", "gpu", "true"]
    assert "ControlMaster=auto" in argv and "ControlPersist=10m" in argv
    # accept-new: another config file, the same shared connection
    t2 = openssh.OpenSSHTransport(h, accept_new_host_key=True, ssh="/usr/bin/ssh")
    assert "StrictHostKeyChecking accept-new" in open(t2.config_file).read()
    assert t2.config_file != t.config_file and t2.control_path == t.control_path
    off = openssh.OpenSSHTransport(config.Host(name="t", kind="ssh", ssh="gpu", control_persist="no"),
                                   ssh="/usr/bin/ssh")
    assert "ControlPath=none" in off.argv("true") and off.before_start() == "direct"
