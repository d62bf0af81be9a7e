"""Wait for a job's folder to change: its log growing, its exit file appearing.

On Linux this is inotify, reached through ctypes (standard library), so `logs --follow` wakes
the moment the job writes instead of on the next poll: this is most of the log latency.
Anywhere else, or when inotify is unavailable (no ctypes, out of watches or instances), it
falls back to a short sleep, and the caller then learns nothing about what changed.
"""
import errno
import os
import select
import struct
import sys
import time

from . import fsutil

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")
_MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF


class Watch:
    """watch = Watch(folder); names = watch.wait(timeout): a set of the file names in the folder
    that changed, an empty set on timeout, or None when it cannot tell (polling; overflow)."""

    def __init__(self, folder, poll=0.01):
        self.poll = poll
        self.fd = None
        if sys.platform.startswith("linux") and not os.environ.get("RTRAIN_AGENT_NO_INOTIFY"):
            try:
                self._open(folder)
            except Exception:  # noqa: BLE001 - any failure means: poll instead
                self.close()

    @property
    def kind(self):
        return "inotify" if self.fd is not None else "poll"

    def _open(self, folder):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        init1, add = libc.inotify_init1, libc.inotify_add_watch
        init1.argtypes = [ctypes.c_int]
        init1.restype = ctypes.c_int
        add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        add.restype = ctypes.c_int
        fd = init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd = fd
        if add(fd, os.fsencode(folder), _MASK) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def wait(self, timeout):
        if self.fd is None:
            time.sleep(max(0.0, min(self.poll, timeout)))
            return None
        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        except InterruptedError:
            return None
        if not ready:
            return set()
        return self._drain()

    def _drain(self):
        names = set()
        size = 65536
        while True:
            try:
                buf = os.read(self.fd, size)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return names
                raise
            if not buf:
                return names
            i = 0
            while i + _EVENT.size <= len(buf):
                _wd, mask, _cookie, n = _EVENT.unpack_from(buf, i)
                name = buf[i + _EVENT.size:i + _EVENT.size + n].rstrip(b"\0")
                i += _EVENT.size + n
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    self.close()  # the folder went away: poll from now on
                    return None
                if mask & IN_Q_OVERFLOW:
                    return None
                names.add(os.fsdecode(name))
            if len(buf) < size // 2:  # it held every pending event: no need to ask again
                return names

    def close(self):
        self.fd = fsutil.close_quietly(self.fd)
