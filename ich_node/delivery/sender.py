"""The sender: C-STORE SCU of each job's outbox to every destination.

A delivery (one job, one destination) is ``pending`` until every object of the
outbox was accepted in one association; a failure goes to ``retry`` with an
exponential backoff (``sender.backoff_base_seconds`` doubling, capped at
``sender.backoff_max_seconds``) and, after ``sender.max_attempts`` attempts, to
``parked`` with the reason. ``ich-node resend`` puts parked deliveries back to
``pending`` and the running node's sender picks them up.

Alerts (:mod:`ich_node.delivery`) are deliveries too, with the destination
``alert:<target>``: the same states, backoff, parking and resend. A target's
permanent refusal (HL7 AE, HTTP 4xx) is parked at once with its text. The
serving process runs one sender thread for alerts and one for DICOM results,
so an alert never waits behind a slow C-STORE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

from ich_node.config import Destination, NotificationTarget, SenderSection
from ich_node.delivery.alerts import ALERT_PREFIX, AlertFailed
from ich_node.metrics import Metrics
from ich_node.net import set_nodelay
from ich_node.queue.backend import StorageWatch
from ich_node.queue.interface import DeliveryRecord, DeliveryState, DeliveryStore
from ich_node.queue.layout import OutsideStorage, outbox_files
from ich_node.tls import client_context

log = structlog.get_logger(__name__)

#: Alerts sent at the same time (each to its own target) by one sender pass.
MAX_PARALLEL_ALERTS: Final = 8


class DeliveryError(RuntimeError):
    """A destination did not accept every object."""


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    job_id: str
    destination: str
    state: DeliveryState  # done | retry | parked
    reason: str


def send_files(
    files: Sequence[Path],
    destination: Destination,
    calling_ae: str,
    timeout: float,
    *,
    skip: Collection[str] = (),
    on_accepted: Callable[[str], None] | None = None,
) -> int:
    """C-STORE every file to ``destination`` in one association.

    Parameters
    ----------
    skip
        SOP Instance UIDs the destination already accepted: not sent again.
    on_accepted
        Called with each SOP Instance UID the destination accepts, before the next.

    Returns
    -------
    int
        How many files were sent.

    Raises
    ------
    DeliveryError
        Naming the first problem: no association, or a status that is neither
        Success nor a warning (PS3.4 B.2.3: 0xB000, 0xB007, 0xB006 are stored).
    """
    # Send each file's encoded dataset as stored, without decoding it (the
    # contexts below propose exactly each file's transfer syntax).
    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [read_file_meta_info(f) for f in files]
    todo = [
        (path, meta)
        for path, meta in zip(files, metas, strict=True)
        if str(meta.MediaStorageSOPInstanceUID) not in skip
    ]
    if not todo:
        return 0
    metas = [meta for _, meta in todo]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    contexts = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    tls_args = None
    if destination.tls is not None:
        tls_args = (client_context(destination.tls, destination.name), destination.host)
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,
        # Without TCP_NODELAY each small PDU waits for a delayed ACK: 4.4x slower
        # sending of one job's objects (docs/performance.md).
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
    )
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "no association"
        raise DeliveryError(
            f"{reason} by {destination.name} ({destination.host}:{destination.port})"
        )
    try:
        for path, meta in todo:
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code is None:
                raise DeliveryError(f"no C-STORE response from {destination.name}")
            if code != 0x0000 and code not in (0xB000, 0xB007, 0xB006):
                raise DeliveryError(f"{destination.name} answered status 0x{code:04X}")
            if on_accepted is not None:
                on_accepted(str(meta.MediaStorageSOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return len(todo)


class Sender:
    """Deliver due outbox entries.

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

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``."""
        delay = self.config.backoff_base_seconds * 2.0 ** max(attempts - 1, 0)
        return float(min(delay, self.config.backoff_max_seconds))

    def deliver(self, delivery: DeliveryRecord, now: float) -> DeliveryOutcome:
        """Attempt one delivery and record its new state; never raises."""
        started = time.perf_counter()
        attempt = delivery.attempts + 1
        if delivery.destination.startswith(ALERT_PREFIX):
            return self._deliver_alert(delivery, now, started)
        try:
            destination = self.destinations.get(delivery.destination)
            if destination is None:
                raise DeliveryError(f"destination {delivery.destination!r} is not configured")
            files = outbox_files(self.storage_dir, delivery.job_id)
            if len(files) != delivery.n_files:
                raise DeliveryError(
                    f"outbox holds {len(files)} files, the job wrote {delivery.n_files}"
                )
            job, name = delivery.job_id, delivery.destination
            state: DeliveryState
            send_files(
                files,
                destination,
                self.calling_ae,
                self.config.timeout_seconds,
                skip=self.store.accepted_objects(job, name),
                on_accepted=lambda uid: self.store.accept_object(job, name, uid, time.time()),
            )
            state, reason, next_at = "done", "", now
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            if isinstance(exc, OutsideStorage):  # a planted link: never read, never sent
                self.store.refuse_path(exc, "outbox file")
                state, next_at = "parked", now
            elif attempt >= self.config.max_attempts:
                state, next_at = "parked", now
                reason = f"after {attempt} attempts: {reason}"
            else:
                state, next_at = "retry", now + self.backoff(attempt)
        try:
            self.store.finish_delivery(
                delivery.job_id, delivery.destination, state, reason, next_at, time.time()
            )
        except Exception as exc:  # stays due; tried again on the next pass
            log.error("delivery.record_failed", job_id=delivery.job_id, error=type(exc).__name__)
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
        if self.metrics is not None:
            try:
                self.metrics.deliveries.labels(delivery.destination, state).inc()
                self.metrics.stage_seconds.labels("send").observe(time.perf_counter() - started)
                if state != "done":
                    self.metrics.send_failures.labels(delivery.destination).inc()
            except Exception:  # metrics never change a delivery
                pass
        return DeliveryOutcome(delivery.job_id, delivery.destination, state, reason)

    def _deliver_alert(
        self, delivery: DeliveryRecord, now: float, started: float
    ) -> DeliveryOutcome:
        """Send one recorded alert and record its new state; never raises."""
        from ich_node.delivery.outbox import send_alert, target_of

        attempt = delivery.attempts + 1
        name = delivery.destination.removeprefix(ALERT_PREFIX)
        to_notification = None
        state: DeliveryState
        try:
            target = target_of(delivery.destination, self.targets)
            alert = send_alert(self.storage_dir, target, delivery.job_id)
            accepted = time.time()
            to_notification = accepted - alert.last_received_at
            state, reason, logged, next_at = "done", "", "", now
        except Exception as exc:
            permanent = isinstance(exc, AlertFailed) and exc.permanent
            if isinstance(exc, OutsideStorage):  # a planted link: never read, never sent
                self.store.refuse_path(exc, "alert record")
                permanent = True
            # Logs get the node's own words; the store also keeps the peer's text.
            logged = f"{type(exc).__name__}: {exc}"[:500]
            reason = exc.recorded[:500] if isinstance(exc, AlertFailed) else logged
            if permanent or attempt >= self.config.max_attempts:
                state, next_at = "parked", now
                why = "refused" if permanent else f"after {attempt} attempts"
                reason, logged = f"{why}: {reason}", f"{why}: {logged}"
            else:
                state, next_at = "retry", now + self.backoff(attempt)
        try:
            if state == "done":
                self.store.alert_accepted(delivery.job_id, name, time.time())
            self.store.finish_delivery(
                delivery.job_id, delivery.destination, state, reason, next_at, time.time()
            )
        except Exception as exc:  # stays due; tried again on the next pass
            log.error("alert.record_failed", job_id=delivery.job_id, error=type(exc).__name__)
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
        if self.metrics is not None:
            try:
                self.metrics.deliveries.labels(delivery.destination, state).inc()
                if state != "done":
                    self.metrics.send_failures.labels(delivery.destination).inc()
                elif to_notification is not None:
                    self.metrics.time_to_notification.labels(name).observe(to_notification)
            except Exception:  # metrics never change a delivery
                pass
        return DeliveryOutcome(delivery.job_id, delivery.destination, state, reason)

    def run_once(self, now: float, alerts: bool | None = None) -> list[DeliveryOutcome]:
        """Attempt every delivery due at ``now``, alerts first.

        ``alerts``: ``True`` only alerts, ``False`` only DICOM results, ``None`` both.
        """
        # Results and alert payloads are on the shared mount (PostgreSQL): wait for it
        # instead of failing attempts (and parking deliveries) meanwhile.
        if not self._storage.ready():
            return []
        due = self.store.due_deliveries(now)
        due.sort(key=lambda d: not d.destination.startswith(ALERT_PREFIX))
        if alerts is not None:
            due = [d for d in due if d.destination.startswith(ALERT_PREFIX) == alerts]

        # A shared store leases each delivery to one sender of the cluster (always yes on
        # SQLite); one another sender holds is left to it.
        def claim(d: DeliveryRecord) -> bool:
            lease = 2.0 * self.attempt_seconds(d)
            return self.store.claim_delivery(
                d.job_id, d.destination, now, holder=self.holder, lease_seconds=lease
            )

        # Alerts go out side by side: a target that hangs until its timeout never
        # holds back another target's alert. DICOM results go one at a time.
        alerts_due = [d for d in due if d.destination.startswith(ALERT_PREFIX) and claim(d)]
        outcomes: list[DeliveryOutcome] = []
        if len(alerts_due) > 1:
            workers = min(len(alerts_due), MAX_PARALLEL_ALERTS)
            with ThreadPoolExecutor(workers, thread_name_prefix="alert") as pool:
                outcomes += pool.map(lambda d: self.deliver(d, now), alerts_due)
        else:
            outcomes += [self.deliver(d, now) for d in alerts_due]
        results_due = (d for d in due if not d.destination.startswith(ALERT_PREFIX))
        outcomes += [self.deliver(d, now) for d in results_due if claim(d)]
        return outcomes

    def attempt_seconds(self, delivery: DeliveryRecord) -> float:
        """The longest one attempt of ``delivery`` can take, by its timeouts (seconds).

        A shared store leases the delivery for twice this, so that another host
        never sends it beside a live, slow sender.
        """
        if delivery.destination.startswith(ALERT_PREFIX):
            name = delivery.destination.removeprefix(ALERT_PREFIX)
            timeouts = [t.timeout_seconds for t in self.targets if t.name == name]
            return 3.0 * (timeouts[0] if timeouts else self.config.timeout_seconds)
        # An association, then each object's C-STORE within the timeout.
        return self.config.timeout_seconds * (delivery.n_files + 2)
