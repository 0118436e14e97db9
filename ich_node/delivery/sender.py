"""The sender: each job's outbox to every destination, and the alerts to their targets.

A delivery (one job, one destination) is ``pending`` until every object of the
outbox was accepted; a failure goes to ``retry`` with an exponential backoff
(``sender.backoff_base_seconds`` doubling, capped at ``sender.backoff_max_seconds``)
and, after ``sender.max_attempts`` attempts, to ``parked`` with the reason.
``ich-node resend`` puts parked deliveries back to ``pending``.

Alerts (:mod:`ich_node.delivery`) are deliveries too, with the destination
``alert:<target>``: the same states, backoff, parking and resend. A target's
permanent refusal (HL7 AR/CR, HTTP 4xx, SMTP 5xx) is parked at once with its
text, scrubbed of the patient's values.

**Each destination and each target on its own.** Deliveries are grouped into
lanes, one per destination or target; each lane runs in its own thread and sends
its deliveries one after the other, so a slow, hung or refusing receiver delays
only its own lane. In ``serve``, :meth:`Sender.dispatch` starts the lanes that
have work and are idle, and returns at once; :meth:`Sender.run_once` runs one pass
and waits (tests, tools).

**A total deadline per attempt** (:class:`~ich_node.delivery.deadline.Deadline`):
an alert's ``timeout_seconds``; a DICOM delivery ``sender.timeout_seconds`` times
(objects + 2). The libraries' own timeouts are set to what is left, and the
deadline shuts the sockets down when it passes, so a byte-a-second peer is cut.

**Claims never strand work.** A delivery is claimed (a shared store leases it to
this sender) right before its attempt; a claim whose attempt was not recorded is
given back in a ``finally``. :meth:`Sender.stop` (SIGTERM) cuts the attempts in
flight; they are given back, not charged, and sent again after the restart under
the same key (alerts) and the same SOP Instance UIDs (DICOM objects).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt

from ich_node.config import Destination, NotificationTarget, SenderSection
from ich_node.delivery.alerts import ALERT_PREFIX, PRELIMINARY_SUFFIX, AlertFailed
from ich_node.delivery.deadline import Deadline
from ich_node.log import handling_phi, phi_values_of_file, redact, scrub_peer_text
from ich_node.metrics import Metrics
from ich_node.net import set_nodelay
from ich_node.queue.backend import StorageWatch
from ich_node.queue.interface import DeliveryRecord, DeliveryState, DeliveryStore
from ich_node.queue.layout import OutsideStorage, StorageLayout, outbox_files
from ich_node.results.sr import SR_CLASSES
from ich_node.tls import client_context

log = structlog.get_logger(__name__)

#: Seconds :meth:`Sender.stop` waits for the lanes once their attempts are cut.
STOP_SECONDS: Final = 5.0
#: C-STORE statuses that mean stored (PS3.4 B.2.3): Success and the warnings.
WARNINGS: Final = {
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP class",
}
#: Longest reason recorded in the store.
REASON_CHARS: Final = 500
_SR_NAMES: Final = {uid: name for name, uid in SR_CLASSES.items()}
_RESULT_TEXT: Final = {
    0x01: "user rejection",
    0x02: "no reason",
    0x03: "abstract syntax not supported",
    0x04: "transfer syntaxes not supported",
}


class DeliveryError(RuntimeError):
    """A destination did not accept every object."""


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    job_id: str
    destination: str
    state: DeliveryState  # done | retry | parked; pending when cut by the node stopping
    reason: str


@dataclass(frozen=True, slots=True)
class SendReport:
    """What one association stored.

    Attributes
    ----------
    sent : int
        Objects the destination stored (Success or a warning).
    warnings : tuple of str
        One line per object stored with a warning status (PS3.4 B.2.3).
    substituted : tuple of str
        One line per object sent in another SR class than the outbox holds.
    """

    sent: int = 0
    warnings: tuple[str, ...] = ()
    substituted: tuple[str, ...] = ()


def _rejection(answer: Any) -> str:
    """An A-ASSOCIATE-RJ's result, source and reason in words (PS3.8 9.3.4), with a
    hint at the setting to check when the peer did not recognise an AE title."""
    words = f"{answer.result_str.lower()}, {answer.source_str.lower()}: {answer.reason_str}"
    hint = {
        (1, 3): "; the PACS does not know this node's AE title (node.ae_title): add it there",
        (1, 7): "; the PACS does not answer to this AE title: check destinations[].ae_title",
    }.get((int(answer.result_source or 0), int(answer.diagnostic or 0)), "")
    return words + hint


def _name(uid: str) -> str:
    """A UID's name from pydicom's dictionary ("CT Image Storage"), else the UID."""
    name = UID(uid).name
    return name if name and name != uid else uid


def _syntaxes(own: str) -> list[str]:
    """The transfer syntaxes proposed for a file: its own, Explicit VR LE, Implicit VR LE.

    PS3.5 10.1: Implicit VR Little Endian is the default every SCP accepts.
    """
    proposed = [own, str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    return list(dict.fromkeys(proposed))


@dataclass(slots=True)
class _Item:
    """One outbox object and what may be sent for it."""

    path: Path
    sop_class: str
    sop_instance: str
    syntax: str
    # SR only: class UID -> file of the same report in that class, richest first.
    choices: dict[str, Path] = field(default_factory=dict)


def _items(
    files: Sequence[Path],
    skip: Collection[str],
    destination: Destination,
    alternatives: Path | None,
) -> list[_Item]:
    items = []
    for path in files:
        meta = read_file_meta_info(path)
        item = _Item(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )
        if item.sop_instance in skip:
            continue
        if item.sop_class in _SR_NAMES:
            own = _SR_NAMES[item.sop_class]
            wanted = (
                list(SR_CLASSES)
                if destination.sr_sop_class == "auto"
                else [destination.sr_sop_class]
            )
            for name in wanted:
                candidate = (
                    path if name == own else (alternatives or Path("/nonexistent")) / f"{name}.dcm"
                )
                if candidate.is_symlink():
                    raise OutsideStorage(candidate, "a symbolic link")
                if candidate.is_file():
                    item.choices[SR_CLASSES[name]] = candidate
            if not item.choices:
                raise DeliveryError(
                    f"the SR of this job exists in no class {destination.name} may take "
                    f"(sr_sop_class: {destination.sr_sop_class})"
                )
        items.append(item)
    return items


def send_files(
    files: Sequence[Path],
    destination: Destination,
    calling_ae: str,
    timeout: float,
    *,
    skip: Collection[str] = (),
    on_accepted: Callable[[str], None] | None = None,
    deadline: Deadline | None = None,
    alternatives: Path | None = None,
) -> SendReport:
    """C-STORE every file to ``destination`` in one association.

    Each object is offered in its own transfer syntax, Explicit VR Little Endian
    and Implicit VR Little Endian, and sent in the one accepted (pydicom re-encodes
    an uncompressed data set). The SR is offered in its class and, by
    ``destination.sr_sop_class``, in the other SR classes whose files are in
    ``alternatives`` (``<class>.dcm``): it goes in the richest class accepted.

    Parameters
    ----------
    skip
        SOP Instance UIDs (of the outbox files) the destination already accepted.
    on_accepted
        Called with each accepted outbox file's SOP Instance UID, before the next.
    deadline
        The attempt's total deadline (default: ``timeout`` times the objects + 2).
    alternatives
        The folder of the job's SR in other classes.

    Returns
    -------
    SendReport

    Raises
    ------
    DeliveryError
        Naming the first problem: no association (with the classes and syntaxes
        offered), an object no accepted context can carry (its SOP class and the
        transfer syntaxes refused), a status that is neither Success nor a warning,
        or the deadline.
    """
    # Send each file's encoded dataset as stored when its own syntax is accepted.
    _config.STORE_SEND_CHUNKED_DATASET = True
    items = _items(files, skip, destination, alternatives)
    if not items:
        return SendReport()
    assert destination.host is not None and destination.port is not None
    if deadline is None:
        with Deadline(timeout * (len(items) + 2), destination.name) as made:
            return send_files(
                files, destination, calling_ae, timeout, skip=skip, on_accepted=on_accepted,
                deadline=made, alternatives=alternatives,
            )  # fmt: skip
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = deadline.op_timeout(timeout)
    ae.acse_timeout = deadline.op_timeout(timeout)
    ae.dimse_timeout = deadline.op_timeout(timeout)
    ae.network_timeout = deadline.op_timeout(timeout)
    offered: dict[str, list[str]] = {}
    for item in items:
        for sop_class, path in (item.choices or {item.sop_class: item.path}).items():
            own = (
                item.syntax
                if path == item.path
                else str(read_file_meta_info(path).TransferSyntaxUID)
            )
            for syntax in _syntaxes(own):
                offered.setdefault(sop_class, [])
                if syntax not in offered[sop_class]:
                    offered[sop_class].append(syntax)
    for sop_class, syntaxes in offered.items():
        ae.add_requested_context(sop_class, syntaxes)

    def on_open(event: evt.Event) -> None:
        set_nodelay(event)
        # The association is cut when the attempt's deadline passes or the node stops.
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            deadline.watch(sock)

    answers: list[Any] = []  # the peer's A-ASSOCIATE response, for a rejection's reason

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)  # EVT_ACSE_RECV's ACSE primitive
        if getattr(primitive, "result", None) in {0x01, 0x02}:
            answers.append(primitive)

    tls_args = None
    if destination.tls is not None:
        tls_args = (client_context(destination.tls, destination.name), destination.host)
    where = f"{destination.name} ({destination.host}:{destination.port})"
    deadline.check()
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title or "ANY-SCP",
        tls_args=tls_args,
        # Without TCP_NODELAY each small PDU waits for a delayed ACK: 4.4x slower
        # sending of one job's objects (docs/performance.md).
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)],
    )
    if not assoc.is_established:
        if deadline.cut:
            raise DeliveryError(f"association with {where}: {deadline.reason()}")
        reason = "association rejected" if assoc.is_rejected else "no association"
        if assoc.is_rejected and answers:
            reason = f"association rejected ({_rejection(answers[-1])})"
        offers = "; ".join(
            f"{_name(c)} with {', '.join(_name(t) for t in s)}" for c, s in offered.items()
        )
        raise DeliveryError(f"{reason} by {where}; offered {offers}")
    warnings: list[str] = []
    substituted: list[str] = []
    refused: list[str] = []
    sent = 0
    try:
        accepted = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
        for item in items:
            deadline.check()
            choices = item.choices or {item.sop_class: item.path}
            chosen = next((c for c in choices if c in accepted), None)
            if chosen is None:
                rejected = [
                    cx for cx in assoc.rejected_contexts if str(cx.abstract_syntax) in choices
                ]
                why = sorted({_RESULT_TEXT.get(int(cx.result or 0), "refused") for cx in rejected})
                refused.append(
                    " or ".join(_name(c) for c in choices)
                    + f" (offered {', '.join(_name(t) for t in _syntaxes(item.syntax))}"
                    + (f"; {', '.join(why)}" if why else "")
                    + ")"
                )
                continue
            path = choices[chosen]
            syntax = str(accepted[chosen].transfer_syntax[0])
            own = (
                item.syntax
                if path == item.path
                else str(read_file_meta_info(path).TransferSyntaxUID)
            )
            dataset: Any = path
            if syntax != own:
                # Re-encoded in the accepted syntax: pynetdicom converts Explicit <->
                # Implicit VR for uncompressed data; compressed pixels are decompressed.
                import pydicom

                dataset = pydicom.dcmread(path)
                if UID(own).is_compressed:
                    dataset.decompress()
            status = assoc.send_c_store(dataset)
            code = getattr(status, "Status", None)
            if code is None:
                if deadline.cut:
                    raise DeliveryError(f"C-STORE to {where}: {deadline.reason()}")
                raise DeliveryError(f"no C-STORE response from {destination.name}")
            if code != 0x0000 and code not in WARNINGS:
                comment = scrub_peer_text(str(status.get("ErrorComment", "") or ""), 120)
                raise DeliveryError(
                    f"{destination.name} answered status 0x{code:04X} to {_name(chosen)}"
                    + (f" ({comment})" if comment else "")
                )
            if code in WARNINGS:
                warnings.append(f"0x{code:04X} {WARNINGS[code]} ({_name(chosen)})")
            if chosen != item.sop_class:
                substituted.append(f"SR sent as {_name(chosen)}")
            sent += 1
            if on_accepted is not None:
                on_accepted(item.sop_instance)
    finally:
        if assoc.is_established:
            assoc.release()
    if refused:
        raise DeliveryError(
            f"{destination.name} accepted no presentation context for " + "; ".join(refused)
        )
    return SendReport(sent, tuple(warnings), tuple(substituted))


@dataclass
class _Lane:
    """The deliveries of one destination or target, sent one after the other."""

    name: str
    thread: threading.Thread | None = None
    outcomes: list[DeliveryOutcome] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Sender:
    """Deliver due outbox entries and alerts, each destination and target on its own.

    Parameters
    ----------
    store : DeliveryStore
        The node's store.
    destinations : sequence of Destination
        ``destinations`` section.
    config : SenderSection
        ``sender`` section.
    storage_dir : pathlib.Path
        ``storage.dir`` (the outbox is under ``results/<job_id>/outbox``).
    calling_ae : str
        The node's AE title.
    metrics : Metrics, optional
        Deliveries, failures and time to notification are counted there.
    targets : sequence of NotificationTarget
        ``notifications`` section (alerts are deliveries ``alert:<name>``).
    holder : str
        The heartbeat name of the process that sends (``serve``'s): a shared store
        gives its claims to other hosts once that heartbeat is stale.
    """

    def __init__(
        self,
        store: DeliveryStore,
        destinations: Sequence[Destination],
        config: SenderSection,
        storage_dir: Path,
        calling_ae: str,
        metrics: Metrics | None = None,
        targets: Sequence[NotificationTarget] = (),
        holder: str = "",
    ) -> None:
        self.metrics = metrics
        self.targets = tuple(targets)
        self.store = store
        self.destinations = {d.name: d for d in destinations}
        self.config = config
        self.storage_dir = Path(storage_dir)
        self.calling_ae = calling_ae
        self.holder = holder
        self._storage = StorageWatch(
            store,
            "sender.storage_not_mounted",
            storage_dir=str(self.storage_dir),
            action="not sending until the shared storage is back",
        )
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self._active: set[Deadline] = set()
        self._stopping = threading.Event()

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``."""
        delay = self.config.backoff_base_seconds * 2.0 ** max(attempts - 1, 0)
        return float(min(delay, self.config.backoff_max_seconds))

    def _retry_at(self, now: float, attempt: int, exc: BaseException) -> float:
        """When to try again after ``exc``: the backoff, or later when the receiver
        asked for it (``retry_after``: HTTP Retry-After), at most backoff_max_seconds."""
        at = now + self.backoff(attempt)
        asked = getattr(exc, "retry_after", None)
        if asked is not None:
            at = max(at, now + min(float(asked), self.config.backoff_max_seconds))
        return at

    # -- one attempt ---------------------------------------------------------------

    def _deadline(self, delivery: DeliveryRecord) -> Deadline:
        deadline = Deadline(self.attempt_seconds(delivery), delivery.destination)
        with self._lock:
            self._active.add(deadline)
            if self._stopping.is_set():
                deadline.stop()
        return deadline

    def _done_with(self, deadline: Deadline) -> None:
        with self._lock:
            self._active.discard(deadline)

    def deliver(self, delivery: DeliveryRecord, now: float) -> DeliveryOutcome:
        """Attempt one delivery and record its new state; never raises.

        An attempt cut by :meth:`stop` is not recorded (its claim is given back by
        the caller): the outcome's state is then ``pending``.
        """
        started = time.perf_counter()
        if delivery.destination.startswith(ALERT_PREFIX):
            return self._deliver_alert(delivery, now, started)
        attempt = delivery.attempts + 1
        deadline = self._deadline(delivery)
        note = ""
        try:
            with deadline, handling_phi(self._job_phi(delivery.job_id)):
                try:
                    note = self._send_results(delivery, deadline)
                    state: DeliveryState = "done"
                    reason, next_at = note, now
                except Exception as exc:
                    reason = redact(f"{type(exc).__name__}: {exc}")[:REASON_CHARS]
                    if deadline.stopped:
                        return self._cut(delivery, reason, started)
                    if isinstance(exc, OutsideStorage):  # a planted link: never read or sent
                        self.store.refuse_path(exc, "outbox file")
                        state, next_at = "parked", now
                    elif getattr(exc, "permanent", False):
                        state, next_at = "parked", now
                        reason = f"refused: {reason}"[:REASON_CHARS]
                    elif attempt >= self.config.max_attempts:
                        state, next_at = "parked", now
                        reason = f"after {attempt} attempts: {reason}"[:REASON_CHARS]
                    else:
                        state, next_at = "retry", self._retry_at(now, attempt, exc)
                recorded = self._record(delivery, state, reason, next_at)
                log.info(
                    "delivery.finished",
                    job_id=delivery.job_id,
                    destination=delivery.destination,
                    attempt=attempt,
                    state=state,
                    n_files=delivery.n_files,
                    send_s=round(time.perf_counter() - started, 3),
                    reason=reason or None,
                )
        finally:
            self._done_with(deadline)
        self._count(delivery.destination, state, time.perf_counter() - started)
        return DeliveryOutcome(
            delivery.job_id, delivery.destination, state if recorded else "pending", reason
        )

    def _send_results(self, delivery: DeliveryRecord, deadline: Deadline) -> str:
        """Send one job's outbox to its destination; the note recorded with ``done``."""
        destination = self.destinations.get(delivery.destination)
        if destination is None:
            raise DeliveryError(f"destination {delivery.destination!r} is not configured")
        files = outbox_files(self.storage_dir, delivery.job_id)
        if len(files) != delivery.n_files:
            raise DeliveryError(
                f"outbox holds {len(files)} files, the job wrote {delivery.n_files}"
            )
        job, name = delivery.job_id, delivery.destination
        skip = self.store.accepted_objects(job, name)
        layout = StorageLayout(self.storage_dir)
        alternatives = layout.sr_classes(job)
        if alternatives.exists() or alternatives.is_symlink():  # never a planted link
            layout.confine(alternatives, layout.results, read=True)

        def accepted(uid: str) -> None:
            self.store.accept_object(job, name, uid, time.time())

        if destination.kind == "dicomweb":
            from ich_node.delivery.dicomweb import store_instances

            report = store_instances(
                files, destination, skip=skip, on_accepted=accepted, deadline=deadline,
                alternatives=alternatives,
            )  # fmt: skip
        else:
            report = send_files(
                files, destination, self.calling_ae, self.config.timeout_seconds,
                skip=skip, on_accepted=accepted, deadline=deadline, alternatives=alternatives,
            )  # fmt: skip
        notes = [*report.substituted]
        if report.warnings:
            notes.append(
                f"stored with {len(report.warnings)} warning(s): " + "; ".join(report.warnings)
            )
        return redact("; ".join(notes))[:REASON_CHARS]

    def _job_phi(self, job_id: str) -> dict[str, str]:
        """The patient values of a job's outbox (its SR's header), scrubbed from what peers say."""
        layout = StorageLayout(self.storage_dir)
        try:
            sr = layout.confine(layout.outbox(job_id) / "sr.dcm", layout.results, read=True)
        except OutsideStorage:
            return {}  # the attempt itself refuses it (outbox_files)
        return phi_values_of_file(sr) if sr.is_file() else {}

    def _record(
        self, delivery: DeliveryRecord, state: DeliveryState, reason: str, next_at: float
    ) -> bool:
        try:
            if state == "done" and delivery.destination.startswith(ALERT_PREFIX):
                name = delivery.destination.removeprefix(ALERT_PREFIX)
                self.store.alert_accepted(delivery.job_id, name, time.time())
            self.store.finish_delivery(
                delivery.job_id, delivery.destination, state, reason, next_at, time.time()
            )
            return True
        except Exception as exc:  # given back by the lane; tried again on the next pass
            log.error("delivery.record_failed", job_id=delivery.job_id, error=type(exc).__name__)
            return False

    def _cut(self, delivery: DeliveryRecord, reason: str, started: float) -> DeliveryOutcome:
        """An attempt cut by the node stopping: not charged, given back by the lane."""
        log.info(
            "delivery.interrupted",
            job_id=delivery.job_id,
            destination=delivery.destination,
            send_s=round(time.perf_counter() - started, 3),
            action="sent again after the restart (same key, same SOP Instance UIDs)",
        )
        return DeliveryOutcome(delivery.job_id, delivery.destination, "pending", reason)

    def _count(self, destination: str, state: DeliveryState, seconds: float) -> None:
        if self.metrics is None:
            return
        with contextlib.suppress(Exception):  # metrics never change a delivery
            self.metrics.deliveries.labels(destination, state).inc()
            if not destination.startswith(ALERT_PREFIX):
                self.metrics.stage_seconds.labels("send").observe(seconds)
            if state != "done":
                self.metrics.send_failures.labels(destination).inc()

    def _deliver_alert(
        self, delivery: DeliveryRecord, now: float, started: float
    ) -> DeliveryOutcome:
        """Send one recorded alert and record its new state; never raises."""
        from ich_node.delivery.outbox import send_alert, target_of

        attempt = delivery.attempts + 1
        name = delivery.destination.removeprefix(ALERT_PREFIX)
        to_notification = None
        deadline = self._deadline(delivery)
        state: DeliveryState
        try:
            with deadline:
                try:
                    target = target_of(delivery.destination, self.targets)
                    alert = send_alert(self.storage_dir, target, delivery.job_id, deadline)
                    to_notification = time.time() - alert.last_received_at
                    state, reason, logged, next_at = "done", "", "", now
                except Exception as exc:
                    permanent = isinstance(exc, AlertFailed) and exc.permanent
                    if isinstance(exc, OutsideStorage):  # a planted link: never read or sent
                        self.store.refuse_path(exc, "alert record")
                        permanent = True
                    # Logs get the node's own words; the store also keeps the peer's text,
                    # scrubbed of the alert's patient values and cut by the transport.
                    logged = redact(f"{type(exc).__name__}: {exc}")[:REASON_CHARS]
                    reason = (
                        redact(exc.recorded)[:REASON_CHARS]
                        if isinstance(exc, AlertFailed)
                        else logged
                    )
                    if deadline.stopped:
                        return self._cut(delivery, reason, started)
                    if permanent or attempt >= self.config.max_attempts:
                        state, next_at = "parked", now
                        why = "refused" if permanent else f"after {attempt} attempts"
                        reason, logged = f"{why}: {reason}", f"{why}: {logged}"
                    else:
                        state, next_at = "retry", self._retry_at(now, attempt, exc)
                recorded = self._record(delivery, state, reason, next_at)
        finally:
            self._done_with(deadline)
        log.info(
            "alert.finished",
            job_id=delivery.job_id,
            target=name,
            attempt=attempt,
            state=state,
            send_s=round(time.perf_counter() - started, 3),
            time_to_notification_s=None if to_notification is None else round(to_notification, 3),
            reason=logged or None,
        )
        self._count(delivery.destination, state, time.perf_counter() - started)
        # Finals only: a preliminary alert's own time is in its log line.
        final = not delivery.job_id.endswith(PRELIMINARY_SUFFIX)
        if state == "done" and to_notification is not None and final and self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.time_to_notification.labels(name).observe(to_notification)
        return DeliveryOutcome(
            delivery.job_id, delivery.destination, state if recorded else "pending", reason
        )

    # -- lanes -----------------------------------------------------------------------

    def _claim_and_deliver(self, delivery: DeliveryRecord, now: float) -> DeliveryOutcome | None:
        """Claim one delivery, attempt it, and give the claim back unless recorded."""
        if self._stopping.is_set():
            return None
        try:
            claimed = self.store.claim_delivery(
                delivery.job_id,
                delivery.destination,
                now,
                holder=self.holder,
                lease_seconds=2.0 * self.attempt_seconds(delivery),
            )
        except Exception as exc:  # nothing was claimed: it stays due
            log.error(
                "delivery.claim_failed",
                job_id=delivery.job_id,
                destination=delivery.destination,
                error=type(exc).__name__,
            )
            return None
        if not claimed:  # another sender of the cluster has it
            return None
        outcome: DeliveryOutcome | None = None
        try:
            outcome = self.deliver(delivery, now)
            return outcome
        finally:
            if outcome is None or outcome.state == "pending":
                # Not recorded (cut by the node stopping, a store error, a bug): due
                # again now, for this sender's next pass or another host's.
                try:
                    self.store.release_delivery(
                        delivery.job_id, delivery.destination, self.holder, time.time()
                    )
                except Exception as exc:
                    log.error(
                        "delivery.release_failed",
                        job_id=delivery.job_id,
                        destination=delivery.destination,
                        error=type(exc).__name__,
                    )

    def _run_lane(self, lane: _Lane, deliveries: list[DeliveryRecord], now: float) -> None:
        for delivery in deliveries:
            if self._stopping.is_set():
                return
            try:
                outcome = self._claim_and_deliver(delivery, now)
            except Exception as exc:  # a lane never dies silently; the next pass retries
                log.error("sender.lane_error", lane=lane.name, error=type(exc).__name__)
                continue
            if outcome is not None:
                lane.outcomes.append(outcome)

    def _due(self, now: float, alerts: bool | None) -> dict[str, list[DeliveryRecord]]:
        due = self.store.due_deliveries(now)
        if alerts is not None:
            due = [d for d in due if d.destination.startswith(ALERT_PREFIX) == alerts]
        by_lane: dict[str, list[DeliveryRecord]] = {}
        for d in due:
            by_lane.setdefault(d.destination, []).append(d)
        return by_lane

    def _start_lanes(self, now: float, alerts: bool | None) -> list[_Lane]:
        """Start a thread for each lane with due work that is idle; returns those started."""
        if self._stopping.is_set() or not self._storage.ready():
            return []
        # Which lanes are busy is read before the due list: a lane idle now has
        # recorded all it sent, so the list cannot hold an attempt still in flight.
        with self._lock:
            busy = {name for name, lane in self._lanes.items() if lane.busy}
        started = []
        for name, deliveries in self._due(now, alerts).items():
            if name in busy:
                continue
            lane = _Lane(name)
            lane.thread = threading.Thread(
                target=self._run_lane,
                args=(lane, deliveries, now),
                name=f"send:{name}"[:40],
                daemon=True,  # never holds the process at exit (stop() cuts them first)
            )
            with self._lock:
                self._lanes[name] = lane
            lane.thread.start()
            started.append(lane)
        return started

    def dispatch(self, now: float) -> int:
        """Start sending what is due at ``now``, each idle lane in its thread; returns at once.

        Returns how many lanes were started. A lane still busy with an earlier
        attempt is left alone: its due deliveries wait for it, no other lane does.
        """
        return len(self._start_lanes(now, None))

    def run_once(self, now: float, alerts: bool | None = None) -> list[DeliveryOutcome]:
        """Attempt every delivery due at ``now``, each lane in its thread; wait for all.

        ``alerts``: ``True`` only alerts, ``False`` only DICOM results, ``None`` both.
        """
        lanes = self._start_lanes(now, alerts)
        for lane in lanes:
            assert lane.thread is not None
            lane.thread.join()
        return [o for lane in lanes for o in lane.outcomes]

    def stop(self, wait: float = STOP_SECONDS) -> bool:
        """Cut every attempt in flight and wait up to ``wait`` s for the lanes; whether they ended.

        Cut attempts are given back (not charged) and sent again after the restart.
        """
        self._stopping.set()
        with self._lock:
            active = list(self._active)
            lanes = [lane for lane in self._lanes.values() if lane.busy]
        for deadline in active:
            deadline.stop()
        end = time.monotonic() + wait
        for lane in lanes:
            assert lane.thread is not None
            lane.thread.join(max(0.0, end - time.monotonic()))
        return not any(lane.busy for lane in lanes)

    def attempt_seconds(self, delivery: DeliveryRecord) -> float:
        """The total deadline of one attempt of ``delivery`` (seconds).

        An alert: its target's ``timeout_seconds``. DICOM results: ``sender.timeout_seconds``
        for the association, one per object, and one to release. A shared store leases
        the delivery for twice this, so that another host never sends it beside a live,
        slow sender.
        """
        if delivery.destination.startswith(ALERT_PREFIX):
            name = delivery.destination.removeprefix(ALERT_PREFIX)
            timeouts = [t.timeout_seconds for t in self.targets if t.name == name]
            return float(timeouts[0] if timeouts else self.config.timeout_seconds)
        return self.config.timeout_seconds * (delivery.n_files + 2)
