"""The store's typed interfaces: what each stage needs from the node's durable state.

The store is split by what it holds. :class:`InstanceStore` (instances and
series) is what the spool, the assembler and retention use; :class:`SeriesQueue`
is how the assembler queues a complete series; :class:`JobStore` is what workers,
the supervisor and ``status`` use; :class:`DeliveryStore` is the sender's
outbox. The SQLite implementation is :class:`ich_node.queue.store.Store` (instances,
series, deliveries) with :class:`ich_node.queue.jobs.JobQueue` (jobs); a server
database implements the same protocols. Records are frozen; states are
``Literal`` types; times are seconds since the epoch, passed in by callers.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol

from ich_node.queue.layout import OutsideStorage

#: A process whose last heartbeat is older than this (seconds) is not alive: its
#: workers are reported dead, and on a shared store what it held goes to others.
HEARTBEAT_STALE_SECONDS: Final = 15.0

#: The prefix of an alert's delivery row (``alert:<target>``), apart from DICOM destinations.
ALERT_PREFIX: Final = "alert:"
#: What a preliminary alert's record adds to the job id of the version it anticipates
#: (its folder, its delivery row and its idempotency key are its own).
PRELIMINARY_SUFFIX: Final = "-p"


def job_of_record(record_id: str) -> str:
    """The job id an alert record's id belongs to (a preliminary's, or the job's own)."""
    return record_id.removesuffix(PRELIMINARY_SUFFIX)


#: The states of a series (see :mod:`ich_node.ingest.assemble`).
SeriesState = Literal["receiving", "queued", "skipped", "capped", "purged"]
#: The states of a reading job (see :mod:`ich_node.queue.jobs`).
JobState = Literal["queued", "leased", "retry", "done", "parked"]
#: Where a leased job is in a worker's pipeline: read ahead, on the model, writing results.
JobStage = Literal["", "read", "model", "results"]
#: The states of one delivery (see :mod:`ich_node.delivery.sender`).
DeliveryState = Literal["pending", "retry", "done", "parked"]


class StoreUnusable(Exception):
    """The store cannot be used by this command, for a reason one line says.

    ``exit_code`` is what a command exits with (``ich_node.service.cli``): 2 for a
    configuration or permission problem an admin must fix (a schema newer or
    older than this code, a role without the privileges it needs, a database or
    file that cannot be opened), 1 when the node is simply not there yet or not
    reachable now (no store under ``storage.dir``, an empty database, a database
    server that does not answer).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Added(enum.Enum):
    """What recording one received instance did (the key is series + SOP Instance UID)."""

    NEW = "new"  # first copy of this instance in this series
    DUPLICATE = "duplicate"  # same series, same UID, same content: nothing changed
    REPLACED = "replaced"  # same series, same UID, other content: the older copy is replaced


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """The header fields of one received instance the node records.

    ``images_in_acquisition`` is ImagesInAcquisition (0020,1002), a count per
    acquisition (PS3.3 C.7.6.1); ``series_related_instances`` is
    NumberOfSeriesRelatedInstances (0020,1209), a count for the whole series.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part: str
    study_description: str
    series_description: str
    images_in_acquisition: int | None = None
    acquisition_number: str = ""
    series_related_instances: int | None = None


