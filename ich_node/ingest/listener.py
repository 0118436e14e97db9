"""The listener: C-ECHO and C-STORE SCP for CT images (pynetdicom).

Only the calling AE titles in ``callers`` (and, where an entry names a host, only
from that host) may associate; any other association is rejected at association
time with A-ASSOCIATE-RJ (rejected-permanent, source service-user, reason 0x03
"calling AE title not recognised", PS3.8 9.3.4). The node's own AE title is
accepted from the loopback address so that ``ich-node health`` can echo it.

This module never imports torch: the process that accepts images must keep
accepting them when a worker runs out of memory.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, cast

import structlog
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_dimse_recv_handler
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)

from ich_node.config import Caller, NodeConfig
from ich_node.ingest.guard import (
    Guard,
    GuardedRequestHandler,
    GuardedServer,
    GuardLimits,
    RateLimit,
    on_conn_close,
    on_rejected,
    on_requested,
    quiet_pynetdicom_tracebacks,
)
from ich_node.ingest.spool import (
    CANNOT_UNDERSTAND,
    Spool,
    SpoolError,
    UnusableInstance,
    instance_record,
)
from ich_node.metrics import Metrics
from ich_node.net import set_nodelay
from ich_node.tls import server_context

log = structlog.get_logger(__name__)

#: The storage SOP classes the node accepts (PS3.4 B.5).
STORAGE_CLASSES: Final = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

#: Transfer syntaxes a PACS or scanner commonly sends; the files are spooled as
#: received and decoded by the worker.
TRANSFER_SYNTAXES: Final = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessP14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})

# C-STORE statuses (PS3.4 B.2.3)
SUCCESS: Final = 0x0000
OUT_OF_RESOURCES: Final = 0xA700
# CANNOT_UNDERSTAND (0xC210) and INVALID_UID (0xC000): see ich_node.ingest.spool.

#: The Error Comment of a 0xA700 answer, by SpoolError reason (PS3.7 C.4.2.1.4:
#: at most 64 characters; what the PACS shows its admin, never patient data).
_NOT_STORED: Final = {
    "disk_low": "storage.min_free_mb not met: the node is out of disk space",
    "path_outside_storage": "a symbolic link in the node's spool: refused",
    "storage_not_mounted": "the node's shared storage.dir is not mounted",
    "not_durable": "the instance could not be stored durably",
}


def _addresses(host: str) -> frozenset[str]:
    """The IP addresses a configured host stands for (resolved once, at start)."""
    found = {host}
    try:
        for info in socket.getaddrinfo(host, None):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return frozenset(found)


class CallerAllowList:
    """The calling AE titles allowed for the peer of the association being negotiated.

    pynetdicom checks ``ae.require_calling_aet`` while negotiating, in the
    association's own thread; iterating this object yields the titles allowed
    for that thread's peer address, so a caller bound to a host is rejected from
    any other host with the same A-ASSOCIATE-RJ reason as an unknown title.
    """

    def __init__(self, callers: Sequence[Caller], own_ae_title: str) -> None:
        self._rules: list[tuple[str, frozenset[str] | None]] = [
            (c.ae_title, None if c.host is None else _addresses(c.host)) for c in callers
        ]
        self._rules.append((own_ae_title, _LOOPBACK))
        self.titles = frozenset(title for title, _ in self._rules)

    def allowed(self, address: str | None) -> list[str]:
        return [
            title
            for title, hosts in self._rules
            if hosts is None or (address is not None and address in hosts)
        ]

    def __iter__(self) -> Iterator[str]:
        thread = threading.current_thread()
        requestor = getattr(thread, "requestor", None)
        address = getattr(requestor, "address", None) if requestor is not None else None
        return iter(self.allowed(address))

    def __bool__(self) -> bool:
        return True  # never "no restriction"

    def __len__(self) -> int:
        return len(self._rules)


class StoreRefusals:
    """C-STORE refusals counted by reason, in memory (thread-safe).

    The handler only counts; the serving loop adds the counts to the store
    (:meth:`flush`, ``refusals`` in ``status``), so a refusal never waits on the
    database, and one the database cannot take now is added at the next pass.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, str]] = {}

    def add(self, reason: str, detail: str) -> None:
        with self._lock:
            n, _ = self._counts.get(reason, (0, ""))
            self._counts[reason] = (n + 1, detail)

    def flush(self, store: Any, now: float) -> None:
        """Add what was counted since the last flush to ``store`` (kept when that fails)."""
        with self._lock:
            counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            store.count_refusals(counts, now)
        except Exception:
            with self._lock:
                for reason, (n, detail) in counts.items():
                    m, newer = self._counts.get(reason, (0, ""))
                    self._counts[reason] = (n + m, newer or detail)
            raise


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success (PS3.7 9.3.5)."""
    return SUCCESS


def _answer(status: int, comment: str, keyword: str | None = None) -> Dataset:
    """A failure status with its Error Comment (and Offending Element), PS3.7 C.4.2.1.4."""
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment[:64]
    if keyword is not None:
        answer.OffendingElement = [Tag(keyword)]
    return answer


def handle_store(
    event: evt.Event,
    spool: Spool,
    clock: Callable[[], float],
    metrics: Metrics | None = None,
    refusals: StoreRefusals | None = None,
    limit: RateLimit | None = None,
) -> int | Dataset:
    """C-STORE: spool durably, then answer; never raises.

    Returns 0x0000 once the instance is written, fsync'ed, renamed and recorded
    (or was already). A failure is answered with a status data set whose Error
    Comment says why (PS3.7 C.4.2.1.4, no patient data): 0xA700 when it could
    not be made durable (disk full, less than ``storage.min_free_mb`` free, I/O
    error, a link in the spool); 0xC210 when the dataset cannot be decoded or
    lacks a UID, 0xC000 when a UID is not a valid UID (both with the Offending
    Element). Each failure is counted by reason (``refusals``) and logged, at most
    once per peer and reason per minute (``limit``).
    """
    started = time.perf_counter()
    status = _store(event, spool, clock, started, refusals, limit or _LOG_LIMIT)
    if metrics is not None:
        with contextlib.suppress(Exception):  # metrics never change the answer
            metrics.instances.labels(status[1]).inc()
            metrics.store_seconds.observe(time.perf_counter() - started)
    return status[0]


#: Rate limit of the store.rejected / store.failed lines when none is given.
_LOG_LIMIT: Final = RateLimit()


def _without_dimse_logger(event: evt.Event) -> None:
    """EVT_CONN_OPEN: unbind pynetdicom's own EVT_DIMSE_RECV logger from the association.

    It runs before the node's handlers and raises on a request missing a command
    element, which ends the event's handlers before :func:`answer_invalid_store`;
    it only logs at debug level, which the node does not use.
    """
    with contextlib.suppress(Exception):
        event.assoc.unbind(evt.EVT_DIMSE_RECV, standard_dimse_recv_handler)


def answer_invalid_store(
    event: evt.Event, refusals: StoreRefusals | None = None, limit: RateLimit | None = None
) -> None:
    """EVT_DIMSE_RECV: answer a C-STORE request pynetdicom would ignore; never raises.

    A C-STORE-RQ whose command set lacks a required element, or holds one that is
    not valid (an Affected SOP Instance UID of NUL bytes: PS3.7 9.3.1.1), is not
    a valid request to pynetdicom: it logs it and sends nothing, and the peer
    waits for its own timeout. Here it gets a C-STORE-RSP with 0xC210 (cannot
    understand) and an Error Comment at once, and the refusal is counted and logged
    like the others.
    """
    try:
        message = event.message
        if message.command_set is None or message.command_set.CommandField != 0x0001:
            return  # not a C-STORE-RQ
        request = message.message_to_primitive()
        if not isinstance(request, C_STORE) or request.is_valid_request:
            return
        if request.MessageID is None:
            return  # nothing to answer to: pynetdicom's timeouts end it
        answer = _answer(
            CANNOT_UNDERSTAND, "the C-STORE request's command set is incomplete or invalid"
        )
        response = C_STORE()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response.Status = CANNOT_UNDERSTAND
        response.ErrorComment = str(answer.ErrorComment)  # type: ignore[assignment]
        event.assoc.dimse.send_msg(response, cast(int, message.context_id))
        _refused(event, refusals, limit or _LOG_LIMIT, "invalid_command", answer)
    except Exception as exc:  # the handler never raises: at worst pynetdicom's behaviour
        log.warning("store.invalid_command_unanswered", error=type(exc).__name__)


def _refused(
    event: evt.Event,
    refusals: StoreRefusals | None,
    limit: RateLimit,
    reason: str,
    answer: Dataset,
    **fields: Any,
) -> None:
    """Count one failed C-STORE by ``reason`` and log it (rate-limited per peer and reason)."""
    if refusals is not None:
        refusals.add(reason, str(answer.ErrorComment))
    requestor = event.assoc.requestor
    peer = str(requestor.address)
    suppressed = limit.allow(peer, reason)
    if suppressed is None:
        return
    failed = answer.Status == OUT_OF_RESOURCES
    (log.error if failed else log.warning)(
        "store.failed" if failed else "store.rejected",
        status=f"0x{answer.Status:04X}",
        reason=reason,
        comment=str(answer.ErrorComment),
        calling_ae=str(requestor.ae_title).strip(),
        peer=peer,
        not_logged_since_last=suppressed,
        **fields,
    )


def _store(
    event: evt.Event,
    spool: Spool,
    clock: Callable[[], float],
    started: float,
    refusals: StoreRefusals | None,
    limit: RateLimit,
) -> tuple[int | Dataset, str]:
    request: Any = event.request
    try:
        try:
            record = instance_record(
                event.dataset,
                str(request.AffectedSOPClassUID or ""),
                str(request.AffectedSOPInstanceUID or ""),
            )
        except UnusableInstance as exc:  # a UID missing or outside the UI repertoire
            answer = _answer(exc.status, exc.comment, exc.keyword)
            _refused(event, refusals, limit, exc.reason, answer, keyword=exc.keyword)
            return answer, "rejected"
        except Exception as exc:  # undecodable dataset
            answer = _answer(CANNOT_UNDERSTAND, "the data set cannot be decoded")
            _refused(event, refusals, limit, "cannot_decode", answer, error=type(exc).__name__)
            return answer, "rejected"
        try:
            # The bytes exactly as received with their file meta: no re-encoding.
            data = event.encoded_dataset(include_meta=True)
            spooled = spool.save(data, record, clock())
        except SpoolError as exc:
            comment = _NOT_STORED.get(exc.reason, _NOT_STORED["not_durable"])
            answer = _answer(OUT_OF_RESOURCES, comment)
            _refused(
                event,
                refusals,
                limit,
                exc.reason,
                answer,
                error=type(exc.__cause__ or exc).__name__,
                detail=str(exc) if exc.__cause__ is None else None,
                sop_instance_uid=record.sop_instance_uid,
            )
            return answer, "out_of_resources"
        log.debug(
            "store.ok",
            sop_instance_uid=record.sop_instance_uid,
            series_instance_uid=record.series_instance_uid,
            new=spooled.new,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return SUCCESS, "stored" if spooled.new else "duplicate"
    except Exception as exc:  # anything else: the instance is not durable
        answer = _answer(OUT_OF_RESOURCES, _NOT_STORED["not_durable"])
        with contextlib.suppress(Exception):
            _refused(event, refusals, limit, "not_durable", answer, error=type(exc).__name__)
        return answer, "out_of_resources"


def build_ae(config: NodeConfig) -> AE:
    """The node's application entity, with its contexts, limits and allow-list.

    ``node.max_associations`` is enforced by the guard (``ich_node.ingest.guard``),
    which counts established associations only; pynetdicom's own limit counts
    every association thread, including connections still negotiating, so it is
    set above what the guard can let through.
    """
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = 2 * (node.max_associations + node.max_pending) + 16
    # Waiting for the A-ASSOCIATE-RQ, and for the peer to close after a reject:
    # no longer than the negotiation deadline.
    ae.acse_timeout = node.negotiation_timeout
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    # The Maximum Length advertised in the A-ASSOCIATE-AC (PS3.8 D.1): a 512 KiB CT
    # image comes in 2 PDUs instead of 32 at pynetdicom's 16 KiB, and the DUL and
    # the guard's per-PDU checks run that many times less.
    ae.maximum_pdu_size = node.max_pdu_kb * 1024
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    # Set the private list directly: the public setter copies into a plain list.
    ae._require_calling_aet = CallerAllowList(  # type: ignore[assignment]
        config.callers, config.node.ae_title
    )
    return ae


def start_listener(
    config: NodeConfig,
    spool: Spool,
    clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
) -> GuardedServer:
    """Start the SCP on ``node.host:node.port`` in the background; returns the server.

    With ``node.tls`` the port speaks DICOM TLS only (PS3.15 B.1). Hostile or
    broken peers are bounded by the guard (``ich_node.ingest.guard``): pending
    connections, the negotiation deadline, PDU and dataset lengths. Stop it with
    ``server.shutdown()``.

    Raises
    ------
    OSError
        When the port cannot be bound.
    ValueError
        When the TLS files cannot be loaded.
    """
    ae = build_ae(config)
    node = config.node
    quiet_pynetdicom_tracebacks()
    guard = Guard(
        GuardLimits(
            max_associations=node.max_associations,
            max_pending=node.max_pending,
            max_pending_per_host=node.max_pending_per_host,
            negotiation_timeout=node.negotiation_timeout,
            max_pdu=ae.maximum_pdu_size,
            max_dataset=node.max_dataset_mb * 2**20,
            max_pending_per_network=node.max_pending_per_network,
            pending_reserve=node.pending_reserve,
            ae_title=node.ae_title,
            require_called_ae=node.require_called_ae,
        ),
        metrics,
    )
    refusals = StoreRefusals()
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, clock, metrics, refusals, RateLimit()]),
        (evt.EVT_DIMSE_RECV, answer_invalid_store, [refusals, RateLimit()]),
        (evt.EVT_CONN_OPEN, _without_dimse_logger),
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_REQUESTED, on_requested, [guard, ae._require_calling_aet]),
        (evt.EVT_REJECTED, on_rejected, [guard]),
        (evt.EVT_CONN_CLOSE, on_conn_close, [guard]),
    ]
    tls = config.node.tls
    # AE.make_server with our server class is pynetdicom's extension point;
    # then what AE.start_server(block=False) does: serve in a daemon thread.
    server = cast(
        GuardedServer,
        ae.make_server(
            (node.host, node.port),
            ssl_context=None if tls is None else server_context(tls),
            evt_handlers=handlers,
            server_class=GuardedServer,
            guard=guard,
            request_handler=GuardedRequestHandler,
        ),
    )
    server.store_refusals = refusals  # the serving loop adds them to the store
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{node.port}", daemon=True
    )
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown removes it from there
    log.info(
        "listener.started",
        ae_title=config.node.ae_title,
        host=config.node.host,
        port=config.node.port,
        callers=len(config.callers),
        tls=tls is not None,
        client_cert_required=bool(tls and tls.require_client_cert),
    )
    return server
