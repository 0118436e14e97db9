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
    on_conn_close,
    on_rejected,
    on_requested,
    quiet_pynetdicom_tracebacks,
)
from ich_node.ingest.spool import Spool, SpoolError, instance_record
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
CANNOT_UNDERSTAND: Final = 0xC210


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


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success (PS3.7 9.3.5)."""
    return SUCCESS


def handle_store(
    event: evt.Event,
    spool: Spool,
    clock: Callable[[], float],
    metrics: Metrics | None = None,
) -> int:
    """C-STORE: spool durably, then answer; never raises.

    Returns 0x0000 once the instance is written, fsync'ed, renamed and recorded
    (or was already); 0xA700 when it could not be made durable (disk full, low
    free space, I/O error); 0xC210 when the dataset cannot be decoded or lacks
    its UIDs.
    """
    started = time.perf_counter()
    status = _store(event, spool, clock, started)
    if metrics is not None:
        with contextlib.suppress(Exception):  # metrics never change the answer
            metrics.instances.labels(status[1]).inc()
            metrics.store_seconds.observe(time.perf_counter() - started)
    return status[0]


def _store(
    event: evt.Event, spool: Spool, clock: Callable[[], float], started: float
) -> tuple[int, str]:
    request: Any = event.request
    try:
        try:
            record = instance_record(
                event.dataset,
                str(request.AffectedSOPClassUID or ""),
                str(request.AffectedSOPInstanceUID or ""),
            )
        except Exception as exc:  # undecodable dataset or missing UIDs
            log.warning(
                "store.rejected",
                status="0xC210",
                error=type(exc).__name__,
                calling_ae=event.assoc.requestor.ae_title,
            )
            return CANNOT_UNDERSTAND, "rejected"
        try:
            # The bytes exactly as received with their file meta: no re-encoding.
            data = event.encoded_dataset(include_meta=True)
            spooled = spool.save(data, record, clock())
        except SpoolError as exc:
            log.error(
                "store.failed",
                status="0xA700",
                error=type(exc.__cause__ or exc).__name__,
                detail=str(exc) if exc.__cause__ is None else None,
                sop_instance_uid=record.sop_instance_uid,
            )
            return OUT_OF_RESOURCES, "out_of_resources"
        log.debug(
            "store.ok",
            sop_instance_uid=record.sop_instance_uid,
            series_instance_uid=record.series_instance_uid,
            new=spooled.new,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return SUCCESS, "stored" if spooled.new else "duplicate"
    except Exception as exc:  # anything else: the instance is not durable
        log.error("store.failed", status="0xA700", error=type(exc).__name__)
        return OUT_OF_RESOURCES, "out_of_resources"


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
        ),
        metrics,
    )
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, clock, metrics]),
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
