"""The listener's guard against hostile or broken peers (pynetdicom extension).

What any host that can reach the port may do before it is authenticated is
bounded here, so that no unauthenticated peer can stop the node from accepting
images, and no peer can make the listener read more than it advertised:

- **Connections before A-ASSOCIATE-AC** ("pending": TLS handshake, waiting for
  or reading the A-ASSOCIATE-RQ, waiting for the peer to close after a reject)
  are limited in total (``node.max_pending``), per peer address
  (``node.max_pending_per_host``) and per network (``node.max_pending_per_network``:
  a /24 for IPv4, a /64 for IPv6), apart from the established associations
  (``node.max_associations``). ``node.pending_reserve`` of the pending slots are
  kept for **known callers**: addresses an association was established from
  before (remembered since the listener started, the last
  :data:`MAX_KNOWN_ADDRESSES`). Known callers are bound by the total and their
  own address's limit only, so silent connections from many addresses of one
  network, or from many networks, cannot keep a caller that has sent before
  from associating. Over a limit, the TCP connection is closed at accept,
  before any thread or buffer is spent on it.
- **A fixed negotiation deadline** (``node.negotiation_timeout``) runs from the
  moment the connection is accepted, whatever the peer sends: the TLS handshake
  and the A-ASSOCIATE-RQ must both be done by then, or the connection is shut
  down. A byte now and then does not extend it.
- **The TLS handshake runs in the connection's own thread**, never in the
  accept loop.
- **A slot is freed as soon as its connection closes** (pynetdicom's
  EVT_CONN_CLOSE), and the association thread of a connection that closed
  before sending a request ends at once instead of waiting for its ACSE timeout.
- **No PDU longer than we accept is read**: its length is checked as soon as its
  6-byte header has arrived (PS3.8 9.3.1). A P-DATA-TF may carry at most the
  Maximum Length we advertise (PS3.8 D.1); any PDU before the association is
  established at most :data:`MAX_REQUEST_PDU`. Longer: A-ABORT (source
  service-provider, reason 6 "invalid PDU parameter value", PS3.8 9.3.8) and the
  connection is closed. The dataset of one DIMSE message is limited to
  ``node.max_dataset_mb`` the same way.
- **Malformed requests** (an even or duplicate presentation-context ID, a blank
  AE title, anything pynetdicom cannot turn into a primitive) are decoded here
  first with pynetdicom's own decoder; what fails gets an A-ABORT and one log
  line instead of an uncaught error in the protocol thread.
- **Every refusal and abort** is counted by reason
  (``ich_node_associations_refused_total{reason=...}``) and logged with the
  calling AE title (when known), the peer address and the reason, at most once
  per peer address and reason per minute (later lines carry how many were not
  logged): a flood of one kind never hides a refusal of another kind.
- **The called AE title** a request names is compared with ``node.ae_title``: a
  mismatch is logged once per peer address and title
  (``association.called_ae_mismatch``) and, with ``node.require_called_ae``,
  rejected (A-ASSOCIATE-RJ 1/1/7 "called AE title not recognised", PS3.8 9.3.4;
  as Orthanc's ``DicomCheckCalledAet``).

How pynetdicom is extended (its 3.0 extension points, no patch):
``AE.make_server(server_class=...)`` gives :class:`GuardedServer` (a
``ThreadedAssociationServer``) whose ``get_request`` no longer wraps TLS,
``verify_request`` applies the pending limits, ``process_request_thread`` runs
the TLS handshake and ``service_actions`` enforces the deadlines; its
``request_handler`` :class:`GuardedRequestHandler` gives each association a
:class:`GuardedSocket` (an ``AssociationSocket`` whose ``recv`` checks each PDU
as pynetdicom's DUL reads it: ``recv(6)`` for the header, then
``recv(length)``); the admission decision is an ``EVT_REQUESTED`` handler, which
pynetdicom documents as the place to reject an association.
``tests/test_hostile_peers.py`` fails if a pynetdicom upgrade changes any of it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import structlog
from pynetdicom import evt
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ich_node.ingest.refusals import RefusalTally
from ich_node.metrics import Metrics

log = structlog.get_logger(__name__)

#: Longest PDU accepted before the association is established (an
#: A-ASSOCIATE-RQ): 128 presentation contexts with 20 transfer syntaxes each
#: take about 70 KiB.
MAX_REQUEST_PDU: Final = 256 * 1024

#: One log line per peer address per this many seconds.
LOG_INTERVAL_S: Final = 60.0

#: Keys (peer, reason) remembered for rate-limited logging (oldest forgotten first).
_MAX_LOG_KEYS: Final = 4096

#: Addresses an association was established from, remembered (oldest forgotten first).
MAX_KNOWN_ADDRESSES: Final = 4096

_PDU_CLASSES: Final[dict[int, type[Any]]] = {
    0x01: A_ASSOCIATE_RQ,
    0x02: A_ASSOCIATE_AC,
    0x03: A_ASSOCIATE_RJ,
    0x04: P_DATA_TF,
    0x05: A_RELEASE_RQ,
    0x06: A_RELEASE_RP,
    0x07: A_ABORT_RQ,
}

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
_RJ_CALLING_AE: Final = (0x01, 0x01, 0x03)
_RJ_CALLED_AE: Final = (0x01, 0x01, 0x07)
_RJ_NO_CONTEXT: Final = (0x01, 0x01, 0x01)
_RJ_LIMIT: Final = (0x02, 0x03, 0x02)
_RJ_REASONS: Final = {
    _RJ_CALLING_AE: "calling_ae_not_recognised",
    _RJ_CALLED_AE: "called_ae_not_recognised",
    _RJ_LIMIT: "too_many_associations",
}

#: Every reason a connection or association is refused or aborted (metric label).
REASONS: Final = (
    "calling_ae_not_recognised",  # A-ASSOCIATE-RJ 1/1/3
    "calling_ae_wrong_host",  # A-ASSOCIATE-RJ 1/1/3
    "called_ae_not_recognised",  # A-ASSOCIATE-RJ 1/1/7 (node.require_called_ae)
    "no_acceptable_context",  # A-ASSOCIATE-RJ 1/1/1
    "too_many_associations",  # A-ASSOCIATE-RJ 2/3/2
    "rejected",  # any other A-ASSOCIATE-RJ
    "too_many_pending",  # TCP close at accept
    "too_many_pending_from_host",  # TCP close at accept
    "too_many_pending_from_network",  # TCP close at accept
    "negotiation_timeout",  # TCP shutdown at the deadline
    "tls_handshake_failed",  # TCP close
    "pdu_too_large",  # A-ABORT
    "dataset_too_large",  # A-ABORT
    "malformed_pdu",  # A-ABORT
    "closed_before_request",  # the peer closed before sending an A-ASSOCIATE-RQ
)


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """What one listener allows (from ``node``).

    Parameters
    ----------
    max_associations : int
        Established associations at a time.
    max_pending : int
        Connections not yet associated, from all peers together.
    max_pending_per_host : int
        Connections not yet associated, from one peer address.
    negotiation_timeout : float
        Seconds from accept to A-ASSOCIATE-AC (TLS handshake included).
    max_pdu : int
        Maximum Length we advertise (bytes, PS3.8 D.1); 0 means no limit.
    max_dataset : int
        Bytes of one DIMSE message's dataset.
    max_pending_per_network : int, optional
        Connections not yet associated, from one /24 (IPv4) or /64 (IPv6) network,
        from addresses not known; default twice ``max_pending_per_host``.
    pending_reserve : int, optional
        Pending slots only known callers may take; default a quarter of
        ``max_pending``.
    ae_title : str
        The node's AE title (the called AE title requests should name); empty:
        not checked.
    require_called_ae : bool
        Reject a request whose called AE title is not ``ae_title``.
    """

    max_associations: int
    max_pending: int
    max_pending_per_host: int
    negotiation_timeout: float
    max_pdu: int
    max_dataset: int
    max_pending_per_network: int | None = None
    pending_reserve: int | None = None
    ae_title: str = ""
    require_called_ae: bool = False

    @property
    def per_network(self) -> int:
        if self.max_pending_per_network is not None:
            return self.max_pending_per_network
        return 2 * self.max_pending_per_host

    @property
    def reserve(self) -> int:
        if self.pending_reserve is not None:
            return min(self.pending_reserve, self.max_pending - 1)
        return self.max_pending // 4


def network_of(host: str) -> str:
    """The network ``host`` counts in for the pending limits: its /24 (IPv4) or /64 (IPv6).

    An IPv4-mapped IPv6 address counts as its IPv4 address; anything that is not
    an IP address is its own network.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@dataclass(slots=True, eq=False)  # identity: kept in a set