@dataclass(frozen=True, slots=True)
class AddResult:
    """The outcome of :meth:`Store.add_instance`."""

    added: Added
    replaced_path: Path | None  # the older copy's file (REPLACED), for the caller to remove
    reused_in: tuple[str, ...]  # other series holding the same SOP Instance UID (NEW only)


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    """One series as the store knows it.

    ``expected`` is the number of images the headers say the *whole series* holds:
    NumberOfSeriesRelatedInstances when any instance carries it, else
    ImagesInAcquisition when every received instance carries it and all share one
    AcquisitionNumber; ``None`` otherwise (only the quiet period then ends it).
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part: str
    study_description: str
    series_description: str
    expected: int | None
    n_instances: int
    n_replaced: int  # instances replaced by a changed re-send since the last read
    n_read: int
    first_at: float
    last_at: float
    state: SeriesState
    version: int
    reason: str
    # When retention last removed its images (None: never, or read again since):
    # what comes next is a re-send of a series the node already answered.
    purged_at: float | None = None


@dataclass(frozen=True, slots=True)
class InstanceIdentity:
    """What the store knows of one instance's content (see :mod:`ich_node.imaging.identity`)."""

    path: Path
    digest: str  # SHA-256 of the data set as received (the fast path); "" when not recorded
    content_id: str  # its content identity once computed (by a read or a comparison); else ""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One reading job: a series version to classify."""

    job_id: str
    series_instance_uid: str
    version: int
    state: JobState
    attempts: int
    not_before: float
    lease_until: float | None
    worker: str | None
    reason: str
    created_at: float
    updated_at: float
    stage: JobStage = ""
    crash_returns: int = 0  # times given back uncharged because its worker died
    cause: str = ""  # why this version was read ("first read", "3 late instances", ...)
    sr_study_uid: str = ""  # the SR this version sent (empty when none): a later
    sr_series_uid: str = ""  # version's SR names it as its predecessor
    sr_sop_class_uid: str = ""
    sr_sop_uid: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """The outbox entry of one job's results for one destination."""

    job_id: str
    destination: str
    state: DeliveryState
    attempts: int
    next_at: float
    reason: str
    n_files: int
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One alert decision for one notification target (see :mod:`ich_node.delivery.alerts`).

    ``status`` ``F`` or ``C``: an alert sent (with its delivery row). ``""``: the
    decision that nothing was sent because the study's answer did not change; kept
    so that other series of the study know this series' answer before its read
    completes (alerts go per study, :func:`ich_node.delivery.outbox.prepare_alerts`).
    """

    job_id: str
    target: str
    series_instance_uid: str
    version: int
    key: str  # idempotency key, repeated in every message
    status: str  # F (first) | C (correction) | P (preliminary, while the series arrived)
    # | "" (nothing sent: the study's answer unchanged)
    supersedes: str | None  # the key of the alert this one corrects
    positive_labels: tuple[str, ...]  # the answer this alert gave (empty: negative)
    last_received_at: float
    created_at: float
    accepted_at: float | None = None
    # The study it is about: "accession:<AccessionNumber>", else "study:<StudyInstanceUID>".
    # Alerts go per study: later series and versions compare with its latest alert.
    study_key: str = ""


class AlertsChanged(RuntimeError):
    """Another series of the study recorded an alert meanwhile: decide again."""


@dataclass(frozen=True, slots=True)
class StreamLease:
    """A series a worker reads while it arrives (``series.streaming``).

    Held by one worker of the whole node (all hosts on PostgreSQL) until
    ``lease_until``; the worker renews it while it keeps the series' slice outputs
    in memory (:mod:`ich_node.service.stream_stage`). A worker that dies leaves it
    to expire: nothing depends on it but speed, since the complete series is read
    from the spool.
    """

    series_instance_uid: str
    worker: str
    lease_until: float
    since: float


@dataclass(frozen=True, slots=True)
class SrReference:
    """The UIDs of an SR a job sent (PS3.3 C.17.2, Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class SeriesRead:
    """One series version the node read and answered: a row of the results ledger.

    Written by :meth:`JobStore.complete` in the transaction that marks the job
    ``done``, and kept beyond image retention (``storage.keep_hours`` removes the
    images, never these rows), so that the node remembers what it answered for a
    series whose images are gone. No patient name, ID or birth date is kept: UIDs,
    the accession number, the model and the answer only.

    Attributes
    ----------
    job_id : str
        The reading job (one per series version).
    study_instance_uid, series_instance_uid : str
        The source study and series (DICOM UIDs).
    accession_number : str
        AccessionNumber (0008,0050) of the source study; empty when absent.
    version : int
        Which read of the series this is (1, 2, ...).
    content_fingerprint : str
        SHA-256 (hex) over the sorted content identities of the instances the
        version read (:func:`ich_node.imaging.identity.fingerprint`): equal for
        the same content in any transfer syntax.
    n_instances : int
        Instances the version read.
    bytes_fingerprint : str
        The same over the SHA-256 of each instance as received (empty when one
        was not recorded): equal bytes are equal content, nothing decoded.
    model_name, model_version, model_sha256 : str
        The bundle that answered (its card's name and version, SHA-256 of its weights).
    thresholds, probabilities : dict of str to float
        Per label (:data:`ich_node.labels.LABELS`): the threshold in use and the
        series-level probability in [0, 1].
    positive_labels : tuple of str
        The labels reported positive, in ``LABELS`` order (empty: negative).
    coverage_complete : bool
        Whether the slices covered the head without a hole above ``series.max_gap_mm``.
    n_notes : int
        Notes the reading made (corrections, irregularities; ``findings.json`` ``notes``).
    first_received_at : float or None
        When the first instance of the version arrived (seconds since the epoch).
    completed_at : float or None
        When the series version was complete and queued.
    read_at : float or None
        When the read was done (the job completed).
    first_alert_at, first_delivery_at : float or None
        When a notification target first accepted an alert of this version, and
        when a DICOM destination first accepted all of its results; ``None``
        until then (updated when it happens).
    sr_series_instance_uid, sr_sop_class_uid, sr_sop_instance_uid : str
        The SR the version sent (empty when it sent none); the SR is in the source study.
    cause : str
        Why this version was read ("first read", "3 late instances", ...).
    threshold_sources : dict of str to str
        Per label, where its threshold came from: ``bundle`` (the model card) or
        ``site`` (``model.thresholds``); empty in rows written before it was kept
        (then every threshold was the bundle's).
    mode : {"live", "shadow"}
        ``node.mode`` when the version was read: in shadow mode nothing was sent
        except to the targets with ``shadow: true``.
    result_at : float or None
        When the probabilities were known (the moment the alerts are recorded,
        before heatmaps and the SR): in shadow mode, when an alert would have
        been sent. ``None`` in rows written before it was kept.
    """

    job_id: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    version: int
    content_fingerprint: str
    n_instances: int
    model_name: str
    model_version: str
    model_sha256: str
    thresholds: dict[str, float]
    probabilities: dict[str, float]
    positive_labels: tuple[str, ...]
    coverage_complete: bool
    n_notes: int
    first_received_at: float | None = None
    completed_at: float | None = None
    read_at: float | None = None
    first_alert_at: float | None = None
    first_delivery_at: float | None = None
    sr_series_instance_uid: str = ""
    sr_sop_class_uid: str = ""
    sr_sop_instance_uid: str = ""
    cause: str = ""
    # SHA-256 over the sorted digests of the instances as received (the fast path of
    # a comparison: equal bytes, equal content); "" when a digest was not recorded.
    bytes_fingerprint: str = ""
    threshold_sources: dict[str, str] = field(default_factory=dict)
    mode: str = "live"
    result_at: float | None = None

    @property
    def sr(self) -> SrReference | None:
        """The SR this version sent, as a reference a later SR names; ``None`` when none."""
        if not self.sr_sop_instance_uid:
            return None
        return SrReference(
            self.study_instance_uid,
            self.sr_series_instance_uid,
            self.sr_sop_class_uid,
            self.sr_sop_instance_uid,
        )


@dataclass(frozen=True, slots=True)
class RereadCounts:
    """Series read more than once, and why (for ``status``)."""

    series: int  # series with more than one version
    late_instances: int  # versions read again because instances came after a read
    changed_resends: int  # versions read again because an instance was re-sent changed
    capped: int  # series that reached series.max_versions
    sop_uid_reused: int  # instances whose SOP Instance UID is also in another series


@dataclass(frozen=True, slots=True)
class RefusalCount:
    """How often the node refused something for one reason (for ``status``).

    ``reason`` is a short name (``disk_low``, ``path_outside_storage``, ...);
    ``detail`` what the last one said (no patient data).
    """

    reason: str
    n: int
    first_at: float
    last_at: float
    detail: str = ""


class InstanceStore(Protocol):
    """Instances and series (spool, assembly, retention, recovery)."""

    def instance_digest(self, series_instance_uid: str, sop_instance_uid: str) -> str | None: ...

    def add_instance(
        self, record: InstanceRecord, path: Path, size: int, now: float, digest: str = ""
    ) -> AddResult: ...

    def instance_paths(
        self, series_instance_uid: str, received_by: float | None = None
    ) -> list[Path]: ...

    def instance_files(self) -> dict[str, str]: ...

    def forget_instance(self, path: str) -> None: ...

    def series(self, series_instance_uid: str) -> SeriesRecord | None: ...

    def receiving_series(self) -> list[SeriesRecord]: ...

    def skip_series(
        self,
        series_instance_uid: str,
        n_read: int,
        reason: str,
        seen_last_at: float | None = None,
        state: Literal["skipped", "capped"] = "skipped",
    ) -> None: ...

    def n_instances(self) -> int: ...

    def instance_identities(
        self, series_instance_uid: str, received_by: float | None = None
    ) -> list[InstanceIdentity]: ...

    def set_content_ids(self, content_ids: dict[Path, str]) -> None: ...

    def latest_read(self, series_instance_uid: str) -> SeriesRead | None: ...

    def latest_job(self, series_instance_uid: str) -> JobRecord | None: ...

    def settle_series(
        self, series_instance_uid: str, n_read: int, reason: str, seen_last_at: float | None = None
    ) -> None: ...

    def reread_counts(self) -> RereadCounts: ...

    def expired_series(self, cutoff: float) -> list[str]: ...

    def purge_series(
        self, series_instance_uid: str, now: float | None = None, cutoff: float | None = None
    ) -> list[Path] | None: ...

    def refuse_path(self, exc: OutsideStorage, what: str) -> None: ...

    def count_refusals(self, counts: dict[str, tuple[int, str]], now: float) -> None: ...


class SeriesQueue(Protocol):
    """How the assembler queues a complete series: a new version and its job."""

    def enqueue_series(
        self,
        series_instance_uid: str,
        n_read: int,
        now: float,
        seen_last_at: float | None,
        cause: str | None = None,
    ) -> JobRecord: ...


class JobStore(Protocol):
    """Reading jobs: lease, stage, complete, fail, release (workers, supervisor, ops)."""

    def job(self, job_id: str) -> JobRecord | None: ...

    def jobs(self, state: JobState | None = None) -> list[JobRecord]: ...

    def lease(self, worker: str, now: float) -> JobRecord | None: ...

    def set_stage(self, job: JobRecord, stage: JobStage, now: float) -> None: ...

    def extend(self, job: JobRecord, now: float) -> float: ...

    def complete(
        self,
        job: JobRecord,
        destinations: Sequence[str],
        n_files: int,
        now: float,
        sr: SrReference | None = None,
        read: SeriesRead | None = None,
    ) -> None: ...

    def give_back(self, job: JobRecord, now: float) -> None: ...

    def fail(self, job: JobRecord, reason: str, now: float, *, permanent: bool = False) -> str: ...

    def requeue(self, job_id: str, now: float) -> bool: ...

    def previous_sr(self, series_instance_uid: str, version: int) -> SrReference | None: ...

    def reads(
        self,
        series_instance_uid: str | None = None,
        *,
        study_instance_uid: str | None = None,
        accession_number: str | None = None,
    ) -> list[SeriesRead]: ...


class DeliveryStore(Protocol):
    """The outbox: one delivery per job and destination, and the objects accepted."""

    def deliveries(self, job_id: str | None = None) -> list[DeliveryRecord]: ...

    def due_deliveries(self, now: float) -> list[DeliveryRecord]: ...

    def claim_delivery(
        self,
        job_id: str,
        destination: str,
        now: float,
        *,
        holder: str = "",
        lease_seconds: float | None = None,
    ) -> bool: ...

    def finish_delivery(
        self,
        job_id: str,
        destination: str,
        state: DeliveryState,
        reason: str,
        next_at: float,
        now: float,
    ) -> None: ...

    def release_delivery(self, job_id: str, destination: str, holder: str, now: float) -> None: ...

    def requeue_deliveries(self, job_id: str, now: float) -> int: ...

    def accepted_objects(self, job_id: str, destination: str) -> set[str]: ...

    def accept_object(
        self, job_id: str, destination: str, sop_instance_uid: str, now: float
    ) -> None: ...

    def alert_accepted(self, job_id: str, target: str, now: float) -> None: ...

    def refuse_path(self, exc: OutsideStorage, what: str) -> None: ...


class StreamStore(Protocol):
    """In-progress leases of series read while they arrive (:class:`StreamLease`)."""

    def lease_stream(
        self, series_instance_uid: str, worker: str, now: float, until: float
    ) -> bool: ...

    def release_stream(self, series_instance_uid: str, worker: str) -> None: ...

    def streams(self) -> list[StreamLease]: ...


class AlertStore(Protocol):
    """Alerts to notification targets (:mod:`ich_node.delivery.outbox`); their delivery
    rows are the outbox's (destination ``alert:<target>``)."""

    def last_received_at(self, series_instance_uid: str, received_by: float) -> float | None: ...

    def alerts(self, job_id: str | None = None) -> list[AlertRecord]: ...

    def decided_targets(self, job_id: str) -> set[str]: ...

    def previous_alert(
        self, series_instance_uid: str, version: int, target: str
    ) -> AlertRecord | None: ...

    def record_alerts(
        self,
        alerts: list[AlertRecord],
        prefix: str,
        now: float,
        expected: dict[str, str | None] | None = None,
        *,
        unless_job: str = "",
    ) -> int: ...

    def previous_study_alert(
        self, study_key: str, target: str, job_id: str
    ) -> AlertRecord | None: ...

    def latest_alerts(self, study_key: str, target: str) -> dict[str, AlertRecord]: ...

    def reads(
        self,
        series_instance_uid: str | None = None,
        *,
        study_instance_uid: str | None = None,
        accession_number: str | None = None,
    ) -> list[SeriesRead]: ...

    def alert_accepted(self, job_id: str, target: str, now: float) -> None: ...
