"""Who owns which abstract Unix socket, asked of the kernel (sock_diag over netlink, what
`ss -xle` shows) without connecting to any of them (docs/design.md "Fair share between users").

Connecting to a listening socket that never accepts leaves a connection in its queue until the
holder exits; a daemon asking every 0.2 s who holds each GPU would fill the queue of a long
job's lease and then learn nothing more (EAGAIN). The socket's owner (UDIAG_SHOW_UID, Linux >=
5.3) comes from the kernel and cannot be faked. owners() returns None where the kernel cannot
say; the callers then connect and ask SO_PEERCRED (leases.name_holders).
Standard library only, Python >= 3.8.
"""
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_UID = 0x01, 0x40
UNIX_DIAG_NAME, UNIX_DIAG_UID = 0, 7
TCP_CLOSE, TCP_LISTEN = 7, 10   # bound but not listening (a squatter), listening
_HDR = struct.Struct("=IHHII")             # nlmsghdr
_REQ = struct.Struct("=BBHIIIII")          # unix_diag_req
_MSG = struct.Struct("=BBBBIII")           # unix_diag_msg
_ATTR = struct.Struct("=HH")               # rtattr


def owners(prefix):
    """{abstract socket name (bytes, leading NUL): uid} of the listening (or bound but not
    listening) Unix sockets whose name starts with prefix; None where the kernel cannot say.
    A connection waiting in a listener's queue bears its name too, and the connecting user's
    uid: only LISTEN and CLOSE sockets are asked for."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0),
                          NETLINK_SOCK_DIAG)
    except (OSError, AttributeError):
        return None
    try:
        s.settimeout(2.0)
        req = _REQ.pack(socket.AF_UNIX, 0, 0, (1 << TCP_LISTEN) | (1 << TCP_CLOSE), 0,
                        UDIAG_SHOW_NAME | UDIAG_SHOW_UID, 0xffffffff, 0xffffffff)
        s.send(_HDR.pack(_HDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        out = {}
        uid_seen = False
        while True:
            data = s.recv(1 << 16)
            if not data:
                return None
            pos = 0
            while pos + _HDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, pos)
                if length < _HDR.size:
                    return None
                if kind == NLMSG_DONE:
                    return out if (uid_seen or not out) else None
                if kind == NLMSG_ERROR:
                    return None
                if kind == SOCK_DIAG_BY_FAMILY:
                    name, uid = _parse(data[pos + _HDR.size:pos + length])
                    if uid is not None:
                        uid_seen = True
                    if name is not None and name.startswith(prefix):
                        if uid is None:
                            return None  # a kernel without UDIAG_SHOW_UID
                        out[name] = uid
                pos += (length + 3) & ~3
    except OSError:
        return None
    finally:
        s.close()


def _parse(body):
    """(name, uid) of one unix_diag_msg and its attributes."""
    name = uid = None
    pos = _MSG.size
    while pos + _ATTR.size <= len(body):
        alen, atype = _ATTR.unpack_from(body, pos)
        if alen < _ATTR.size:
            break
        value = body[pos + _ATTR.size:pos + alen]
        if atype == UNIX_DIAG_NAME:
            name = bytes(value)
        elif atype == UNIX_DIAG_UID and len(value) >= 4:
            uid = struct.unpack_from("=I", value)[0]
        pos += (alen + 3) & ~3
    return name, uid


def available():
    """True where owners() works (for tests and `rtrain hosts`)."""
    return owners(b"\0rtrain-") is not None