class Connection:
    """One accepted TCP connection, from accept to close (mutable, guard-owned)."""

    host: str
    port: int
    deadline: float
    sock: socket.socket
    state: str = "pending"  # pending -> associated -> closed, or pending -> closed
    assoc: Any = None
    calling_ae: str | None = None
    refused: bool = False  # a reason was recorded (no second one for this connection)
    dataset_bytes: int = 0
    accepted_ids: frozenset[int] | None = None  # presentation contexts of the association
    known: bool = False  # an association was established from its address before
    network: str = ""  # network_of(host)


def _printable(value: object, limit: int = 16) -> str:
    """An AE title as it can be logged: printable ASCII only, at most ``limit`` chars."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return "".join(c if " " <= c <= "~" else "?" for c in text.strip())[:limit]


def shutdown(sock: socket.socket) -> None:
    """Shut the connection down (both directions) without closing the descriptor.

    A thread blocked reading it (TLS handshake, pynetdicom's DUL) then sees the
    end of the stream. ``socket.socket.shutdown`` is called even on an
    ``SSLSocket``, whose own ``shutdown`` would drop its TLS state under the
    reading thread's feet.
    """
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclass(slots=True)
class _PeerLog:
    last: float
    suppressed: int = 0


class RateLimit:
    """One log line per key (peer and reason) per ``interval`` seconds (thread-safe, bounded).

    :meth:`allow` says whether a line may be written now and, when it may, how many
    were held back for that key since the last one.
    """

    def __init__(
        self, interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, ...], _PeerLog] = {}

    def allow(self, *key: str) -> int | None:
        """``None`` when a line for ``key`` was written less than ``interval`` ago;
        else the number held back since (0 the first time)."""
        with self._lock:
            now = self.clock()
            entry = self._keys.get(key)
            if entry is not None and now - entry.last < self.interval:
                entry.suppressed += 1
                return None
            suppressed = entry.suppressed if entry is not None else 0
            self._keys.pop(key, None)
            self._keys[key] = _PeerLog(now)
            while len(self._keys) > _MAX_LOG_KEYS:
                del self._keys[next(iter(self._keys))]
            return suppressed


class Guard:
    """Slots, deadlines and refusal accounting of one listener (thread-safe).

    Parameters
    ----------
    limits : GuardLimits
    metrics : Metrics, optional
        Refusals are counted in ``metrics.refusals`` by reason.
    clock : callable
        Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        limits: GuardLimits,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._by_assoc: dict[int, Connection] = {}
        self._log = RateLimit(LOG_INTERVAL_S, clock)
        self._known: OrderedDict[str, None] = OrderedDict()  # addresses, oldest first
        self._called_logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        # By peer, calling AE and reason, for the web console (ingest/refusals.py).
        self.tally = RefusalTally()

    # -- slots ---------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(pending, associated) connections now."""
        with self._lock:
            pending = sum(1 for c in self._connections if c.state == "pending")
            return pending, sum(1 for c in self._connections if c.state == "associated")

    def open(self, sock: socket.socket, address: tuple[Any, ...]) -> Connection | None:
        """A connection was accepted: its record, or None (refused) over a pending limit.

        A known caller (see the module) is bound by ``max_pending`` and its
        address's limit; anyone else also by its network's limit and by
        ``max_pending`` less the reserve.
        """
        host, port = str(address[0]), int(address[1])
        limits = self.limits
        network = network_of(host)
        reason = None
        with self._lock:
            known = host in self._known
            pending = [c for c in self._connections if c.state == "pending"]
            if len(pending) >= limits.max_pending - (0 if known else limits.reserve):
                reason = "too_many_pending"
            elif sum(1 for c in pending if c.host == host) >= limits.max_pending_per_host:
                reason = "too_many_pending_from_host"
            elif not known and limits.per_network <= sum(
                1 for c in pending if not c.known and c.network == network
            ):
                reason = "too_many_pending_from_network"
            else:
                deadline = self.clock() + limits.negotiation_timeout
                conn = Connection(host, port, deadline, sock, known=known, network=network)
                self._connections.add(conn)
                return conn
        self.refuse(Connection(host, port, 0.0, sock, network=network), reason)
        return None

    def known(self, host: str) -> bool:
        """Whether an association was established from ``host`` since the start."""
        with self._lock:
            return host in self._known

    def called_ae_first_seen(self, host: str, called: str) -> bool:
        """True the first time ``called`` (not our AE title) comes from ``host``."""
        key = (host, called)
        with self._lock:
            if key in self._called_logged:
                return False
            self._called_logged[key] = None
            while len(self._called_logged) > _MAX_LOG_KEYS:
                self._called_logged.popitem(last=False)
            return True

    def bind(self, conn: Connection, assoc: Any) -> None:
        with self._lock:
            conn.assoc = assoc
            self._by_assoc[id(assoc)] = conn

    def connection(self, assoc: Any) -> Connection | None:
        with self._lock:
            return self._by_assoc.get(id(assoc))

    def admit(self, conn: Connection) -> bool:
        """Take an association slot for ``conn``; False when all are taken."""
        with self._lock:
            if conn.state != "pending":
                return conn.state == "associated"
            associated = sum(1 for c in self._connections if c.state == "associated")
            if associated >= self.limits.max_associations:
                return False
            conn.state = "associated"
            # Known from now on: its later connections may use the reserve.
            self._known.pop(conn.host, None)
            self._known[conn.host] = None
            while len(self._known) > MAX_KNOWN_ADDRESSES:
                self._known.popitem(last=False)
            return True

    def close(self, conn: Connection) -> None:
        """The connection closed: free its slot now (idempotent)."""
        with self._lock:
            if conn.state == "closed":
                return
            was = conn.state
            conn.state = "closed"
            self._connections.discard(conn)
            if conn.assoc is not None:
                self._by_assoc.pop(id(conn.assoc), None)
            assoc = conn.assoc
        if was == "pending" and not conn.refused:
            got_request = assoc is not None and assoc.requestor.primitive is not None
            if not got_request:
                self.refuse(conn, "closed_before_request")
        if was == "pending" and assoc is not None and assoc.requestor.primitive is None:
            # The association thread waits up to its ACSE timeout for an
            # A-ASSOCIATE-RQ that will never come: wake it (see on_requested).
            with contextlib.suppress(Exception):
                assoc.dul.to_user_queue.put(A_P_ABORT())

    def run_once(self, now: float | None = None) -> int:
        """Shut down pending connections past their deadline; returns how many."""
        now = self.clock() if now is None else now
        with self._lock:
            late = [c for c in self._connections if c.state == "pending" and c.deadline <= now]
        grace = self.limits.negotiation_timeout
        for conn in late:
            self.refuse(conn, "negotiation_timeout")
            shutdown(conn.sock)
            if conn.deadline + grace <= now:
                # Shut down a whole timeout ago and still here: its thread never
                # started or never ended. Never let that hold a slot.
                self.close(conn)
        return len(late)

    # -- refusals ------------------------------------------------------------
    def refuse(self, conn: Connection, reason: str, calling_ae: str | None = None) -> None:
        """Count and (rate-limited) log one refusal or abort; once per connection."""
        with self._lock:
            if conn.refused:
                return
            conn.refused = True
            if calling_ae is not None:
                conn.calling_ae = calling_ae
        # Per peer and reason: another kind of refusal from the same peer is logged.
        suppressed = self._log.allow(conn.host, reason)
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.refusals.labels(reason).inc()
        self.tally.add(conn.host, conn.calling_ae, reason)
        if suppressed is not None:
            log.warning(
                "association.refused",
                reason=reason,
                calling_ae=conn.calling_ae,
                peer=f"{conn.host}:{conn.port}",
                not_logged_since_last=suppressed,
            )


class OneLineErrors(logging.Filter):
    """pynetdicom logs a peer's broken connection with ``LOGGER.exception``: keep
    the line, drop the traceback (the exception's type is added to the message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            kind = record.exc_info[0].__name__ if record.exc_info[0] else "error"
            record.msg = f"{record.getMessage()} ({kind})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_pynetdicom_tracebacks() -> None:
    """Install :class:`OneLineErrors` on pynetdicom's protocol loggers (idempotent)."""
    for name in ("pynetdicom.dul", "pynetdicom.transport", "pynetdicom.events",
                 "pynetdicom.association", "pynetdicom.acse", "pynetdicom.fsm"):  # fmt: skip
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineErrors) for f in logger.filters):
            logger.addFilter(OneLineErrors())


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket wrapper, checking each PDU as the DUL reads it.

    pynetdicom's DUL reads a PDU with ``recv(6)`` (type, reserved, length) and
    then ``recv(length)``; the second call is refused here when ``length`` is
    more than we accept, and the bytes of a complete PDU are decoded once with
    pynetdicom's own classes before the state machine sees them.
    """

    guard: Guard
    conn: Connection
    _header: tuple[int, int] | None

    def attach(self, guard: Guard, conn: Connection) -> None:
        self.guard = guard
        self.conn = conn
        self._header = None

    def recv(self, nr_bytes: int) -> bytearray:
        header, self._header = self._header, None
        if header is None:
            data = super().recv(nr_bytes)
            if nr_bytes == 6 and len(data) == 6:
                pdu_type, _, length = struct.unpack(">BBL", data)
                if pdu_type in _PDU_CLASSES:
                    self._header = (pdu_type, length)
                else:  # pynetdicom answers it with A-ABORT (AA-1/AA-8); we count it
                    self.guard.refuse(self.conn, "malformed_pdu")
            return data
        pdu_type, length = header
        limits = self.guard.limits
        if self.conn.state != "associated" or pdu_type != 0x04:
            limit = MAX_REQUEST_PDU
        else:
            limit = limits.max_pdu or 2**32
        if nr_bytes != length or length > limit:
            return self._abort("pdu_too_large")
        data = super().recv(nr_bytes)
        if len(data) != nr_bytes:
            return data  # the peer closed: pynetdicom handles the short read
        if pdu_type == 0x04:
            return self._check_pdata(data)
        try:
            pdu = _PDU_CLASSES[pdu_type]()
            pdu.decode(struct.pack(">BBL", pdu_type, 0, length) + bytes(data))
            if pdu_type == 0x01:
                primitive = pdu.to_primitive()  # raises on even IDs, blank titles, ...
                ids = [cx.context_id for cx in primitive.presentation_context_definition_list]
                if len(ids) != len(set(ids)):
                    raise ValueError("duplicate presentation context ID")
        except Exception:
            return self._abort("malformed_pdu")
        return data

    def _check_pdata(self, data: bytearray) -> bytearray:
        """Walk the PDV items of a P-DATA-TF body (PS3.8 9.3.5.1, E.2) without copying.

        Each item needs a length of at least 2 inside the PDU and an accepted
        (odd) presentation-context ID; dataset fragments add up to at most
        ``max_dataset`` bytes per message.
        """
        accepted = self.conn.accepted_ids
        if accepted is None:
            ids = (int(cx.context_id or 0) for cx in self.assoc.accepted_contexts)
            accepted = self.conn.accepted_ids = frozenset(ids)
        offset, end = 0, len(data)
        while offset < end:
            if offset + 6 > end:
                return self._abort("malformed_pdu")
            (length,) = struct.unpack_from(">L", data, offset)
            if length < 2 or offset + 4 + length > end or data[offset + 4] not in accepted:
                return self._abort("malformed_pdu")
            control = data[offset + 5]
            if not control & 0x01:  # a dataset fragment
                self.conn.dataset_bytes += length - 2
                if self.conn.dataset_bytes > self.guard.limits.max_dataset:
                    return self._abort("dataset_too_large")
                if control & 0x02:  # its last fragment
                    self.conn.dataset_bytes = 0
            offset += 4 + length
        return data

    def _abort(self, reason: str) -> bytearray:
        """Send A-ABORT (service-provider, invalid PDU parameter value), shut down."""
        self.guard.refuse(self.conn, reason)
        sock = self.socket
        if sock is not None:
            abort = A_ABORT_RQ()
            abort.source = 0x02
            abort.reason_diagnostic = 0x06
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(1.0)
                sock.sendall(abort.encode())
            shutdown(sock)
        return bytearray()  # a short read: pynetdicom closes the association


class GuardedRequestHandler(RequestHandler):
    """One connection: the association runs and is waited for in this thread."""

    server: GuardedServer

    def handle(self) -> None:
        conn = self.server.current_connection()
        assoc = self._create_association()
        sock = assoc.dul.socket
        assert sock is not None
        # The wrapper pynetdicom made, given our recv (same object, same state).
        sock.__class__ = GuardedSocket
        cast(GuardedSocket, sock).attach(self.server.guard, conn)
        self.server.guard.bind(conn, assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the guard (see the module docstring).

    Built by ``AE.make_server(..., server_class=GuardedServer, guard=...,
    request_handler=GuardedRequestHandler)``.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, guard: Guard, **kwargs: Any) -> None:
        self.guard = guard
        self._local = threading.local()
        self._accepted: dict[int, Connection] = {}  # accept thread -> connection thread
        # C-STORE refusals by reason (ich_node.ingest.listener.StoreRefusals), set by
        # start_listener; the serving loop adds them to the store.
        self.store_refusals: Any = None
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Accept only: the TLS handshake happens in the connection's thread.
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        conn = self.guard.open(request, client_address)
        if conn is None:
            return False  # socketserver closes it
        self._accepted[id(request)] = conn
        return True

    def current_connection(self) -> Connection:
        return cast(Connection, self._local.conn)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn = self._accepted.pop(id(request))
        self._local.conn = conn
        try:
            request.settimeout(self.ae.network_timeout)
            if self.ssl_context is not None:
                tls = self.ssl_context.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False
                )
                conn.sock = request = tls
                try:
                    tls.do_handshake()
                except (OSError, ssl.SSLError, ValueError):
                    self.guard.refuse(conn, "tls_handshake_failed")
                    return
            self.finish_request(request, client_address)
        except Exception as exc:  # never a traceback from a peer's behaviour
            log.warning("listener.connection_error", error=type(exc).__name__, peer=conn.host)
        finally:
            self.guard.close(conn)
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback here; one log line instead."""
        kind = type(sys.exc_info()[1]).__name__
        log.warning("listener.connection_error", error=kind, peer=str(client_address[0]))

    def service_actions(self) -> None:
        """Called by ``serve_forever`` about twice a second: enforce the deadlines."""
        super().service_actions()
        with contextlib.suppress(Exception):
            self.guard.run_once()


