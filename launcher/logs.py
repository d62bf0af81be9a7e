"""`rtrain logs [-f]`: a job's log, byte for byte, resumed by byte offset across dropped
connections, with a watchdog for networks that die silently (docs/contracts.md "Log stream")."""
import os
import time

from . import hosts as hostsmod
from .errors import AgentReplyError, HostError, RtrainError


LOGS_HEARTBEAT_S = 2.0   # the agent says "still here" this often while a followed log is quiet
LOGS_STALL_S = 15.0      # nothing at all for this long: the network died silently; reconnect
CONNECT_STALL_FACTOR = 4  # ... and this many times that before the first frame of a connection


def logs(session, ref, follow=False, tail=None, retry_for=None, sleep=time.sleep, stall_after=None):
    """Yield ("data", bytes), ("reconnecting", attempt, error, delay), ("resumed",) and last
    ("end", job) events. While following, a dropped connection is retried with backoff and the
    stream resumes from the byte offset reached: no byte twice, none missing. A connection that
    goes silent (no data and no heartbeat for `stall_after` seconds, RTRAIN_LOGS_STALL_S) counts
    as dropped: without a RST, TCP alone would wait many minutes to notice."""
    import base64
    host, n = session.locate(ref)  # the logs call itself says when there is no such job
    if stall_after is None:
        stall_after = float(os.environ.get("RTRAIN_LOGS_STALL_S") or LOGS_STALL_S)
    offset = None
    attempt = 0
    started = time.monotonic()
    watchdog = _Watchdog(stall_after)
    try:
        while True:
            req = {"id": n, "follow": bool(follow), "heartbeat": LOGS_HEARTBEAT_S}
            if offset is None:
                if tail is not None:
                    req["tail_lines"] = int(tail)
            else:
                req["offset"] = offset
            try:
                client = session.client(host)
                # until the first frame, the connection is still being made (SSH handshake, agent
                # start-up on a busy host): allow more, lest a slow start be taken for a dead one
                # abort(): the connection went silent, so a shared one is dead too (openssh.py)
                t = getattr(client, "transport", None)
                watchdog.arm(getattr(t, "abort", None) or getattr(t, "close", None),
                             limit=CONNECT_STALL_FACTOR * stall_after)
                for frame in client.stream("logs", req):
                    watchdog.pet()
                    if attempt:
                        attempt = 0
                        yield ("resumed",)
                    if "final" in frame:
                        fin = frame["final"]
                        yield ("end", {"id": session.job_id(host, n), "host": host, **fin})
                        return
                    if "d" in frame:
                        data = base64.b64decode(frame["d"])
                        o = frame["o"]
                        if offset is None:
                            offset = o
                        if o > offset:
                            raise RtrainError("log stream from %s skipped bytes %d-%d" % (host, offset, o),
                                              "run the command again; this is a bug worth reporting")
                        data = data[offset - o:]
                        if data:
                            offset += len(data)
                            watchdog.paused = True  # a slow terminal is not a dead network
                            try:
                                yield ("data", data)
                            finally:
                                watchdog.paused = False
                                watchdog.pet()
                    elif "hb" in frame:
                        if offset is None:
                            offset = frame["hb"]
            except AgentReplyError as err:
                if err.code == "no_such_job":
                    raise hostsmod.not_found(ref)
                raise
            except HostError as caught:
                e = caught if not watchdog.fired else HostError(
                    host, "no word from the host for %gs" % watchdog.fired,
                    "check the network; RTRAIN_LOGS_STALL_S sets the limit")
                if not follow or e.permanent:
                    raise e
                attempt += 1
                if retry_for is not None and time.monotonic() - started > retry_for:
                    raise e
                if attempt > 3 and "authentication refused" in e.detail:
                    raise e  # once can be a drop mid-handshake; again and again is a refusal
                delay = min(10.0, 0.5 * (2 ** (attempt - 1)))
                yield ("reconnecting", attempt, e, delay)
                session.reset(host)
                sleep(delay)
            finally:
                watchdog.disarm()
    finally:
        watchdog.stop()


class _Watchdog:
    """Calls `closer` (the connection's close) when no frame came for `limit` seconds while
    armed (a longer limit, given to arm(), until the first frame); the blocked read then fails
    and logs() reconnects. Paused while the caller holds a yielded event (a slow terminal is
    not a dead network). `fired` is the limit that ran out, or False."""

    def __init__(self, limit):
        import threading
        self.limit = float(limit)
        self._limit = self.limit  # the limit now: longer until the first frame
        self._cv = threading.Condition()
        self._closer = None
        self._last = time.monotonic()
        self.paused = False   # set while the caller holds a yielded event
        self._stopped = False
        self.fired = False
        self._thread = None
        self._threading = threading

    def arm(self, closer, limit=None):
        with self._cv:
            self._closer = closer
            self._limit = self.limit if limit is None else max(self.limit, float(limit))
            self._last = time.monotonic()
            self.fired = False
            if closer is not None and self._thread is None and self.limit > 0:
                self._thread = self._threading.Thread(target=self._run, name="rtrain-logs-watchdog",
                                                      daemon=True)
                self._thread.start()

    def pet(self):
        self._last = time.monotonic()
        self._limit = self.limit

    def disarm(self):
        with self._cv:
            self._closer = None

    def stop(self):
        with self._cv:
            self._stopped = True
            self._closer = None
            self._cv.notify_all()

    def _run(self):
        tick = max(0.05, min(1.0, self.limit / 5))
        while True:
            with self._cv:
                if self._stopped:
                    return
                self._cv.wait(tick)
                closer = None
                if (self._closer is not None and not self.paused
                        and time.monotonic() - self._last > self._limit):
                    # fire again after another `limit` if this did not end the attempt (the
                    # connection was still being made, say)
                    closer, self._last = self._closer, time.monotonic()
                    self.fired = self._limit
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001 - closing a dead connection is best effort
                    pass
