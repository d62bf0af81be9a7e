"""The user's ssh config and known_hosts as OpenSSH reads them, on both transports (the
ssh_transport fixture runs each test once per transport): a two-hop ProxyJump chain that no
shorter chain can replace, HostKeyAlias, and known_hosts files with @cert-authority and
@revoked lines."""
import os
import shutil
import subprocess
import uuid

import pytest

from support import ALICE, BOB, one_error, need
from support import rtrain as rt


def key_of(path):
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def alias_hosts(sshd, path, alias, user=None):
    """hosts.yaml with one host reached through an alias of the ssh config."""
    path.write_text("hosts:\n  tower:\n    ssh: %s%s\n    home: ~/.rtrain-%s\n    lock_dir: %s\n"
                    "    connect_timeout: 5\n    transport: %s\n" % (
                        "%s@" % user if user else "", alias, uuid.uuid4().hex[:8], sshd.lock_dir,
                        sshd.transport))
    return path


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    return d


# ------------------------------------------------------------------ ProxyJump, two hops

class Iptables:
    """OUTPUT rules on lo, each removed at the end whatever happened."""

    def __init__(self):
        self.rules = []

    def only(self, port, user):
        """Only `user` may open a connection to 127.0.0.1:port."""
        rule = ["OUTPUT", "-o", "lo", "-p", "tcp", "--dport", str(port), "-m", "owner", "!",
                "--uid-owner", user, "-j", "REJECT"]
        p = subprocess.run(["iptables", "-w", "-A"] + rule, capture_output=True, text=True)
        if p.returncode != 0:
            need(False, "iptables with owner match is needed (%s)" % p.stderr.strip())
        self.rules.append(rule)

    def remove(self):
        for rule in self.rules:
            subprocess.run(["iptables", "-w", "-D"] + rule, capture_output=True)
        self.rules = []


@pytest.fixture
def iptables():
    need(shutil.which("iptables") is not None, "iptables is not installed (tests/setup.sh installs it)")
    t = Iptables()
    try:
        yield t
    finally:
        t.remove()


def test_two_hop_proxyjump_chain(sshd, iptables, tmp_path, src):
    """laptop -> hop1 (as alice) -> hop2 (as bob) -> target: only alice may connect to hop2's
    port and only bob to the target's, so one hop, or none, cannot do it."""
    p1, k1, _ = sshd.start("hop1")
    p2, k2, _ = sshd.start("hop2")
    p3, k3, _ = sshd.start("target")
    iptables.only(p2, ALICE)
    iptables.only(p3, BOB)
    kh = tmp_path / "known_hosts"
    kh.write_text("".join("[127.0.0.1]:%d %s\n" % (p, key_of(k)) for p, k in ((p1, k1), (p2, k2), (p3, k3))))
    conf = tmp_path / "ssh_config"
    common = "  HostName 127.0.0.1\n  IdentityFile %s\n  IdentitiesOnly yes\n" % sshd.user_key
    conf.write_text(
        "Host hop1\n  Port %d\n  User %s\n%s"
        "Host hop2\n  Port %d\n  User %s\n%s"
        "Host target\n  Port %d\n  User %s\n  ProxyJump hop1,hop2\n%s"
        "Host one-hop\n  Port %d\n  User %s\n  ProxyJump hop1\n%s"
        "Host direct\n  Port %d\n  User %s\n%s" % (
            p1, ALICE, common, p2, BOB, common, p3, ALICE, common, p3, ALICE, common, p3, ALICE, common))
    env = sshd.env(known_hosts=kh, RTRAIN_SSH_CONFIG=str(conf))
    hosts = alias_hosts(sshd, tmp_path / "hosts.yaml", "target")
    (src / "where.py").write_text("import os\nprint(os.environ['SSH_CONNECTION'].split()[3])\n")
    job = rt(sshd, hosts, "submit", "-q", "--follow", "--", "python3", "where.py", cwd=src, env=env)
    assert job.stdout.strip().splitlines()[-1] == str(p3), job.stdout  # it ran on the target
    # the chain is needed: one hop, or none, is refused by the rules
    for alias, says in (("one-hop", "tower: jump host hop1 cannot reach "),
                        ("direct", "tower: connection refused by 127.0.0.1:%d" % p3)):
        p = rt(sshd, alias_hosts(sshd, tmp_path / ("%s.yaml" % alias), alias), "status", "--host", "tower",
               cwd=src, env=env, check=False)
        one_error(p, says)


