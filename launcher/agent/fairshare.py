"""Fair share of a tower's GPUs between its users, with no root and no server (docs/design.md
"Fair share between users").

Every user has a daemon of their own, and any of them may be the first to see a GPU free. They
agree through what they can all see in the shared lease dir's namespace:
- who holds GPUs: the lease sockets' owners (SO_PEERCRED: the kernel says it, nobody can lie);
- who waits: the waiting room. A daemon whose jobs wait for GPUs holds an abstract socket
  `\\0rtrain-wait/<lease dir tag>/<uid>/<home tag>/<since>/<want>/<nonce>`: since the oldest of its
  waiting jobs was submitted (centiseconds), want the GPUs they ask for (thousandths). It is
  valid exactly while that daemon lives (the kernel frees the name), it cannot be removed by
  anyone else, and its uid is checked against the socket's owner as the kernel says it
  (unixdiag.py; SO_PEERCRED where sock_diag is missing): an entry naming another uid is
  ignored.
When GPUs are free and other users wait, a daemon hands them out in its head one at a time to
the waiting user holding the fewest GPUs (with what it handed out so far; ties: the longest
waiting), and takes GPUs only if its own user's turn comes for its first job; else it leaves
them, for at most DEFER_S per set of free GPUs, and takes them after that (the user ahead may
not be able to use them: their own `gpus:`, a job they cancelled). A user who lies in the
waiting room can therefore delay others at most DEFER_S each time GPUs free: less than holding
one GPU would, and they gain no GPU by it. Standard library only, Python >= 3.8.
"""
import binascii
import hashlib
import os
import socket

from . import leases

PREFIX = "rtrain-wait/"
DEFER_S = float(os.environ.get("RTRAIN_FAIRSHARE_DEFER_S") or 2.0)  # tests on a slow machine: more


def _home_tag(home_root):
    return hashlib.sha256(home_root.encode("utf-8", "surrogateescape")).hexdigest()[:12]


class Entry(object):
    """This daemon's entry in the waiting room (posted while its jobs wait for GPUs)."""

    def __init__(self, home_root, own_fds):
        self.home_tag = _home_tag(home_root)
        self.own_fds = own_fds   # the daemon's descriptors, closed in every child it forks
        self.sock = None
        self.key = None

    def post(self, lock_dir, since, want):
        key = (lock_dir, int(since * 100), int(round(want * 1000)))
        if key == self.key:
            self._drain()
            return
        name = "\0%s%s/%d/%s/%d/%d/%s" % (PREFIX, leases.dir_tag(lock_dir), os.getuid(), self.home_tag,
                                          key[1], key[2], binascii.hexlify(os.urandom(4)).decode())
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(name.encode("ascii"))
            s.listen(128)
            s.setblocking(False)
        except OSError:
            s.close()
            return
        self.withdraw()  # the new name is up before the old one goes: never a gap
        self.sock, self.key = s, key
        self.own_fds.append(s.fileno())

    def withdraw(self):
        if self.sock is not None:
            self.own_fds.remove(self.sock.fileno())
            self.sock.close()
            self.sock = self.key = None

    def _drain(self):
        """Accept and drop the connections readers made to check our uid (else the queue fills)."""
        for _ in range(256):
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.close()


def room(lock_dir, skip_home=None):
    """[{"uid", "home", "since", "want"}] of the waiting room of lock_dir, each entry's uid the
    kernel's (skip_home: a home tag to leave out, the caller's own)."""
    from . import unixdiag
    prefix = ("\0%s%s/" % (PREFIX, leases.dir_tag(lock_dir))).encode("ascii")
    owners = unixdiag.owners(prefix)
    if owners is None:  # no sock_diag: /proc/net/unix for the names, SO_PEERCRED for the uids
        owners = {n: uid for n, (uid, _pid) in leases.name_holders(_listed(prefix)).items()}
    entries = []
    for name, owner in owners.items():
        try:
            uid, home, since, want, _nonce = name[len(prefix):].decode("ascii").split("/")
            e = {"uid": int(uid), "home": home, "since": int(since) / 100.0, "want": int(want) / 1000.0}
        except ValueError:
            continue
        if home != skip_home and owner == e["uid"]:  # an entry naming another uid is a lie
            entries.append(e)
    return entries


def _listed(prefix):
    """The listening sockets of /proc/net/unix whose names start with prefix (a connection
    waiting in an entry's queue shows the entry's name too: "__SO_ACCEPTCON" sockets only)."""
    names = []
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[3] == b"00010000" and parts[7].startswith(b"@" + prefix[1:]):
                    name = b"\0" + parts[7][1:]
                    if name not in names:
                        names.append(name)
    except OSError:
        pass
    return names


def held(lock_dir, uuids):
    """{uid: GPUs held now} over uuids: a whole lease counts 1, a slot of a GPU shared by k 1/k,
    a locked lease file (an older agent) 1."""
    out = {}
    for info in leases.holders(lock_dir, uuids).values():
        if info["how"] == "shared":
            for _slot, uid, _pid in info["slots"]:
                if uid is not None:
                    out[uid] = out.get(uid, 0.0) + 1.0 / info["share"]
        elif info["how"] in ("socket", "file") and info["uid"] is not None:
            out[info["uid"]] = out.get(info["uid"], 0.0) + 1.0
    return out


def split(free, users):
    """How many of `free` GPUs each waiting user gets, handed out one at a time to the one
    holding the fewest (held + given so far), ties to the longest waiting (then the uid).
    users: {uid: {"held", "since", "want"}} -> {uid: GPUs}."""
    given = {u: 0 for u in users}
    for _ in range(free):
        open_ = [u for u in users if given[u] < users[u]["want"]]
        if not open_:
            break
        u = min(open_, key=lambda x: (users[x]["held"] + given[x], users[x]["since"], x))
        given[u] += 1
    return given


def ahead(free, me, users, need):
    """None if user `me` may take `need` of the `free` GPUs now; else the uid whose turn it is."""
    given = split(free, users)
    if given.get(me, 0) >= need:
        return None
    others = [u for u in users if u != me and given[u] > 0]
    return min(others, key=lambda x: (users[x]["held"], users[x]["since"], x)) if others else None
