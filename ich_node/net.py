"""Socket settings shared by the listener and the sender."""

from __future__ import annotations

import contextlib
import socket

from pynetdicom import evt


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY, so small PDUs don't wait for Nagle/delayed ACKs."""
    with contextlib.suppress(Exception):
        event.assoc.dul.socket.socket.setsockopt(  # type: ignore[union-attr]
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
