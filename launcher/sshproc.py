"""One `ssh` child running the agent, as an AgentProcess (transport.py): its stdin and stdout are
the agent's, exactly like paramiko's exec channel.

The remote command is `echo MARKER && exec python3 ...`: the marker line says that the session
is open and the command started (what paramiko's exec_command returning says), and anything a
chatty shell start-up file printed before it is dropped. Until it comes, nothing the client
wrote can have reached the agent (`delivered` is False).

Every read and write gives up after the host's io_timeout without progress (a network that died
without a reset). Over a shared connection that was already up (docs/contracts.md, "Transports"),
the master may be dead while its process still answers (a laptop that slept, changed networks):
if the marker has not come within the host's connect_timeout, or the mux client fails (exit 255)
before it, the master is dropped and the call started again on a fresh connection, with the
bytes already written sent again. That is safe: the agent's verbs that change state are
idempotent or keyed (cancel of a cancelled job, submit by its token)."""
import os
import select
import subprocess
import threading
import time

from .errors import HostError
from .sshcommon import connection_lost, no_answer
from .transport import AgentProcess, close_stream

MARKER = b"rtrain-session-open"
_TICK = 0.25


class _Restart(Exception):
    """The shared connection is dead: start again on a fresh one."""


class SshProcess(AgentProcess):
    def __init__(self, transport, remote_cmd):
        self.t = transport
        self.cmd = remote_cmd
        self.timeout = transport.io_timeout
        self._pending = []      # what was written before the marker came back
        self._got = False       # the marker came: the session is open, the command started
        self._stdin_closed = False
        self._buf = bytearray()
        self._eof = False
        self._restarted = False
        self._rc = None
        self._spawn(transport.before_start())

    # ------------------------------------------------------------------ the child
    def _spawn(self, mode):
        """mode: 'reused' (a master was up), 'auto' (may make one), 'direct' (no sharing)."""
        self.mode = mode
        try:
            self.p = subprocess.Popen(self.t.argv(self.cmd, direct=(mode == "direct")),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, bufsize=0)
        except OSError as e:
            raise HostError(self.t.name, "cannot run %s: %s" % (self.t.ssh, e.strerror or e),
                            "install the OpenSSH client, or set `transport: paramiko` for this "
                            "host in hosts.yaml", permanent=True)
        self._wake_r, self._wake_w = os.pipe()
        for f in (self.p.stdin, self.p.stdout):
            os.set_blocking(f.fileno(), False)
        self._err = bytearray()
        self._err_thread = threading.Thread(target=self._drain_err, args=(self.p.stderr, self._err),
                                            daemon=True)
        self._err_thread.start()
        self._started = self._last = time.monotonic()
        self._interrupted = False
        self.t.register(self)

    @staticmethod
    def _drain_err(f, into):
        try:
            for chunk in iter(lambda: f.read(65536), b""):
                into += chunk
        except (OSError, ValueError):
            pass
        finally:
            try:
                f.close()
            except OSError:
                pass

    def done(self):
        """The child has exited and everything it wrote has been read: its pipes may go."""
        if self.p.poll() is None or self._buf:
            return False
        try:
            import fcntl
            import struct
            import termios
            n = fcntl.ioctl(self.p.stdout.fileno(), termios.FIONREAD, b"\0\0\0\0")
            return struct.unpack("i", n)[0] == 0
        except (OSError, ValueError):
            return True  # closed already

    def _reap(self, timeout):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _close_fds(self):
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def _end_child(self):
        try:
            self.p.kill()
        except OSError:
            pass
        self._reap(2)
        self._close_fds()
        self.t.unregister(self)

    def _restart(self, why):
        """Drop the dead master (or go around it) and start again, fresh; send again what the
        first child was given."""
        if self._restarted:
            raise self._failure()
        self._restarted = True
        if why == "exited":
            self._reap(5)
            self._err_thread.join(1)
            why = "mux" if self.t.is_mux_refusal(bytes(self._err)) else "dead"
        self._end_child()
        if why == "mux":
            mode = "direct"  # the master would not take a session: go around it
        else:
            self.t.drop_master()
            mode = "auto"
        self._spawn(mode)
        for chunk in self._pending:
            self._write_all(chunk)
        if self._stdin_closed:
            self._close_stdin_fd()

    def _failure(self):
        """The error for a child that ended: ssh's own (exit 255), mapped, or a lost connection."""
        rc = self._reap(5)
        self._err_thread.join(2)
        err = bytes(self._err).decode("utf-8", "replace")
        if rc == 255:
            return self.t.failure(err, mid_session=self._got)
        return connection_lost(self.t.name, "ssh exited with %s" % rc)

    # ------------------------------------------------------------------ waiting
    def _in_doubt(self):
        return not self._got and self.mode == "reused"

    def _wait(self, fd, write):
        while True:
            if self._wake_r < 0 or self._interrupted:
                raise connection_lost(self.t.name, "closed")
            try:
                r, w, _ = select.select([fd, self._wake_r], [fd] if write else [], [], _TICK)
            except (OSError, ValueError):
                raise connection_lost(self.t.name, "closed")
            if self._wake_r in r:
                raise connection_lost(self.t.name, "closed")
            if (w if write else r):
                return
            now = time.monotonic()
            if self._in_doubt():
                if now - self._started >= self.t.doubt_s:
                    raise _Restart("dead")
                if self.p.poll() == 255:
                    raise _Restart("exited")  # the mux client gave up before any output
            if now - self._last >= self.timeout:
                self.t.drop_master()  # a silent network: the shared connection is dead too
                self._end_child()
                raise no_answer(self.t.name, self.timeout)

    @property
    def delivered(self):
        """False while the session is not known to be open: nothing written can have arrived."""
        return self._got

    def _proven(self):
        if not self._got:
            self._got = True
            self._pending = []
            self.t.proven()

    # ------------------------------------------------------------------ AgentProcess
    def write(self, data):
        data = bytes(data)
        if self._in_doubt():
            self._pending.append(data)
        try:
            self._write_all(data)
        except _Restart as e:
            self._restart(e.args[0])  # sends it all again, this chunk included

    def _write_all(self, data):
        view = memoryview(data)
        while view:
            self._wait(self.p.stdin.fileno(), True)
            try:
                n = os.write(self.p.stdin.fileno(), view[:65536])
            except BlockingIOError:
                continue
            except OSError:
                if self._in_doubt() and self._reap(5) == 255:
                    raise _Restart("exited")
                raise self._failure_sending()
            view = view[n:]
            self._last = time.monotonic()

    def _failure_sending(self):
        e = self._failure()
        if "connection lost" in e.detail and "while sending" not in e.detail:
            return connection_lost(self.t.name, e.detail.split(": ", 1)[-1], sending=True)
        return e

    def _close_stdin_fd(self):
        close_stream(self.p.stdin)

    def close_stdin(self):
        self._stdin_closed = True
        self._close_stdin_fd()

    def readline(self):
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                if not self._got:
                    if line.rstrip(b"\r\n").endswith(MARKER):
                        self._proven()
                    continue  # the marker, or what the shell printed before it
                return line
            if self._eof:
                line = bytes(self._buf)
                self._buf.clear()
                return line
            try:
                self._wait(self.p.stdout.fileno(), False)
                data = os.read(self.p.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                continue
            except _Restart as e:
                self._restart(e.args[0])
                continue
            except (OSError, ValueError):
                raise connection_lost(self.t.name, "closed")
            if data:
                self._buf += data
                self._last = time.monotonic()
                continue
            # EOF. Before any output over a reused master, a failing mux client is a dead or
            # unwilling master: once more, fresh
            if self._in_doubt() and not self._restarted and self._reap(5) == 255:
                self._restart("exited")
                continue
            self._eof = True

    def wait(self):
        self.close_stdin()
        deadline = time.monotonic() + self.timeout
        rc = None
        while rc is None:
            rc = self._reap(_TICK)
            if rc is None and self._interrupted:
                self._end_child()
                raise connection_lost(self.t.name, "closed")
            if rc is None and time.monotonic() > deadline:
                self._end_child()
                raise no_answer(self.t.name, self.timeout)
        self._err_thread.join(2)
        self._rc = rc
        self._end_child()
        if rc == 255:
            raise self.t.failure(bytes(self._err).decode("utf-8", "replace"), mid_session=self._got)
        return rc

    def stderr(self):
        return bytes(self._err).decode("utf-8", "replace")

    def kill(self):
        self._end_child()

    def interrupt(self):
        """From another thread (close()): make the blocked read or write fail at once."""
        self._interrupted = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        try:
            self.p.kill()
        except OSError:
            pass