# -- event handlers (bound on the server; they never raise) ---------------------


class AllowList(Protocol):
    """The calling AE titles allowed (``listener.CallerAllowList``)."""

    titles: frozenset[str]

    def allowed(self, address: str | None) -> list[str]: ...


def on_requested(event: evt.Event, guard: Guard, callers: AllowList) -> None:
    """EVT_REQUESTED: admit or reject the association before pynetdicom negotiates.

    Rejections (PS3.8 9.3.4): an unknown calling AE title, or a known one from
    another host: 1/1/3; no presentation context we can accept: 1/1/1 (as DCMTK's
    storescp); every association slot taken: 2/3/2.
    """
    assoc = event.assoc
    conn = guard.connection(assoc)
    primitive = assoc.requestor.primitive
    if not isinstance(primitive, A_ASSOCIATE):
        # Woken by Guard.close: the peer closed before sending a request.
        assoc.is_aborted = True
        return
    if conn is None:
        return  # not ours (pynetdicom negotiates as usual)
    try:
        calling = _printable(primitive.calling_ae_title)
        called = _printable(primitive.called_ae_title)
        conn.calling_ae = calling
        reason, rj = None, None
        own = guard.limits.ae_title
        if calling not in callers.allowed(assoc.requestor.address):
            known = calling in callers.titles
            reason = "calling_ae_wrong_host" if known else "calling_ae_not_recognised"
            rj = _RJ_CALLING_AE
        elif own and called != own and _called_ae_refused(guard, conn, calling, called):
            reason, rj = "called_ae_not_recognised", _RJ_CALLED_AE
        else:
            roles = {
                uid: (item.scu_role, item.scp_role)
                for uid, item in assoc.requestor.role_selection.items()
            }
            result, _ = negotiate_as_acceptor(
                primitive.presentation_context_definition_list,
                assoc.acceptor.supported_contexts,
                roles,
            )
            if not any(cx.result == 0x00 for cx in result):
                reason, rj = "no_acceptable_context", _RJ_NO_CONTEXT
            elif not guard.admit(conn):
                reason, rj = "too_many_associations", _RJ_LIMIT
    except Exception:
        reason, rj = "malformed_pdu", _RJ_NO_CONTEXT
    if rj is None:
        return
    guard.refuse(conn, cast(str, reason), conn.calling_ae)
    assoc.acse.send_reject(*rj)
    assoc.kill()  # as pynetdicom does after its own rejections: the RJ is sent first


def _called_ae_refused(guard: Guard, conn: Connection, calling: str, called: str) -> bool:
    """Log a called AE title that is not ours (once per peer and title); refuse it?"""
    refuse = guard.limits.require_called_ae
    if guard.called_ae_first_seen(conn.host, called):
        log.warning(
            "association.called_ae_mismatch",
            called_ae=called,
            expected=guard.limits.ae_title,
            calling_ae=calling,
            peer=conn.host,
            action="refused (node.require_called_ae)" if refuse else "accepted",
        )
    return refuse


def on_rejected(event: evt.Event, guard: Guard) -> None:
    """EVT_REJECTED: a rejection pynetdicom made itself is counted and logged too."""
    conn = guard.connection(event.assoc)
    if conn is None:
        return
    with contextlib.suppress(Exception):
        rj: Any = event.assoc.acceptor.primitive
        key = (rj.result, rj.result_source, rj.diagnostic)
        guard.refuse(conn, _RJ_REASONS.get(key, "rejected"), conn.calling_ae)


def on_conn_close(event: evt.Event, guard: Guard) -> None:
    """EVT_CONN_CLOSE: the slot is free from this moment."""
    conn = guard.connection(event.assoc)
    if conn is not None:
        guard.close(conn)
