"""A loopback TCP proxy for tests of dying networks (127.0.0.1 only)."""
import select
import socket
import threading


class FreezingProxy:
    """A loopback TCP proxy to sshd; freeze() makes every open connection go silent: nothing is
    forwarded and nothing is closed, as when a network dies without a RST. New connections
    are forwarded again."""

    def __init__(self, target_port):
        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(50)
        self.port = self.lsock.getsockname()[1]
        self.conns = []   # [(client sock, server sock, frozen event)]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        """Each client connection gets one to the target and a pump of its own; the listening
        socket's close ends the loop."""
        try:
            while not self.closed:
                c = self.lsock.accept()[0]
                entry = (c, socket.create_connection(("127.0.0.1", self.target)), threading.Event())
                self.conns.append(entry)
                threading.Thread(target=self._pump, args=entry, daemon=True).start()
        except OSError:
            return

    def _pump(self, a, b, frozen):
        peer = {a: b, b: a}
        while not frozen.is_set() and not self.closed:
            try:
                r, _, _ = select.select([a, b], [], [], 0.1)
                for s in r:
                    if frozen.is_set():
                        break
                    data = s.recv(65536)
                    if not data:
                        a.close()
                        b.close()
                        return
                    peer[s].sendall(data)
            except OSError:
                return

    def freeze(self):
        n = 0
        for _, _, frozen in self.conns:
            if not frozen.is_set():
                frozen.set()
                n += 1
        return n

    def close(self):
        self.closed = True
        self.lsock.close()
        for c, s, _ in self.conns:
            for x in (c, s):
                try:
                    x.close()
                except OSError:
                    pass
