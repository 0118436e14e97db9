"""A total deadline for one delivery attempt: connect, negotiation, every read and write.

The libraries' timeouts bound one operation each (pynetdicom's ACSE/DIMSE/network
timeouts, ``socket`` timeouts under ``http.client``, ``smtplib`` and ``requests``;
urllib3's ``Timeout(total=...)`` too, once the response is being read): a peer that
sends one byte a second, or an SMTP ``220-`` continuation line every two seconds,
resets them forever. Each transport therefore sets its libraries' timeouts to
what is left of the attempt (:meth:`Deadline.op_timeout`) and hands its sockets
to a :class:`Deadline`, whose timer shuts them down when the time is up (or at
once when the node stops): the blocked read or write returns with an error, the
attempt fails and is recorded ("total deadline of N s passed"), and the thread
is free again. ``shutdown(2)`` acts on the connection, not on one descriptor, so
a duplicate taken at connect time still cuts a socket that TLS later wrapped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

#: The shortest per-operation timeout handed to a library (seconds): a zero or
#: negative timeout would make a socket non-blocking instead of failing.
MIN_OP_SECONDS: Final = 0.05


class AttemptCut(RuntimeError):
    """An attempt ended by its deadline or by the node stopping."""


class Deadline:
    """The end of one attempt, ``seconds`` from now (monotonic clock).

    Its timer runs from its creation; :meth:`close` (or leaving a ``with`` block)
    ends it and releases what it holds. :meth:`stop` ends the attempt at once (the
    node is stopping): the attempt is then not charged, and sent again after the
    restart.
    """

    def __init__(self, seconds: float, what: str = "attempt") -> None:
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, got {seconds!r}")
        self.seconds = float(seconds)
        self.what = what
        self.at = time.monotonic() + self.seconds
        self.expired = False
        self.stopped = False
        self._lock = threading.Lock()
        self._closers: list[Callable[[], object]] = []
        self._dups: list[socket.socket] = []
        self._timer = threading.Timer(self.seconds, self._fire, kwargs={"stopped": False})
        self._timer.daemon = True
        self._timer.start()

    # -- what the transports use -------------------------------------------------

    def left(self) -> float:
        """Seconds left (0 when past)."""
        return max(0.0, self.at - time.monotonic())

    def op_timeout(self, idle: float) -> float:
        """A per-operation timeout: ``idle``, but never past the deadline."""
        return max(MIN_OP_SECONDS, min(float(idle), self.left()))

    @property
    def cut(self) -> bool:
        """True when the deadline passed or the node is stopping."""
        return self.expired or self.stopped

    def reason(self) -> str:
        """Why the attempt was cut, in words (empty when it was not)."""
        if self.stopped:
            return "cut short by the node stopping"
        if self.expired:
            return f"total deadline of {self.seconds:g} s for one attempt passed"
        return ""

    def check(self) -> None:
        """Raise :class:`AttemptCut` when the attempt must end."""
        if self.cut or self.left() <= 0:
            self.expired = self.expired or not self.stopped
            raise AttemptCut(self.reason())

    def on_cut(self, closer: Callable[[], object]) -> None:
        """Call ``closer`` when the attempt is cut (at once when it already is)."""
        with self._lock:
            if not self.cut:
                self._closers.append(closer)
                return
        with contextlib.suppress(Exception):
            closer()

    def watch(self, sock: socket.socket) -> socket.socket:
        """Shut ``sock``'s connection down when the attempt is cut; returns ``sock``."""
        try:
            dup = sock.dup()
        except OSError:
            return sock
        with self._lock:
            self._dups.append(dup)

        def shut() -> None:
            dup.shutdown(socket.SHUT_RDWR)

        self.on_cut(shut)
        return sock

    # -- the timer ---------------------------------------------------------------

    def _fire(self, *, stopped: bool) -> None:
        with self._lock:
            if self.cut:
                return
            if stopped:
                self.stopped = True
            else:
                self.expired = True
            closers, self._closers = self._closers, []
        for closer in closers:
            with contextlib.suppress(Exception):
                closer()

    def stop(self) -> None:
        """The node is stopping: cut the attempt now."""
        self._fire(stopped=True)

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the timer and release the sockets' duplicates (the attempt is over)."""
        self._timer.cancel()
        with self._lock:
            dups, self._dups = self._dups, []
            self._closers = []
        for dup in dups:
            with contextlib.suppress(OSError):
                dup.close()