# ------------------------------------------------------------------ HostKeyAlias

def test_host_key_alias(sshd, tmp_path, src):
    conf = tmp_path / "ssh_config"
    conf.write_text("Host aliased\n  HostName 127.0.0.1\n  Port %d\n  User %s\n  IdentityFile %s\n"
                    "  HostKeyAlias gpu-tower-key\n" % (sshd.port, ALICE, sshd.user_key))
    hosts = alias_hosts(sshd, tmp_path / "hosts.yaml", "aliased")
    by_alias = tmp_path / "kh_alias"
    by_alias.write_text("gpu-tower-key %s\n" % key_of(sshd.host_key))
    rt(sshd, hosts, "status", "--host", "tower", cwd=src,
       env=sshd.env(known_hosts=by_alias, RTRAIN_SSH_CONFIG=str(conf)))
    # the key filed under the address alone does not do: the alias is what is looked up
    by_addr = tmp_path / "kh_addr"
    by_addr.write_text(sshd.known_hosts.read_text())
    p = rt(sshd, hosts, "status", "--host", "tower", cwd=src, check=False,
           env=sshd.env(known_hosts=by_addr, RTRAIN_SSH_CONFIG=str(conf)))
    one_error(p, "host key for gpu-tower-key is not in %s" % by_addr)


# ------------------------------------------------------------------ @cert-authority, @revoked

def test_known_hosts_with_cert_authority_and_revoked_lines(sshd, tmp_path, src):
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, sshd.port)})
    spare = tmp_path / "spare"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(spare)], check=True)
    kh = tmp_path / "known_hosts"
    kh.write_text("# a CA for another domain, a revoked key, then this host's key\n"
                  "@cert-authority *.example.org %s\n@revoked * %s\n%s" % (
                      key_of(sshd.other_key), key_of(spare), sshd.known_hosts.read_text()))
    rt(sshd, hosts, "status", "--host", "tower", cwd=src, env=sshd.env(known_hosts=kh))
    # this host's own key revoked: refused, and said so, even with --accept-new-host-key
    bad = tmp_path / "revoked_known_hosts"
    bad.write_text("@revoked [127.0.0.1]:%d %s\n%s" % (sshd.port, key_of(sshd.host_key),
                                                         sshd.known_hosts.read_text()))
    for extra in ([], ["--accept-new-host-key"]):
        p = rt(sshd, hosts, *extra, "status", "--host", "tower", cwd=src, env=sshd.env(known_hosts=bad),
               check=False)
        one_error(p, "tower: the host key of [127.0.0.1]:%d is marked as revoked" % sshd.port)


def test_a_private_key_others_can_read_is_not_used(sshd, tmp_path, src):
    """OpenSSH ignores such a key; paramiko would use it without a word: both refuse it here."""
    key = tmp_path / "open_key"
    shutil.copyfile(str(sshd.user_key), str(key))
    os.chmod(key, 0o644)
    hosts = sshd.hosts_yaml(tmp_path / "hosts.yaml", {"tower": (ALICE, sshd.port, {"identity_file": key})})
    p = rt(sshd, hosts, "status", "--host", "tower", cwd=src, env=sshd.env(), check=False)
    lines = one_error(p, "authentication refused for %s@" % ALICE, "%s can be read by others" % key)
    assert lines[1] == "  hint: chmod 600 %s" % key
    os.chmod(key, 0o600)
    rt(sshd, hosts, "status", "--host", "tower", cwd=src, env=sshd.env())
