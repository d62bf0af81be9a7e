"""Reaching a job's port and a host's terminal from the laptop: what `rtrain forward`, `shell`,
`jupyter` and `tensorboard` stand on (docs/design.md "Interactive"). Each transport offers
`forward(remote_port, local_port)` and `interactive(argv)`: OpenSSH asks its shared connection to
forward (`ssh -O forward`) and gives `ssh -t` this terminal; paramiko and the local host use the
Relay and the terminal pump below. Ports are always 127.0.0.1 on both ends: nothing is opened to
the network."""
import os
import select
import socket
import sys
import threading


def free_port(preferred=None):
    """`preferred` if it is free on 127.0.0.1, else a port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
    raise OSError("no free port on 127.0.0.1")


class Relay:
    """Listens on 127.0.0.1:local_port; each connection is piped to what opener() returns (a
    socket, or a paramiko channel: anything with fileno, recv, sendall, close)."""

    def __init__(self, opener, local_port=0):
        self.opener = opener
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", local_port or 0))
        self.sock.listen(16)
        self.local_port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, name="rtrain-forward", daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn):
        try:
            other = self.opener()
        except Exception:  # noqa: BLE001 - the far end refused: this one connection fails
            conn.close()
            return
        try:
            pump([conn, other])
        finally:
            for s in (conn, other):
                try:
                    s.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

    def close(self):
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def pump(ends):
    """Copy bytes both ways between two socket-likes until either closes."""
    a, b = ends
    while True:
        ready, _, _ = select.select([a, b], [], [], 1.0)
        for src in ready:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            (b if src is a else a).sendall(data)


def terminal_pump(chan):
    """Give this terminal to a paramiko channel with a pty: raw mode here, bytes both ways, until
    the remote end closes. Returns its exit status."""
    import termios
    import tty
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if os.isatty(fd) else None
    try:
        if old is not None:
            tty.setraw(fd)
        while True:
            ready, _, _ = select.select([chan, fd], [], [])
            if chan in ready:
                data = chan.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if fd in ready:
                data = os.read(fd, 4096)
                if not data:
                    chan.shutdown_write()
                else:
                    chan.sendall(data)
    finally:
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
    return chan.recv_exit_status()


def terminal_size():
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.columns, size.lines
    except OSError:
        return 80, 24
